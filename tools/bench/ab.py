"""A/B: the e2e requests of tools/bench/e2e.py sent to two anybit source trees in turn, to measure a change.

    python -m tools.bench.ab --base /path/to/base/tree [--new .] [--precisions w4a16,...] [--threads 2]

Each tree runs tools.bench.worker in a process of its own (PYTHONPATH = that tree), one precision at a
time, both loaded at once; requests alternate (base, new, new, base, ...) so that load from other
processes falls on both. Per precision: prompt and decode tokens/s, new/base ratios of the medians and of
the best runs (on a shared machine the best run is the least disturbed one); the greedy tokens of both
must agree. The JSON goes to bench/results/ab-<date>.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from tools.bench import machine, peers
from tools.bench.e2e import DEFAULT_PRECISIONS, parse_precision
from tools.bench.stats import summarize

TEXT = "The quick brown fox jumps over the lazy dog while the committee discusses the budget."


def _worker(tree: str, cfg: dict, threads: int, model) -> peers.JsonWorker:
    spec = {"wbits": cfg["wbits"], "abits": cfg["abits"], "group": cfg["group"], "agroup": cfg["agroup"],
            "device": "cpu", "threads": threads, "model": model, "prepare_only": False}
    env = peers.thread_env(threads)
    env["PYTHONPATH"] = str(Path(tree).resolve())
    return peers.JsonWorker([sys.executable, "-m", "tools.bench.worker", json.dumps(spec)], env=env,
                            name=f"anybit {tree} {cfg['name']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.ab", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the base source tree")
    ap.add_argument("--new", default=".", help="the changed source tree (default: this one)")
    ap.add_argument("--precisions", default=DEFAULT_PRECISIONS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="decoder (default SmolLM2-135M GGUF)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for t in (a.base, a.new):
        if not (Path(t) / "engine" / "api.py").is_file():
            print(f"error: {t} is not an anybit source tree (no engine/api.py)", file=sys.stderr)
            return 2
    rows = []
    load0 = machine.load_average()
    for cfg in (parse_precision(s) for s in a.precisions.split(",") if s.strip()):
        print(f"[ab] {cfg['name']} ...", file=sys.stderr, flush=True)
        ws = {"base": _worker(a.base, cfg, a.threads, a.model), "new": _worker(a.new, cfg, a.threads, a.model)}
        try:
            ids = ws["base"].request({"cmd": "tokenize", "text": TEXT, "n": a.prompt_tokens})["ids"]
            runs = {"base": [], "new": []}
            req = {"cmd": "run", "ids": ids, "max_tokens": a.max_tokens}
            for side in ("base", "new"):             # warm-up
                ws[side].request(dict(req, max_tokens=4))
            for i in range(a.reps):
                for side in (("base", "new") if i % 2 == 0 else ("new", "base")):
                    runs[side].append(ws[side].request(req))
        finally:
            for w in ws.values():
                w.close()
        row = {"precision": cfg["name"]}
        for side, rs in runs.items():
            row[side] = {k: summarize(r[k] for r in rs) for k in ("prompt_tok_s", "decode_tok_s")}
        for k in ("prompt", "decode"):
            b, n = row["base"][f"{k}_tok_s"], row["new"][f"{k}_tok_s"]
            row[f"{k}_ratio"] = n["median"] / b["median"]
            row[f"{k}_ratio_best"] = n["max"] / b["max"]      # the least disturbed run of each side
        row["same_tokens"] = all(r["ids"] == runs["base"][0]["ids"] for r in runs["base"] + runs["new"])
        rows.append(row)
        print(f"{cfg['name']:10} prompt {row['base']['prompt_tok_s']['median']:7.1f} -> "
              f"{row['new']['prompt_tok_s']['median']:7.1f} tok/s (median {row['prompt_ratio']:.3f}x, best "
              f"{row['prompt_ratio_best']:.3f}x)   decode {row['base']['decode_tok_s']['median']:6.1f} -> "
              f"{row['new']['decode_tok_s']['median']:6.1f} tok/s (median {row['decode_ratio']:.3f}x, best "
              f"{row['decode_ratio_best']:.3f}x)   same tokens: {row['same_tokens']}", flush=True)
    doc = {"bench": "ab", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine.describe(a.threads), "load_average": [load0, machine.load_average()],
           "base": os.path.abspath(a.base), "new": os.path.abspath(a.new), "threads": a.threads, "reps": a.reps,
           "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens, "rows": rows}
    out = Path(a.out) if a.out else (Path(__file__).resolve().parents[2] / "bench" / "results" /
                                     f"ab-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
