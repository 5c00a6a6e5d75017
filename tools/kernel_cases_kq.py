"""kernelcheck cases for two-level weights (exact K-quant imports, loader/kquant.py) on the three GEMVs:
random GGUF blocks of a type, decoded and packed as the loader does, the kernels given float16 d / dmin
and the integer sub-scales (runtime/gpu_device.GpuLinear's arguments). Reference: loader's float64
dequantization of the packed weight (equal to gguf.quants.dequantize rounded to float32, tests/
test_kquant.py) and a float64 product, within the bound of the float-table cases."""
from __future__ import annotations

import numpy as np

from loader.bipolar import PackedLinear
from loader.kquant import F16_FIELDS, KQ_TYPES, decode
from loader.pack import exact_import_sub
from runtime.driver import cdiv
from runtime.gpu_layout import to_gpu_planes
from tools.kernel_cases import Result, _quantized_inputs, close, float_bound


def kq_linear(rng, kind: str, N: int, K: int) -> PackedLinear:
    """A weight of random blocks of a GGUF type (random bytes, finite float16 fields of mixed magnitude)."""
    _p, _G, S, nbytes, _c0 = KQ_TYPES[kind]
    raw = rng.integers(0, 256, (N, K // S, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        f = (rng.standard_normal((N, K // S)) * 10.0 ** rng.integers(-3, 1, (N, K // S))).astype("<f2")
        raw[:, :, off:off + 2] = f.view(np.uint8).reshape(N, K // S, 2)
    q, sub = exact_import_sub(decode(raw.reshape(N, -1), kind, N, K), kind)
    return PackedLinear.from_quant(q, sub=sub)


def kq_weight_dev(run, lin: PackedLinear):
    """(planes, d, dmin, ngw, trailing kq arguments, Kw) as GpuLinear uploads them."""
    sub = lin.sub
    gp = to_gpu_planes(lin.planes)
    put = lambda a: None if a is None else run.put(a)
    tail = [put(sub.sc), put(sub.m), 1 | (2 if sub.nib else 0), sub.S, float(sub.c0)]
    return run.put(gp), run.put(sub.d), put(sub.dmin), sub.d.shape[1], tail, gp.shape[2]


def case_gemv_kq(run, rng, kind, M, N, K, abits):
    """M = 1: gemv_a16_m1 (and gemv_a16); M > 1: gemv_a16; abits < 16: actquant + gemv_q."""
    lin = kq_linear(rng, kind, N, K)
    planes, d, dmin, ngw, tail, kw = kq_weight_dev(run, lin)
    p, G = lin.bits, lin.group
    wd = lin.dequantize()
    shape = f"{kind} M{M} N{N} K{K} p{p} G{G}"
    out = []
    if abits == 16:
        x = rng.standard_normal((M, K)).astype(np.float32)
        xa = run.put(x)
        launches = [("gemv_a16", (cdiv(N, 4), cdiv(M, 4), 1),
                     [M, N, K, kw, p, G, ngw, None])]
        if M == 1:
            launches.append(("gemv_a16_m1", (cdiv(N, 4), 1, 1), [N, K, kw, p, G, ngw, None]))
        for name, grid, mid in launches:
            y = run.out((M, N), np.float32)
            run.launch("gemv.ptx", name, grid, (128, 1, 1), [y, xa, planes, d, dmin] + mid + tail)
            ok, err, note = close(run.get(y, (M, N), np.float32), x.astype(np.float64) @ wd.T,
                                  float_bound(x, wd, K), "y")
            out.append(Result(f"{name} two-level", shape, ok, err, "2e-6 sqrt(K) |x||w|", note))
        return out
    a = _quantized_inputs(run, rng, M, K, abits, 32, kw, False, False)
    y = run.out((M, N), np.float32)
    run.launch("gemv.ptx", "gemv_q", (cdiv(N, 4), M, 1), (128, 1, 1),
               [y, a["ap"], a["asc"], planes, d, dmin, M, N, K, kw, p, abits, G, a["ga"], ngw, a["nga"], None]
               + tail)
    ok, err, note = close(run.get(y, (M, N), np.float32), a["xq"] @ wd.T, float_bound(a["xq"], wd, K), "y")
    return [Result("gemv_q two-level", shape + f" q{abits}", ok, err, "2e-6 sqrt(K) |x||w|", note)]


def add_cases(add, quick: bool):
    add(case_gemv_kq, "Q6_K", 1, 8, 256, 16)        # 16 lanes, signed sub-scales, no offset
    add(case_gemv_kq, "Q4_K", 3, 8, 256, 16)        # 32 lanes, sub-scale and min
    add(case_gemv_kq, "Q2_K", 2, 8, 256, 8)         # 16 lanes, nibble pairs and min
    if not quick:
        for kind in ("Q6_K", "Q4_K", "Q2_K", "Q3_K", "Q5_K", "Q5_0", "Q5_1"):
            add(case_gemv_kq, kind, 1, 72, 1024, 16)
            add(case_gemv_kq, kind, 8, 72, 1024, 16)
            add(case_gemv_kq, kind, 8, 72, 1024, 8)
