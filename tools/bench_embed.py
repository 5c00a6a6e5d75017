"""Embedding throughput: sentences per second on the CPU for several precisions and batch sizes.

    python -m tools.bench_embed [--model DIR] [--precisions 16/16,8/8,4/16] [--batches 1,8,32,128]
                                [--n 256] [--threads N] [--device cpu] [--json]

Texts are the [sentences] section of tests/data/sentences.txt, cycled to --n texts (mixed lengths,
4 to 53 tokens). Each configuration is warmed up once, then timed over all texts; the cosine to the
float embeddings is printed beside the speed so a fast but broken precision is visible.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sentences.txt"


def bench_texts(n: int) -> list[str]:
    lines, on = [], False
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            on = line == "[sentences]"
        elif on and line.strip() and not line.startswith("#"):
            lines.append(line)
    return [lines[i % len(lines)] for i in range(n)]


def _pairs(s: str) -> list[tuple[int, int]]:
    out = []
    for item in s.split(","):
        w, _, a = item.partition("/")
        out.append((int(w), int(a or 16)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_embed", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="BERT model directory (default all-MiniLM-L6-v2)")
    p.add_argument("--precisions", default="16/16,8/16,8/8,4/16,2/16", help="wbits/abits list")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--n", type=int, default=256, help="texts per measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object with every result")
    args = p.parse_args(argv)

    from engine.embed import load_embedder
    texts = bench_texts(args.n)
    batches = [int(b) for b in args.batches.split(",")]
    results, ref = [], None
    for wbits, abits in _pairs(args.precisions):
        emb = load_embedder(args.model, wbits=wbits, abits=abits, device=args.device, threads=args.threads)
        try:
            emb.embed(texts[:8])                                      # warm-up (first calls, caches)
            vecs = None
            for b in batches:
                t0 = time.perf_counter()
                vecs = emb.embed(texts, batch_size=b)
                dt = time.perf_counter() - t0
                if wbits == 16 and abits == 16 and ref is None:
                    ref = vecs
                c = None
                if ref is not None:
                    c = (vecs.astype(np.float64) * ref).sum(1) / (np.linalg.norm(vecs, axis=1)
                                                                  * np.linalg.norm(ref, axis=1))
                r = {"wbits": wbits, "abits": abits, "batch": b, "texts": len(texts),
                     "sentences_per_s": round(len(texts) / dt, 1), "device": emb.device,
                     "threads": getattr(emb.backend, "threads", None),
                     "cos_min": None if c is None else round(float(c.min()), 5),
                     "cos_mean": None if c is None else round(float(c.mean()), 5)}
                results.append(r)
                if not args.json:
                    cs = "" if c is None else f"  cos to float min {r['cos_min']:.4f} mean {r['cos_mean']:.4f}"
                    print(f"W{wbits:<2}A{abits:<2} batch {b:>4}: {r['sentences_per_s']:>8.1f} sentences/s "
                          f"on {r['device']} ({r['threads']} threads){cs}", flush=True)
        finally:
            emb.close()
    if args.json:
        print(json.dumps({"tool": "bench_embed", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
