"""The HTTP side: a Starlette app with the OpenAI routes, over the model worker (scheduler.py).

Handlers run on the event loop and never touch the model: a generation request is checked
(protocol.py), handed to the worker as a Job, and its events come back through an asyncio queue that
the worker fills with call_soon_threadsafe. Streams are server-sent events on Starlette's
StreamingResponse, which also listens for the client going away: the stream's generator is then closed,
which cancels the job and frees its slot. A stream with nothing to send for PING_S seconds (a long
prefill, a full queue) sends an SSE comment, so that proxies keep it open. (sse-starlette did the same
with an anyio cancel scope around every send: ~0.15 ms of the event loop per token, on the cores the
model's step runs on.) Embeddings run in a thread under a lock of their own, so they never wait for a
long generation.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from engine.server import protocol as P
from engine.server.protocol import ApiError
from engine.server.scheduler import Job, QueueFull


class ServerState:
    """What the routes serve: the decoder (with its worker) and/or the embedder, and the API key."""

    def __init__(self, *, model=None, model_id=None, scheduler=None, embedder=None, embed_id=None,
                 api_key: str | None = None):
        self.model, self.model_id, self.scheduler = model, model_id, scheduler
        self.embedder, self.embed_id = embedder, embed_id
        self.embed_lock = threading.Lock()
        self.api_key = api_key
        self.created = int(time.time())


def _auth(state: ServerState, request: Request) -> None:
    if not state.api_key:
        return
    h = request.headers.get("authorization", "")
    given = h[7:].strip() if h[:7].lower() == "bearer " else ""
    if not given:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    if not hmac.compare_digest(given.encode(), state.api_key.encode()):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


async def _body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise P.bad(f"the request body is not valid JSON: {e}") from None


PING_S = 10.0
_PING = object()            # a queue item: nothing came for PING_S seconds


def _dumps(d) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def _event(payload: str) -> bytes:
    return ("data: " + payload + "\n\n").encode()


def build_app(state: ServerState) -> Starlette:
    async def health(request: Request):
        load = state.scheduler.load() if state.scheduler else {}
        return JSONResponse({"status": "ok", **load})

    async def models(request: Request):
        _auth(state, request)
        data = [{"id": i, "object": "model", "created": state.created, "owned_by": "anybit"}
                for i in (state.model_id, state.embed_id) if i]
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request):
        return await _generate(request, "chat")

    async def completions(request: Request):
        return await _generate(request, "completion")

    async def _generate(request: Request, kind: str):
        _auth(state, request)
        body = await _body(request)
        if state.model is None:
            served = state.embed_id or "none"
            raise ApiError(404, f"this server has no text-generation model (it serves {served})",
                           param="model", code="model_not_found")
        req = P.parse_generation(body, kind, state.model, state.model_id)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:        # the loop is gone (server shut down): nobody is listening
                pass

        job = Job(req.ids, req.params, req.max_tokens, emit, req.stop, req.logprobs)
        try:
            state.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"The server is busy ({e}); retry later", type="server_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), type="server_error", code="server_stopped") from None
        rid = P.new_id(kind)
        if req.stream:
            return StreamingResponse(_stream(req, rid, job, q, loop), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, req, rid, job, q)

    def _lps(req, entries, offset=0):
        tok = state.model.tokenizer
        if req.logprobs is None:
            return None
        return P.chat_logprobs(entries, tok) if req.kind == "chat" else P.completion_logprobs(entries, tok, offset)

    async def _collect(request: Request, req, rid, job, q):
        text, entries = [], []
        get = asyncio.ensure_future(q.get())
        checked = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.5)
                if time.monotonic() - checked >= 0.5:       # is the client still there?
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                if not done:
                    continue
                ev = get.result()
                if ev.kind == "delta":
                    text.append(ev.text)
                    entries.extend(ev.logprobs)
                    get = asyncio.ensure_future(q.get())
                elif ev.kind == "error":
                    raise ApiError(500, f"generation failed: {ev.error}", type="server_error")
                else:
                    u = P.usage(ev.prompt_tokens, ev.completion_tokens)
                    out = "".join(text)
                    if req.kind == "chat":
                        return JSONResponse(P.chat_response(rid, req.model, out, ev.finish_reason, u,
                                                            _lps(req, entries)))
                    return JSONResponse(P.completion_response(rid, req.model, out, ev.finish_reason, u,
                                                              _lps(req, entries)))
        finally:
            get.cancel()
            job.cancelled.set()         # a no-op once the job is done; frees the slot otherwise

    async def _stream(req, rid, job, q, loop):
        chat = req.kind == "chat"
        offset = 0
        ping = None

        def quiet():            # (re)arm the keep-alive: a comment if nothing comes for PING_S
            nonlocal ping
            if ping is not None:
                ping.cancel()
            ping = loop.call_later(PING_S, q.put_nowait, _PING)
        try:
            if chat:
                yield _event(_dumps(P.chat_chunk(rid, req.model, {"role": "assistant", "content": ""})))
            while True:
                quiet()
                ev = await q.get()
                if ev is _PING:
                    yield b": ping\n\n"
                elif ev.kind == "delta":
                    lps = _lps(req, ev.logprobs, offset)
                    offset += len(ev.text)
                    yield _event(_dumps(P.chat_chunk(rid, req.model, {"content": ev.text}, lps=lps) if chat else
                                        P.completion_response(rid, req.model, ev.text, None, lps=lps, chunk=True)))
                elif ev.kind == "error":
                    yield _event(_dumps({"error": {"message": f"generation failed: {ev.error}",
                                                   "type": "server_error", "param": None, "code": None}}))
                    return
                else:
                    yield _event(_dumps(P.chat_chunk(rid, req.model, {}, ev.finish_reason) if chat else
                                        P.completion_response(rid, req.model, "", ev.finish_reason, chunk=True)))
                    if req.include_usage:
                        u = P.usage(ev.prompt_tokens, ev.completion_tokens)
                        yield _event(_dumps(P.chat_chunk(rid, req.model, {}, u=u) if chat else
                                            P.completion_response(rid, req.model, "", None, u, chunk=True)))
                    yield _event("[DONE]")
                    return
        finally:
            if ping is not None:
                ping.cancel()
            job.cancelled.set()         # the client went away (or the stream ended): free the slot

    async def embeddings(request: Request):
        _auth(state, request)
        body = await _body(request)
        if state.embedder is None:
            raise ApiError(404, "this server has no embedding model (start it with --embed-model)",
                           param="model", code="model_not_found")
        name, texts, fmt = P.parse_embedding_input(body, state.embed_id)
        emb = state.embedder

        def run():
            with state.embed_lock:
                n = sum(len(s) for s in emb.tokenizer.encode_for_encoder(texts, emb.max_len))
                return emb.embed(texts), n
        vectors, n_tokens = await anyio.to_thread.run_sync(run)
        return JSONResponse(P.embedding_response(name, vectors, fmt, n_tokens))

    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    async def server_error(request: Request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {e}", type="server_error").body(), status_code=500)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/embeddings", embeddings, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                        Exception: server_error})
