"""Check every PTX kernel against its NumPy reference: `python -m tools.kernelcheck [--sim|--gpu] [--quick]`.

Each case draws fresh random inputs (seeded per run, the seed is printed), poisons the outputs (NaN for
float32, 0xDEADBEEF for uint32) before the launch, runs the kernel and compares:
- integer paths (packed planes, code sums, the popcount GEMV/GEMM with unit scales) exactly;
- float paths within a stated bound (column `tol`), per element, relative to the size of the terms.
Shapes are awkward on purpose: K not a multiple of 256, M = 1, N an odd multiple of 8.

Runners: `sim` executes the PTX in the interpreter tools/ptxsim (no GPU needed); `gpu` loads the same
PTX through runtime.module on the device. With a GPU both run, and the integer outputs must agree bit
for bit between them. Prints one table row per case; exit status 1 when a case fails.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tools.kernel_cases import Result, cases, close, exact  # noqa: F401 (names the tests use)
from tools.kernel_cases_ops import ref_sample  # noqa: F401
from tools.kernel_runners import GpuRunner, SimArray, SimDevice, SimRunner  # noqa: F401


def run_all(runners, seed: int, quick: bool, only: str | None = None):
    results = []
    for label, fn in cases(quick):
        if only and only not in label:
            continue
        per = []
        for run in runners:
            rng = np.random.default_rng(seed)          # the same inputs for every runner
            t0 = time.perf_counter()
            try:
                rs = fn(run, rng)
            except Exception as e:                     # a crash is a failed case, with its message
                rs = [Result(label, "", False, float("nan"), "", f"{type(e).__name__}: {e}")]
            dt = time.perf_counter() - t0
            for r in rs:
                r.note = (r.note + f" [{run.name} {dt:.1f}s]").strip()
            per.append(rs)
        if len(per) == 2:                              # integer results must agree between sim and GPU
            for a, b in zip(*per):
                for k in a.ints:
                    if k in b.ints and not np.array_equal(a.ints[k], b.ints[k]):
                        b.ok = False
                        b.note += f" {k} differs from sim"
        for rs in per:
            results.extend(rs)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="check every PTX kernel against its NumPy reference")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sim", action="store_true", help="interpreter only")
    g.add_argument("--gpu", action="store_true", help="GPU only (exit status 2 without a GPU)")
    ap.add_argument("--quick", action="store_true", help="small shapes only (the default with the interpreter)")
    ap.add_argument("--full", action="store_true", help="the larger shapes too, even in the interpreter")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", default=None, help="run only the cases whose label contains this text")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
    runners = []
    if not a.gpu:
        runners.append(SimRunner())
    if not a.sim:
        try:
            runners.append(GpuRunner())
        except Exception as e:                         # NoGpuError, no driver, no cuda-python
            if a.gpu:
                print(f"kernelcheck: no GPU: {e}", file=sys.stderr)
                return 2
    quick = a.quick or (not a.full and any(r.name == "sim" for r in runners))
    print(f"seed {seed}; runners: {', '.join(r.name for r in runners)}")
    res = run_all(runners, seed, quick, a.only)
    w = max((len(r.case) for r in res), default=4)
    ws = max((len(r.shape) for r in res), default=4)
    for r in res:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.case:<{w}}  {r.shape:<{ws}}  err/tol {r.err:8.3g}  "
              f"{r.tol:<20} {r.note}")
    nbad = sum(not r.ok for r in res)
    print(f"{len(res) - nbad} passed, {nbad} failed")
    for run in runners:
        run.close()
    return 1 if nbad else 0


if __name__ == "__main__":
    sys.exit(main())
