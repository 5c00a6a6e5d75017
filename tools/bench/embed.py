"""Embed: sentences per second of the embedding model (all-MiniLM-L6-v2 by default) at several
precisions and batch sizes, with the cosine to the float embeddings beside each speed (a fast but broken
precision shows). Texts and precision parsing come from tools/bench_embed.py; this adds repetitions,
medians and the recorded JSON. The W16A16 row is the float baseline the ratios refer to.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from tools.bench import machine
from tools.bench.stats import print_table, report_and_save, summarize
from tools.bench_embed import _pairs, bench_texts


def add_args(ap) -> None:
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="BERT directory (default all-MiniLM-L6-v2)")
    ap.add_argument("--precisions", default=None, help="wbits/abits list (default 16/16,8/16,8/8,4/16,2/16)")
    ap.add_argument("--batches", default=None, help="default 1,8,32,128 (quick 1,32)")
    ap.add_argument("--n", type=int, default=None, help="texts per measurement (default 128, quick 64)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 2, quick 2)")
    ap.add_argument("--threads", type=int, default=None)


def run(a) -> dict:
    from engine.embed import load_embedder
    threads = a.threads or os.cpu_count() or 1
    precs = _pairs(a.precisions or ("16/16,8/8,4/16" if a.quick else "16/16,8/16,8/8,4/16,2/16"))
    batches = [int(b) for b in (a.batches or ("1,32" if a.quick else "1,8,32,128")).split(",")]
    n = a.n or (64 if a.quick else 128)
    reps = a.reps or 2
    texts = bench_texts(n)
    desc = machine.describe(threads)
    desc["load_average_start"] = machine.load_average()
    rows, ref, base = [], None, {}
    for wbits, abits in precs:
        print(f"[embed] W{wbits}A{abits} ...", file=sys.stderr, flush=True)
        emb = load_embedder(a.model, wbits=wbits, abits=abits, device=a.device, threads=threads)
        try:
            emb.embed(texts[:8])                                          # warm-up
            for b in batches:
                samples, vecs = [], None
                for _ in range(reps):
                    t0 = time.perf_counter()
                    vecs = emb.embed(texts, batch_size=b)
                    samples.append(len(texts) / (time.perf_counter() - t0))
                if wbits == 16 and abits == 16 and ref is None:
                    ref = vecs
                row = {"wbits": wbits, "abits": abits, "precision": f"w{wbits}a{abits}", "batch": b,
                       "texts": len(texts), "sentences_per_s": summarize(samples), "device": emb.device}
                if ref is not None:
                    c = (vecs.astype(np.float64) * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
                    row["cos_min"], row["cos_mean"] = float(c.min()), float(c.mean())
                if wbits == 16 and abits == 16:
                    base[b] = row["sentences_per_s"]["median"]
                if b in base:
                    row["vs_float"] = row["sentences_per_s"]["median"] / base[b]
                rows.append(row)
        finally:
            emb.close()
    desc["load_average_end"] = machine.load_average()
    return {"schema": 1, "bench": "embed", "machine": desc, "notes": [],
            "settings": {"model": a.model or "all-MiniLM-L6-v2", "device": a.device, "threads": threads,
                         "texts": n, "reps": reps, "batches": batches, "quick": a.quick},
            "rows": rows}


def print_report(doc: dict) -> None:
    s = doc["settings"]
    print(f"\nembed on {doc['machine']['kind']}, {s['threads']} threads, {s['texts']} texts, median of {s['reps']}")
    rows = [[r["precision"].upper(), r["batch"],
             f"{r['sentences_per_s']['median']:.1f} ({r['sentences_per_s']['min']:.0f}-{r['sentences_per_s']['max']:.0f})",
             f"{r['vs_float']:.2f}" if "vs_float" in r else "-",
             f"{r['cos_min']:.4f}" if "cos_min" in r else "-"] for r in doc["rows"]]
    print_table(["precision", "batch", "sentences/s", "x float", "min cos"], rows)


def main(a) -> int:
    return report_and_save(a, run(a), "embed", print_report)
