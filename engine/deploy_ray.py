"""Scale-out on Ray Serve: N replicas of `engine.serve`'s OpenAI app, one whole model per replica.

    python -m engine.deploy_ray --replicas 2 --threads 1 [--model PATH] [--embed-model default] [--port 8000]

The unit of scale of a small runtime is a whole model per process (a packed 7B model at W4 is about
5 GB), so each Ray Serve replica loads its own model and serves the very app `engine.serve` serves
(engine/server/app.py: build_app), streaming included; Ray's HTTP proxy spreads requests over the
replicas and restarts a replica that dies. Nothing here re-implements a route.

The model is packed once, by this process, before any replica starts (engine/model_store.py caches a
packed directory per source and recipe under ANYBIT_CACHE); every replica then maps that directory
read-only instead of packing it again. On a multi-node cluster the cache must be a shared path (or give
--model a packed directory that every node can read).

It joins the Ray cluster at --address (default: $RAY_ADDRESS, else a local one-node cluster started
here) and blocks until Ctrl-C; `serve_app(...)` is the same thing as a function for tests and scripts.
Only ray core and ray serve are used: `ray.serve.llm` pulls in torch and vLLM and is not wanted here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica loads: plain values, so that Ray can ship it to the replica processes."""
    model: str | None = None            # GGUF / HF / packed path, None = default model, "none" = no decoder
    embed_model: str | None = None      # None = no embedder, "default" = all-MiniLM-L6-v2
    wbits: int | str = 4                # or "source": each tensor at its source type's bits
    abits: int = 16
    group: int | None = None
    agroup: object = None
    embed_wbits: int = 16
    threads: int = 1
    context: int | None = None
    parallel: int = 4
    queue: int = 64
    prefix_caches: int = 4
    api_key: str | None = None
    model_name: str | None = None

    def __post_init__(self):
        if self.threads < 1 or self.parallel < 1 or self.queue < 1 or self.prefix_caches < 0:
            raise ValueError("threads, parallel and queue must be at least 1, prefix_caches at least 0")
        if (self.model or "").lower() == "none" and self.embed_model is None:
            raise ValueError("nothing to serve: give a model or an embed model")


def _has_decoder(cfg: ReplicaConfig) -> bool:
    return (cfg.model or "").lower() != "none"


def prepack(cfg: ReplicaConfig) -> None:
    """Pack the models into the cache once, here, so that replicas only map them."""
    from engine.model_store import load_packed_model
    from engine.embed import default_group
    if _has_decoder(cfg) and cfg.wbits != 16:
        load_packed_model(cfg.model, wbits=cfg.wbits, abits=cfg.abits, group=cfg.group, agroup=cfg.agroup)
    if cfg.embed_model is not None and cfg.embed_wbits != 16:
        path = None if cfg.embed_model == "default" else cfg.embed_model
        load_packed_model(path, wbits=cfg.embed_wbits, abits=16, group=default_group(cfg.embed_wbits),
                          kind="embedder", progress=False)


def build_replica_app(cfg_dict: dict):
    """Runs inside a replica: load the models and return engine.serve's ASGI app over them."""
    import engine
    from engine.embed import load_embedder
    from engine.server.app import build_app
    from engine.server.host import make_state, model_name

    cfg = ReplicaConfig(**cfg_dict)
    model = embedder = None
    if _has_decoder(cfg):
        model = engine.load(cfg.model, wbits=cfg.wbits, abits=cfg.abits, group=cfg.group, agroup=cfg.agroup,
                            device="cpu", threads=cfg.threads, context=cfg.context, progress=False)
    if cfg.embed_model is not None:
        path = None if cfg.embed_model == "default" else cfg.embed_model
        embedder = load_embedder(path, wbits=cfg.embed_wbits, device="cpu", threads=cfg.threads)
    state = make_state(model, embedder,
                       model_id=cfg.model_name or (model_name(cfg.model) if model is not None else None),
                       embed_id=model_name(path, "embedder") if embedder is not None else None,
                       parallel=cfg.parallel, queue_size=cfg.queue, prefix_caches=cfg.prefix_caches,
                       api_key=cfg.api_key)
    return build_app(state)


def deployment(cfg: ReplicaConfig, replicas: int, name: str = "anybit"):
    """A bound Ray Serve application: `replicas` copies of the app, each owning `cfg.threads` CPUs."""
    from ray import serve

    cfg_dict = asdict(cfg)

    def builder():
        return build_replica_app(cfg_dict)

    @serve.deployment(name=name, num_replicas=replicas,
                      ray_actor_options={"num_cpus": cfg.threads},
                      # a replica whose model is still loading gets no traffic; a dead one is replaced
                      health_check_period_s=2, health_check_timeout_s=60,
                      max_ongoing_requests=cfg.parallel + cfg.queue)
    @serve.ingress(builder)
    class AnybitReplica:
        pass

    return AnybitReplica.bind()


def serve_app(cfg: ReplicaConfig, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
              address: str | None = None, num_cpus: int | None = None, name: str = "anybit") -> str:
    """Start (or join) Ray, pack once, deploy; returns the base URL ('http://host:port')."""
    import ray
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    prepack(cfg)
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:       # a local one-node cluster: room for every replica's threads plus Serve's own actors
            ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, replicas * cfg.threads + 1),
                     include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(cfg, replicas, name), name=name, route_prefix="/")
    return f"http://{host}:{port}"


def parser() -> argparse.ArgumentParser:
    from engine.serve import parser as serve_parser
    p = argparse.ArgumentParser(prog="python -m engine.deploy_ray", parents=[serve_parser()], add_help=False,
                                conflict_handler="resolve",
                                description="Serve replicas of engine.serve's OpenAI API on a Ray cluster.")
    p.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica (default 1)")
    p.add_argument("--port", type=int, default=8000, help="Ray Serve's HTTP port (default 8000)")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        print(f"error: scale-out needs the ray extra (pip install 'anybit[ray]'): {e}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        print("error: Ray replicas run on the CPU backend (the GPU path is untested on hardware)", file=sys.stderr)
        return 2
    from loader.errors import FetchError, FormatError
    try:
        cfg = ReplicaConfig(model=args.model, embed_model=args.embed_model, wbits=args.wbits, abits=args.abits,
                            group=args.group, agroup=args.agroup, embed_wbits=args.embed_wbits,
                            threads=args.threads, context=args.context, parallel=args.parallel,
                            queue=args.queue, prefix_caches=args.prefix_caches, api_key=args.api_key,
                            model_name=args.model_name)
        if args.replicas < 1 or not 0 <= args.port <= 65535:
            raise ValueError("--replicas must be at least 1 and --port 0..65535")
        url = serve_app(cfg, replicas=args.replicas, host=args.host, port=args.port, address=args.address)
    except (FormatError, FetchError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"anybit: {args.replicas} Ray Serve replica(s) on {url}/v1 (Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
