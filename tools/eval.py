"""`python -m tools.eval`: quality of each precision against the float path, on a fixed English text.

For each configuration: perplexity on the evaluation text (engine/texts.py: the Zen of Python, disjoint
from the calibration text), its change relative to the float path, the mean KL divergence of the
next-token distribution from the float one, top-1 agreement, weight bytes and the backend it ran on.

Configurations are written W<w>A<a>[g<G>][a<Ga>|t]: W8A8g128t = 8-bit weights in groups of 128,
8-bit activations with one (smoothed) scale per token; W4A8g32 = G = Ga = 32; W4A16 = default group.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np

DEFAULT = ("W16A16 W4A16 W8A8g32 W8A8g128t W4A8g32 W6A6g32 W4A6g32 W4A16g128 W3A16g32 W2A16g32")
_SPEC = re.compile(r"^W(\d+)A(\d+)(?:g(\d+))?(?:(t)|a(\d+))?$", re.I)


def parse_config(s: str) -> dict:
    m = _SPEC.match(s.strip())
    if not m:
        raise ValueError(f"bad configuration {s!r}: expected e.g. W4A16, W8A8g32, W8A8g128t, W4A8g128a32")
    w, a, g, tok, ag = m.groups()
    return {"name": s, "wbits": int(w), "abits": int(a), "group": int(g) if g else None,
            "agroup": "token" if tok else (int(ag) if ag else None)}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def evaluate(model_path, configs, *, device="cpu", threads=None, text=None, log=print):
    import engine
    from engine.texts import eval_text
    text = text or eval_text()
    rows, ref_lp = [], None
    for spec in configs:
        c = parse_config(spec) if isinstance(spec, str) else spec
        t0 = time.perf_counter()
        m = engine.load(model_path, wbits=c["wbits"], abits=c["abits"], group=c["group"], agroup=c["agroup"],
                        device=device, threads=threads, progress=False)
        with m:
            ids = m.tokenize(text)
            lp = log_softmax(m.logits(ids)[:-1])
            nll = -lp[np.arange(len(ids) - 1), ids[1:]]
            row = {"config": c["name"], "ppl": float(np.exp(nll.mean())), "tokens": len(ids),
                   "weight_bytes": m.weight_bytes, "device": m.device, "seconds": time.perf_counter() - t0}
        if ref_lp is None:
            ref_lp, ref_ppl = lp, row["ppl"]
        row["ppl_rel"] = row["ppl"] / ref_ppl - 1
        row["kl"] = float((np.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean())
        row["top1"] = float((ref_lp.argmax(-1) == lp.argmax(-1)).mean())
        rows.append(row)
        log(format_row(row))
    return rows


HEADER = f"{'config':<12} {'ppl':>8} {'vs float':>9} {'KL':>8} {'top-1':>6} {'weights MiB':>11} {'device':>6}"


def format_row(r: dict) -> str:
    return (f"{r['config']:<12} {r['ppl']:>8.2f} {r['ppl_rel'] * 100:>+8.2f}% {r['kl']:>8.4f} "
            f"{r['top1'] * 100:>5.1f}% {r['weight_bytes'] / 2**20:>11.1f} {r['device']:>6}")


def readme_section(rows: list[dict], note: str) -> str:
    """The README quality table, rendered from recorded rows (never typed by hand)."""
    out = ["| config | perplexity | vs float | KL | top-1 | weights MiB | device |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['ppl']:.2f} | {r['ppl_rel'] * 100:+.2f}% | {r['kl']:.4f} | "
                   f"{r['top1'] * 100:.1f}% | {r['weight_bytes'] / 2**20:.1f} | {r['device']} |")
    return "\n".join(out + ["", note])


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default SmolLM2)")
    p.add_argument("--configs", default=DEFAULT, help=f"space-separated (default: {DEFAULT}); "
                                                       "the first is the reference")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto", "numpy"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--readme", nargs=2, metavar=("ROWS_JSON", "README"), default=None,
                   help="render recorded rows into the README between <!-- eval:begin/end --> and exit")
    args = p.parse_args(argv)
    if args.readme:
        rows_path, readme = args.readme
        with open(rows_path) as f:
            rows = json.load(f)
        note = (f"Measured by `python -m tools.eval` on {rows[0]['tokens']} tokens of the evaluation text "
                f"(engine/texts.py); the first row is the reference. Raw rows: `{rows_path}`.")
        with open(readme) as f:
            text = f.read()
        with open(readme, "w") as f:
            f.write(replace_between(text, "<!-- eval:begin -->", "<!-- eval:end -->", readme_section(rows, note)))
        return 0
    try:
        configs = [parse_config(s) for s in args.configs.split()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(HEADER)
    rows = evaluate(args.model, configs, device=args.device, threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
