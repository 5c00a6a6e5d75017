"""python -m tools.bench {kernels,e2e,embed,plot,readme} [options]

    kernels   linear GEMV/GEMM on model shapes at W1..W8 x A1..A8/A16, beside NumPy (CPU) / cuBLAS (GPU)
    e2e       decoder tokens/s, TTFT, peak RSS beside llama.cpp on the same GGUF and thread count
    synth     decode tokens/s of a random-weight model with Llama-2-7B shapes, as a fraction of bandwidth
    firstuse  seconds and memory of a first use (packing included) beside llama.cpp's time to first token
    commands  seconds and peak memory of each command the README lists (first use and again)
    embed     embedding sentences/s at several precisions and batch sizes
    plot      PNG charts of the recorded results (needs matplotlib: pip install 'anybit[bench]')
    readme    regenerate README.md's performance section between <!-- bench:begin --> and <!-- bench:end -->

Results: bench/results/<bench>-<machine kind>-<date>.json. --quick keeps any measuring command under
about three minutes on two cores (fewer shapes, precisions and repetitions).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _pin_blas_threads(argv) -> None:
    """Give NumPy's BLAS the thread count of the run before NumPy loads it (it reads the environment
    once). Measured on a 2-core VM: without this, OpenBLAS started more threads than cores and a
    64x576x576 matmul took 36 ms instead of 0.3 ms, which would flatter every ratio to NumPy."""
    n = None
    if "--threads" in argv and argv.index("--threads") + 1 < len(argv):
        n = argv[argv.index("--threads") + 1]
    n = n or str(os.cpu_count() or 1)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, n)


def _common(p, measure: bool) -> None:
    p.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    if measure:
        p.add_argument("--quick", action="store_true", help="a cheap run (< 3 minutes on 2 cores)")
        p.add_argument("--no-save", action="store_true", help="print only, write no JSON")


def main(argv=None) -> int:
    _pin_blas_threads(sys.argv[1:] if argv is None else list(argv))
    from tools.bench import commands, e2e, embed, firstuse, kernels, plot, readme, synth
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, mod, measure in (("kernels", kernels, True), ("e2e", e2e, True), ("embed", embed, True),
                               ("synth", synth, True), ("firstuse", firstuse, True), ("commands", commands, True),
                               ("plot", plot, False),
                               ("readme", readme, False)):
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        _common(p, measure)
        mod.add_args(p)
    a = ap.parse_args(argv)
    mod = {"kernels": kernels, "e2e": e2e, "embed": embed, "synth": synth, "firstuse": firstuse, "commands": commands,
           "plot": plot,
           "readme": readme}[a.cmd]
    try:
        return mod.main(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tools.bench {a.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tools.bench {a.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
