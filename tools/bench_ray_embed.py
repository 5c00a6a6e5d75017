"""Batch-embedding throughput on Ray Data: sentences/s with 1 and 2 embedder actors, same corpus, same run.

    python -m tools.bench_ray_embed [--rows 4000] [--threads 1] [--out bench/results/ray-embed-....json]

Each actor owns `--threads` threads; on a 2-core machine two 1-thread actors are the most that can run
in parallel, so the 2-actor figure is bounded by the core count, not by Ray. The corpus is generated
(tests/test_ray.py's sentence maker) and the default embedder (all-MiniLM-L6-v2, W16A16) is used.
Reported: embed seconds (actors started and the model loaded inside them: that is part of the cost of a
batch job) and rows/s, plus the machine's core count and load average at the start.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ray_embed")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard-rows", type=int, default=250)
    p.add_argument("--actors", default="1,2")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import ray
    from engine.embed_dataset import run
    from tests.test_ray import sentences

    tmp = Path(tempfile.mkdtemp(prefix="anybit-raybench-"))
    src = tmp / "corpus.txt"
    src.write_text("\n".join(sentences(a.rows)) + "\n")
    ray.init(num_cpus=max(os.cpu_count() or 1, 2 * a.threads), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in [int(x) for x in a.actors.split(",")]:
            out = tmp / f"out{n}"
            t0 = time.perf_counter()
            r = run(src, out, replicas=n, shard_rows=a.shard_rows, threads=a.threads)
            wall = time.perf_counter() - t0
            rows.append({"actors": n, "threads_per_actor": a.threads, "rows": r["rows"], "wall_s": wall,
                         "embed_s": r["embed_s"], "rows_per_s": r["rows_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec = {"bench": "ray-embed", "date": dt.datetime.now(dt.timezone.utc).isoformat(), "commit": commit,
           "machine": {"cores": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": platform.python_version()},
           "model": "all-MiniLM-L6-v2 W16A16", "results": rows,
           "speedup_2_vs_1": (rows[1]["rows_per_s"] / rows[0]["rows_per_s"]) if len(rows) > 1 and rows[0]["rows_per_s"] else None}
    out = Path(a.out or ROOT / "bench" / "results" / f"ray-embed-cpu-{os.cpu_count()}c-{dt.datetime.now():%Y%m%d-%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
