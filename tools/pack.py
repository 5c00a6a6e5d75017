"""`python -m tools.pack SRC OUT --wbits 4 --group 128 ...`: a GGUF file or HF directory to a packed model.

Shows a progress bar while packing and ends with a summary: bytes before and after, how many tensors
were imported exactly (GGUF Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K..Q6_K blocks at matching or higher precision
and the source's sub-block), and per source tensor type what was exact and what was rounded, with the
relative error. `--wbits 0` packs every tensor at its source type's own bits. SRC may be "default" (SmolLM2) or "default-embedder" (all-MiniLM-L6-v2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _bits(s: str) -> int:
    v = 0 if s == "source" else int(s)
    if not 0 <= v <= 8:
        raise argparse.ArgumentTypeError(f"must be 1..8, or 0 / 'source' (each tensor at its source's bits), got {v}")
    return v


def _group(s: str):
    if s in ("channel", "per-channel"):
        return "channel"
    v = int(s)
    if v <= 0 or v % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32 or 'channel', got {s}")
    return v


def source_bytes(src: Path) -> int:
    return src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.rglob("*") if f.is_file())


def summarize(pm, src_bytes: int, seconds: float) -> str:
    info = pm.info
    exact = [n for n, m in info.items() if m["exact"]]
    approx = sorted(((m["rel_err"], n) for n, m in info.items() if not m["exact"]), reverse=True)
    lines = [f"packed {len(info)} linear tensors in {seconds:.1f} s: {src_bytes / 2**20:.1f} MiB source -> "
             f"{pm.weight_bytes / 2**20:.1f} MiB packed",
             f"  exact import (lossless): {len(exact)} tensors"]
    if approx:
        errs = [e for e, _ in approx]
        lines.append(f"  rounded: {len(approx)} tensors, relative error mean {sum(errs) / len(errs):.4f}, "
                     f"worst {approx[0][0]:.4f} ({approx[0][1]})")
    bits = sorted({(m["bits"], m["group"]) for m in info.values()})
    lines.append("  recipes: " + ", ".join(f"W{b} G{g}" for b, g in bits))
    by_type: dict[str, list] = {}
    for m in info.values():
        by_type.setdefault(m.get("source_type") or "float", []).append(m)
    for t, ms in sorted(by_type.items()):
        ex = [m for m in ms if m["exact"]]
        rd = [m for m in ms if not m["exact"]]
        parts = []
        if ex:
            parts.append(f"{len(ex)} exact at " + ", ".join(sorted({f"W{m['bits']} G{m['group']}" for m in ex})))
        if rd:
            errs = [m["rel_err"] or 0.0 for m in rd]
            parts.append(f"{len(rd)} rounded to " + ", ".join(sorted({f"W{m['bits']} G{m['group']}" for m in rd}))
                         + f" (relative error mean {sum(errs) / len(errs):.4f}, worst {max(errs):.4f})")
        lines.append(f"  {t}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.pack", description=__doc__.split("\n")[0])
    p.add_argument("src", help="GGUF file, HF directory, 'default' or 'default-embedder'")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--wbits", type=_bits, default=4)
    p.add_argument("--group", type=_group, default=None,
                   help="multiple of 32 or 'channel' (default: the source's sub-block, 16 or 32, where the import "
                        "is exact; 32 for other quantized sources; 128 for float ones)")
    p.add_argument("--symmetric", action="store_true", help="no per-group offset")
    p.add_argument("--no-clip", action="store_true", help="skip the clipping search")
    p.add_argument("--head-bits", type=_bits, default=None, help="bits of the output projection")
    p.add_argument("--smooth", action="store_true", help="calibrate SmoothQuant factors (decoders)")
    p.add_argument("--rotate", type=int, default=0, metavar="B",
                   help="block Hadamard rotation of the decoder's linear inputs, at most B lanes per block "
                        "(a power of two; 256 is what `--agroup token` models use); rotated inputs are "
                        "not smoothed")
    args = p.parse_args(argv)

    from engine.model_store import resolve_source
    from loader.errors import FetchError, FormatError
    from loader.pack import Recipe, progress_bar, quantize_model
    from loader.packed import write_packed
    from loader.sources import read_source
    try:
        kind = {"default": "decoder", "default-embedder": "embedder"}.get(args.src)
        src_path = resolve_source(None if kind else args.src, kind or "decoder")
        src = read_source(src_path)
        recipe = Recipe(wbits=args.wbits, group=args.group, asymmetric=not args.symmetric, clip=not args.no_clip,
                        head_bits=args.head_bits, smooth=args.smooth, rotate=args.rotate)
        smooth = None
        if args.smooth:
            from engine.calibrate import smoothing_factors
            smooth = smoothing_factors(src)
        t0 = time.perf_counter()
        pm = quantize_model(src, recipe, smooth=smooth, progress=progress_bar(f"packing W{args.wbits}"))
        write_packed(pm, args.out)
    except (FormatError, FetchError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(summarize(pm, source_bytes(src_path), time.perf_counter() - t0))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
