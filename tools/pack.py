"""`python -m tools.pack SRC OUT --wbits 4 --group 128 ...`: a GGUF file or HF directory to a packed model.

Shows a progress bar while packing and ends with a summary: bytes before and after, how many tensors
were imported exactly (GGUF Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q2_K..Q6_K blocks at matching or higher precision
and the source's sub-block), and per source tensor type what was exact and what was rounded, with the
relative error. `--wbits source` (or 0) packs every tensor at its source type's own bits. SRC may be
"default" (SmolLM2) or "default-embedder" (all-MiniLM-L6-v2).
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
    from loader.progress import summary
    return summary(pm.info, seconds, pm.weight_bytes, src_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.pack", description=__doc__.split("\n")[0])
    p.add_argument("src", help="GGUF file, HF directory, 'default' or 'default-embedder'")
    p.add_argument("out", help="output directory (written atomically; an existing one is replaced only "
                               "if it is an anybit packed directory or empty, unless --force)")
    p.add_argument("--wbits", type=_bits, default=4)
    p.add_argument("--group", type=_group, default=None,
                   help="multiple of 32 up to the model's widest input, or 'channel' (default: the source's "
                        "sub-block, 16 or 32, where the import is exact; 32 for other quantized sources; 128 "
                        "for float ones)")
    p.add_argument("--symmetric", action="store_true", help="no per-group offset")
    p.add_argument("--no-clip", action="store_true", help="skip the clipping search")
    p.add_argument("--head-bits", type=_bits, default=None, help="bits of the output projection")
    p.add_argument("--smooth", action="store_true", help="calibrate SmoothQuant factors (decoders)")
    p.add_argument("--rotate", type=int, default=0, metavar="B",
                   help="block Hadamard rotation of the decoder's linear inputs, at most B lanes per block "
                        "(a power of two; 256 is what `--agroup token` models use); rotated inputs are "
                        "not smoothed")
    p.add_argument("--force", action="store_true",
                   help="replace OUT even if it is not an anybit packed directory (never the source)")
    args = p.parse_args(argv)

    from engine.cli_common import report
    from engine.model_store import resolve_source
    from loader.pack import Recipe
    from loader.pack_writer import pack_to_dir
    from loader.packed import check_out_dir, read_packed
    from loader.progress import Progress
    from loader.sources import read_source
    from loader.validate import check_group
    try:
        kind = {"default": "decoder", "default-embedder": "embedder"}.get(args.src)
        # the output first: a refused destination costs nothing, found after packing it costs minutes
        check_out_dir(args.out, force=args.force, source=None if kind else resolve_source(args.src))
        recipe = Recipe(wbits=args.wbits, group=args.group, asymmetric=not args.symmetric, clip=not args.no_clip,
                        head_bits=args.head_bits, smooth=args.smooth, rotate=args.rotate)
        src_path = resolve_source(None if kind else args.src, kind or "decoder")
        check_out_dir(args.out, force=args.force, source=src_path)
        src = read_source(src_path)
        check_group(args.group, [t.shape[-1] for t in src.tensors.values() if len(t.shape) == 2],
                    str(src_path))
        smooth = None
        if args.smooth:
            from engine.calibrate import smoothing_factors
            smooth = smoothing_factors(src)
        t0 = time.perf_counter()
        # each tensor goes to disk as soon as it is packed: peak memory stays near one tensor's work
        pack_to_dir(src, recipe, args.out, smooth=smooth, progress=Progress(f"packing W{args.wbits}" if args.wbits else "packing at source bits"),
                    force=args.force)
        pm = read_packed(args.out, verify=False)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError, RuntimeError) as e:    # AnybitError and the builtins it refines
        return report(e)
    print(summarize(pm, source_bytes(src_path), time.perf_counter() - t0))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    from engine.cli_common import run
    sys.exit(run(main))
