"""Micro-benchmark of the CPU backend linears against NumPy float32 matmul, measured in the same run.

    python -m tools.bench_cpu_kernels [--threads 2] [--isa avx512] [--shapes smol|llama|all] [--m 1,64]
                                      [--modes w1a16,...,w4a8] [--min-time 0.2] [--offsets]
                                      [--params float32|float16|both] [--json FILE]

--params float16 draws GGUF-like group parameters (float16 d, m as an exact Q4_1 import has them), which
the backend keeps as float16 (half the parameter bytes, runtime/cpu/backend.py f16_params); float32
draws arbitrary float32 ones (the float32 path); both times the two on the same codes.

GB/s counts the packed weight bytes (planes + scales [+ offsets]) read per call; GFLOP/s is the
equivalent of the dense product, 2*M*N*K / time. ratio = NumPy time / kernel time (> 1: faster).
Set the thread count before NumPy loads its BLAS, so both sides use the same number of cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _early_threads() -> None:
    if "--threads" in sys.argv:
        n = sys.argv[sys.argv.index("--threads") + 1]
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, n)


_early_threads()

import numpy as np  # noqa: E402

from loader.bipolar import PackedLinear  # noqa: E402
from runtime.cpu import CpuBackend  # noqa: E402

SHAPES = {  # name: (N, K)
    "smol": [("smol q/o 576x576", 576, 576), ("smol gate/up 1536x576", 1536, 576),
             ("smol down 576x1536", 576, 1536), ("smol lm_head 49152x576", 49152, 576)],
    "llama": [("7B attn 4096x4096", 4096, 4096), ("7B mlp 11008x4096", 11008, 4096)],
}
DEFAULT_MODES = ["w1a16", "w2a16", "w3a16", "w4a16", "w8a16", "w8a8", "w4a8", "w2a8", "w4a4"]


def random_linear(rng, N, K, bits, group=128, offsets=False, half=False) -> PackedLinear:
    Kp = -(-K // group) * group
    planes = rng.integers(0, 2**32, (bits, N, Kp // 32), dtype=np.uint64).astype(np.uint32)
    scales = rng.uniform(0.001, 0.01, (N, Kp // group)).astype(np.float32)
    off = rng.uniform(-0.01, 0.01, scales.shape).astype(np.float32) if offsets else None
    if half:      # s = d/2, o = m + 7.5 d with float16 d, m (GGUF Q4_1 imported at any p >= 4)
        d = (2 * scales).astype(np.float16)
        scales = (d.astype(np.float64) / 2).astype(np.float32)
        if offsets:
            off = (off.astype(np.float16).astype(np.float64) + 7.5 * d.astype(np.float64)).astype(np.float32)
    return PackedLinear(planes, scales, off, bits, group, K, N)


def timeit(fn, min_time: float) -> float:
    fn()
    best, total, n = float("inf"), 0.0, 0
    while total < min_time or n < 3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, n = min(best, dt), total + dt, n + 1
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default=None)
    ap.add_argument("--shapes", default="all", choices=["smol", "llama", "all"])
    ap.add_argument("--m", default="1,64", help="comma-separated token counts (1 = decode GEMV)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--quant", default=None, choices=["bytes", "popcount"],
                    help="quantized-activation kernel (default: the backend's choice)")
    ap.add_argument("--offsets", action="store_true", help="asymmetric weights (group offsets)")
    ap.add_argument("--params", default="float32", choices=["float32", "float16", "both"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    shapes = SHAPES["smol"] + SHAPES["llama"] if a.shapes == "all" else SHAPES[a.shapes]
    ms = [int(v) for v in a.m.split(",")]
    modes = [(int(md[1:md.index("a")]), int(md[md.index("a") + 1:])) for md in a.modes.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    with CpuBackend(threads=a.threads, isa=a.isa, quant=a.quant) as be:
        print(f"isa={be.isa} threads={be.threads} group={a.group} quant={be.quant}")
        hdr = (f"{'shape':24} {'mode':7} {'params':7} {'M':>4} {'us':>10} {'GB/s':>7} {'GFLOP/s':>8} "
               f"{'numpy us':>10} {'ratio':>6}")
        print(hdr)
        print("-" * len(hdr))
        for name, N, K in shapes:
            wf = rng.standard_normal((N, K)).astype(np.float32)
            for M in ms:
                x = rng.standard_normal((M, K)).astype(np.float32)
                t_np = timeit(lambda: np.matmul(x, wf.T), a.min_time)
                for wb, ab in modes:
                    seed = int(rng.integers(2**31))
                    for half in ([False, True] if a.params == "both" else [a.params == "float16"]):
                        lin = random_linear(np.random.default_rng(seed), N, K, wb, a.group, a.offsets, half)
                        h = be.prepare_linear(lin)
                        out = np.empty((M, N), np.float32)
                        t = timeit(lambda: be.linear(h, x, abits=ab, out=out), a.min_time)
                        gbs = lin.nbytes / t / 1e9
                        gfl = 2.0 * M * N * K / t / 1e9
                        pb = h.wsc.nbytes + (0 if h.woff is None else h.woff.nbytes)
                        row = dict(shape=name, N=N, K=K, M=M, mode=f"w{wb}a{ab}", params=h.param_dtype, us=t * 1e6,
                                   gbs=gbs, gflops=gfl, numpy_us=t_np * 1e6, ratio=t_np / t, weight_bytes=lin.nbytes,
                                   param_bytes=pb)
                        rows.append(row)
                        print(f"{name:24} {row['mode']:7} {h.param_dtype[5:]:7} {M:>4} {t * 1e6:>10.1f} {gbs:>7.2f} "
                              f"{gfl:>8.1f} {t_np * 1e6:>10.1f} {t_np / t:>6.2f}", flush=True)
                        del h, lin
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(isa=be.isa, threads=a.threads, group=a.group, quant=be.quant, offsets=a.offsets,
                           params=a.params, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
