"""Putting a server together from loaded models, and running uvicorn in a thread (tests, benchmarks).

    state = make_state(model, embedder, parallel=4)
    with ServerThread(state) as srv:          # 127.0.0.1, a free port
        OpenAI(base_url=srv.url + "/v1", api_key="x")...
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from engine.prefix_cache import PrefixCache
from engine.server.app import ServerState, build_app
from engine.server.scheduler import Scheduler


def model_name(path, kind: str = "decoder") -> str:
    """The id clients name a model by: its file or directory name, without .gguf."""
    if path is None:
        from loader.fetch import default_model_path
        path = default_model_path(kind)
    p = Path(path)
    if p.is_dir() and p.name == "model":        # the default embedder's wheel keeps it in .../NAME/model
        p = p.parent
    return p.name[:-5] if p.name.lower().endswith(".gguf") else p.name


def make_state(model=None, embedder=None, *, model_id: str | None = None, embed_id: str | None = None,
               parallel: int = 1, queue_size: int = 64, prefix_caches: int = 4,
               api_key: str | None = None) -> ServerState:
    sched = None
    if model is not None:
        pc = PrefixCache(model.decoder.new_cache, prefix_caches) if prefix_caches > 0 else None
        sched = Scheduler(model, slots=parallel, queue_size=queue_size, prefix_cache=pc).start()
    return ServerState(model=model, model_id=model_id or ("model" if model is not None else None),
                       scheduler=sched, embedder=embedder,
                       embed_id=embed_id or ("embedder" if embedder is not None else None), api_key=api_key)


class ServerThread:
    """uvicorn serving `state` from a daemon thread; stop() (or leaving the with block) ends it."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.state = state
        self.server = uvicorn.Server(uvicorn.Config(build_app(state), host=host, port=port,
                                                    log_level=log_level, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="anybit-http", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.state.scheduler is not None:
            self.state.scheduler.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
