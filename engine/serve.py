"""`python -m engine.serve`: an OpenAI-compatible HTTP server (docs/SERVING.md).

    python -m engine.serve --port 8080                      # SmolLM2 at W4A16
    python -m engine.serve --embed-model DIR --model none    # embeddings only

Bad options exit with status 2 and one line, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from engine.generate import _bits, add_precision_options


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _count(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {v}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve",
                                description="Serve a quantized model over the OpenAI HTTP API.")
    p.add_argument("--model", default=None, help="GGUF file, HF or packed directory, or 'none' for no text "
                                                 "model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", default=None, help="the id clients use (default: the file name)")
    p.add_argument("--embed-model", default=None, help="a BERT model for /v1/embeddings (HF or packed dir, "
                                                       "or 'default' for all-MiniLM-L6-v2)")
    p.add_argument("--embed-wbits", type=_bits, default=16, help="embedder weight bits (default 16)")
    add_precision_options(p)
    p.add_argument("--context", type=_positive, default=None, help="KV-cache length (default min(model, 4096))")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--threads", type=_positive, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=_positive, default=4,
                   help="sequences decoding together, a token each in turn (default 4)")
    p.add_argument("--queue", type=_positive, default=64, help="requests that may wait; more get 503 (default 64)")
    p.add_argument("--prefix-caches", type=_count, default=4,
                   help="KV caches kept for prompt-prefix reuse, least recently used evicted (0: off; default 4)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as e:
        print(f"error: the server needs the serve extra (pip install 'anybit[serve]'): {e}", file=sys.stderr)
        return 2
    from loader.errors import FetchError, FormatError
    from runtime.errors import CudaError, NoGpuError, OutOfMemoryError
    import engine
    from engine.embed import load_embedder
    from engine.server.host import make_state, model_name
    from engine.server.app import build_app

    model = embedder = None
    try:
        if (args.model or "").lower() != "none":
            model = engine.load(args.model, wbits=args.wbits, abits=args.abits, group=args.group,
                                agroup=args.agroup, device=args.device, threads=args.threads, context=args.context)
        if args.embed_model:
            path = None if args.embed_model == "default" else args.embed_model
            embedder = load_embedder(path, wbits=args.embed_wbits, device=args.device, threads=args.threads)
        if model is None and embedder is None:
            print("error: nothing to serve: give a --model or an --embed-model", file=sys.stderr)
            return 2
    except (FormatError, FetchError, NoGpuError, ValueError, OSError, CudaError, OutOfMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = make_state(model, embedder,
                       model_id=args.model_name or (model_name(args.model) if model is not None else None),
                       embed_id=model_name(None if args.embed_model == "default" else args.embed_model,
                                           "embedder") if embedder is not None else None,
                       parallel=args.parallel, queue_size=args.queue, prefix_caches=args.prefix_caches,
                       api_key=args.api_key)
    served = ", ".join(i for i in (state.model_id, state.embed_id) if i)
    print(f"anybit: serving {served} on http://{args.host}:{args.port}/v1 "
          f"({model.device if model else embedder.device})", file=sys.stderr)
    try:
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="info")
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
        for m in (model, embedder):
            if m is not None:
                m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
