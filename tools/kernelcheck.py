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
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from loader.bipolar import (PackedLinear, pack_planes, quantize_activations, quantize_weights, round_up,
                            values_of)
from runtime.gpu_layout import chunk_code_sums, gpu_words, to_gpu_planes

from tools.kernel_runners import POISON_U32, PTX_DIR  # noqa: F401


from tools.kernel_runners import GpuRunner, SimArray, SimDevice, SimRunner, poisoned  # noqa: F401,E402


# ---- helpers shared by the cases ----------------------------------------------------------------------

def cdiv(a, b):
    return -(-a // b)


@dataclass
class Result:
    case: str
    shape: str
    ok: bool
    err: float = 0.0
    tol: str = ""
    note: str = ""
    ints: dict = field(default_factory=dict)     # integer outputs, compared across runners


def close(out, ref, bound, what):
    """Per-element |out - ref| <= bound; NaN (an unwritten output) always fails. err = max |d| / bound."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(out).all():
        return False, float("inf"), f"{what}: {int((~np.isfinite(out)).sum())} outputs not finite (unwritten?)"
    err = np.abs(out - ref)
    bad = err > bound
    worst = float((err / np.maximum(bound, 1e-30)).max()) if err.size else 0.0
    return (not bad.any()), worst, (f"{what}: {int(bad.sum())} of {bad.size} off" if bad.any() else "")


def exact(out, ref, what):
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return False, f"{what}: shape {out.shape} != {ref.shape}"
    bad = out != ref
    return (not bad.any()), (f"{what}: {int(bad.sum())} of {bad.size} differ" if bad.any() else "")


def ref_act_device(x, q, ga, kw, smooth=None):
    """What actquant must produce: planes (q, M, kw), scales (M, nga), code sums (M, kw/4)."""
    M, K = x.shape
    xs = x if smooth is None else (x / smooth).astype(np.float32)
    qa = quantize_activations(xs, q, ga)
    codes = np.zeros((M, kw * 32), np.uint8)
    codes[:, :K] = qa.codes[:, :K]
    planes = pack_planes(codes, q)
    csum = codes.reshape(M, kw // 4, 128).sum(-1, dtype=np.uint32)
    return planes, qa.scales.astype(np.float32), csum


def random_linear(rng, N, K, p, G, asym=None):
    w = rng.standard_normal((N, K)) * rng.uniform(0.5, 2.0, (N, 1))
    asym = bool(rng.integers(2)) if asym is None else asym
    return PackedLinear.from_quant(quantize_weights(w, p, G, asymmetric=asym))


def unit_linear(rng, N, K, p, G):
    """Random codes, scales 1, no offsets: every product is an exact integer."""
    Kp = round_up(K, G)
    codes = rng.integers(0, 1 << p, (N, Kp)).astype(np.uint8)
    codes[:, K:] = 0
    return PackedLinear(pack_planes(codes, p), np.ones((N, Kp // G), np.float32), None, p, G, K, N)


def weight_dev(run, lin):
    gp = to_gpu_planes(lin.planes)
    ptrs = dict(planes=run.put(gp), scales=run.put(lin.scales),
                offsets=None if lin.offsets is None else run.put(lin.offsets),
                csum=run.put(chunk_code_sums(gp)))
    return ptrs, gp.shape[2]


def int_codes_act(rng, M, K, q, kw):
    """Random activation codes laid out as the quantize kernel writes them (used with unit scales)."""
    codes = np.zeros((M, kw * 32), np.uint8)
    codes[:, :K] = rng.integers(0, 1 << q, (M, K))
    return codes, pack_planes(codes, q), codes.reshape(M, kw // 4, 128).sum(-1, dtype=np.uint32)


def int_product(lin, acodes, q, K):
    wv = values_of(lin.to_quant().codes[:, :K], lin.bits)
    av = values_of(acodes[:, :K], q)
    return (av @ wv.T).astype(np.float64)


def float_bound(xq, wd, K):
    """float32 accumulation error allowance: 2e-6 sqrt(K) sum |x||w| (+1e-6)."""
    return 2e-6 * (np.abs(xq) @ np.abs(wd).T) * math.sqrt(K) + 1e-6


# ---- cases: quantized linear algebra -------------------------------------------------------------------

def case_actquant(run, rng, M, K, q, ga, smooth):
    kw = gpu_words(round_up(K, 32))
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3, (M, 1))).astype(np.float32)
    x[:, rng.integers(0, K, 3)] = 0.0                      # exact ties at code (2^q-1)/2
    if M > 1:
        x[-1, :min(ga, K)] = 0.0                           # an all-zero group: s = 1
    sm = rng.uniform(0.5, 2.0, K).astype(np.float32) if smooth else None
    ga_eff = min(ga, round_up(K, 32))
    nga, nch = cdiv(K, ga_eff), kw // 4
    rp, rs, rc = ref_act_device(x, q, ga_eff, kw, sm)
    xa = run.put(x)
    pl, sc, cs = run.out((q, M, kw), np.uint32), run.out((M, nga), np.float32), run.out((M, nch), np.uint32)
    run.launch("actquant.ptx", "actquant", (M, 1, 1), (128, 1, 1),
               [pl, sc, cs, xa, None if sm is None else run.put(sm), M, K, kw, q, ga_eff, nga, nch],
               smem=4 * nga)
    gp = run.get(pl, (q, M, kw), np.uint32)
    gs = run.get(sc, (M, nga), np.float32)
    gc = run.get(cs, (M, nch), np.uint32)
    ok1, n1 = exact(gp, rp, "planes")
    ok2, n2 = exact(gs.view(np.uint32), rs.view(np.uint32), "scales")
    ok3, n3 = exact(gc, rc, "code sums")
    return Result("actquant", f"M{M} K{K} q{q} Ga{ga_eff}{' smooth' if smooth else ''}", ok1 and ok2 and ok3,
                  0.0, "exact", "; ".join(s for s in (n1, n2, n3) if s), {"planes": gp, "csum": gc})


def residual(rng, M, N):
    """Integer-valued float32 residual rows: res + an integer product is exact in float32."""
    return rng.integers(-50, 51, (M, N)).astype(np.float32)


def case_gemv_a16(run, rng, M, N, K, p, G, integer):
    if integer:
        lin = unit_linear(rng, N, K, p, G)
        x = rng.integers(-4, 5, (M, K)).astype(np.float32)
    else:
        lin = random_linear(rng, N, K, p, G)
        x = rng.standard_normal((M, K)).astype(np.float32)
    w, kw = weight_dev(run, lin)
    y = run.out((M, N), np.float32)
    res = residual(rng, M, N) if integer else None           # integer runs check the fused residual add
    run.launch("gemv.ptx", "gemv_a16", (cdiv(N, 4), cdiv(M, 4), 1), (128, 1, 1),
               [y, run.put(x), w["planes"], w["scales"], w["offsets"], M, N, K, kw, p, G, lin.scales.shape[1],
                None if res is None else run.put(res)])
    out = run.get(y, (M, N), np.float32)
    wd = lin.dequantize()
    ref = x.astype(np.float64) @ wd.T
    shape = f"M{M} N{N} K{K} p{p} G{G}"
    if integer:
        ok, note = exact(out, ref.astype(np.float32) + res, "res + y")
        return Result("gemv_a16 int", shape, ok, 0.0, "exact", note, {"y": out})
    ok, err, note = close(out, ref, float_bound(x, wd, K), "y")
    return Result("gemv_a16", shape, ok, err, "2e-6 sqrt(K) |x||w|", note)


def case_gemv_a16_m1(run, rng, N, K, p, G, integer):
    """The one-token GEMV (sign-flip accumulation)."""
    if integer:
        lin = unit_linear(rng, N, K, p, G)
        x = rng.integers(-4, 5, (1, K)).astype(np.float32)
    else:
        lin = random_linear(rng, N, K, p, G, asym=True)
        x = rng.standard_normal((1, K)).astype(np.float32)
    w, kw = weight_dev(run, lin)
    res = residual(rng, 1, N) if integer else None
    y = run.out((1, N), np.float32) if res is None else run.put(res)      # in place: y = y + W x
    run.launch("gemv.ptx", "gemv_a16_m1", (cdiv(N, 4), 1, 1), (128, 1, 1),
               [y, run.put(x), w["planes"], w["scales"], w["offsets"], N, K, kw, p, G, lin.scales.shape[1],
                None if res is None else y])
    out = run.get(y, (1, N), np.float32)
    wd = lin.dequantize()
    ref = x.astype(np.float64) @ wd.T
    shape = f"M1 N{N} K{K} p{p} G{G}"
    if integer:
        ok, note = exact(out, ref.astype(np.float32) + res, "y + W x in place")
        return Result("gemv_a16_m1 int", shape, ok, 0.0, "exact", note, {"y": out})
    ok, err, note = close(out, ref, float_bound(x, wd, K), "y")
    return Result("gemv_a16_m1", shape, ok, err, "2e-6 sqrt(K) |x||w|", note)


def _quantized_inputs(run, rng, M, K, q, ga, kw, integer, with_csum):
    """Activation operands for gemv_q / bgemm_b1: random unit-scale codes (integer) or actquant(x)."""
    ga = min(ga, round_up(K, 32))
    nga = cdiv(K, ga)
    if integer:
        acodes, aplanes, acs = int_codes_act(rng, M, K, q, kw)
        return dict(ap=run.put(aplanes), asc=run.put(np.ones((M, nga), np.float32)), cs=run.put(acs),
                    ga=ga, nga=nga, acodes=acodes)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ap, asc = run.out((q, M, kw), np.uint32), run.out((M, nga), np.float32)
    cs = run.out((M, kw // 4), np.uint32)
    run.launch("actquant.ptx", "actquant", (M, 1, 1), (128, 1, 1),
               [ap, asc, cs, run.put(x), None, M, K, kw, q, ga, nga, kw // 4], smem=4 * nga)
    return dict(ap=ap, asc=asc, cs=cs, ga=ga, nga=nga, xq=quantize_activations(x, q, ga).dequantize())


def case_gemv_q(run, rng, M, N, K, p, q, G, ga, integer):
    kw = gpu_words(round_up(K, G))
    lin = unit_linear(rng, N, K, p, G) if integer else random_linear(rng, N, K, p, G)
    a = _quantized_inputs(run, rng, M, K, q, ga, kw, integer, False)
    w, _ = weight_dev(run, lin)
    y = run.out((M, N), np.float32)
    res = residual(rng, M, N) if integer else None
    run.launch("gemv.ptx", "gemv_q", (cdiv(N, 4), M, 1), (128, 1, 1),
               [y, a["ap"], a["asc"], w["planes"], w["scales"], w["offsets"], M, N, K, kw, p, q, G, a["ga"],
                lin.scales.shape[1], a["nga"], None if res is None else run.put(res)])
    out = run.get(y, (M, N), np.float32)
    shape = f"M{M} N{N} K{K} p{p} q{q} G{G} Ga{a['ga']}"
    if integer:
        ok, note = exact(out, int_product(lin, a["acodes"], q, K).astype(np.float32) + res, "res + y")
        return Result("gemv_q int", shape, ok, 0.0, "exact", note, {"y": out})
    wd = lin.dequantize()
    ok, err, note = close(out, a["xq"] @ wd.T, float_bound(a["xq"], wd, K), "y")
    return Result("gemv_q", shape, ok, err, "2e-6 sqrt(K) |x||w|", note)


def case_bgemm(run, rng, M, N, K, p, q, G, ga, integer):
    """Weight groups G a multiple of 128 or per channel (G >= K); blocks of L = min(G, Ga) lanes."""
    kw = gpu_words(round_up(K, G))
    lin = unit_linear(rng, N, K, p, G) if integer else random_linear(rng, N, K, p, G)
    a = _quantized_inputs(run, rng, M, K, q, ga, kw, integer, True)
    L = min(G, a["ga"])
    w, _ = weight_dev(run, lin)
    y = run.out((M, N), np.float32)
    run.launch("bgemm_b1.ptx", "bgemm_b1", (cdiv(N, 32), cdiv(M, 64), 1), (128, 1, 1),
               [y, a["ap"], a["asc"], a["cs"], w["planes"], w["scales"], w["offsets"], w["csum"], M, N, K, kw,
                p, q, G, a["ga"], L, a["nga"], lin.scales.shape[1], kw // 4], smem=2 * (2048 * q + 1024 * p))
    out = run.get(y, (M, N), np.float32)
    shape = f"M{M} N{N} K{K} p{p} q{q} G{G} Ga{a['ga']}"
    if integer:
        ok, note = exact(out, int_product(lin, a["acodes"], q, K).astype(np.float32), "y")
        return Result("bgemm_b1 int", shape, ok, 0.0, "exact", note, {"y": out})
    wd = lin.dequantize()
    ok, err, note = close(out, a["xq"] @ wd.T, float_bound(a["xq"], wd, K), "y")
    return Result("bgemm_b1", shape, ok, err, "2e-6 sqrt(K) |x||w|", note)


# ---- cases: transformer ops -------------------------------------------------------------------------

def _ew(run, name, n, args_in, block=256):
    out = run.out((n,), np.float32)
    run.launch("ops.ptx", name, (cdiv(n, block), 1, 1), (block, 1, 1), [out] + args_in)
    return run.get(out, (n,), np.float32)


def case_elementwise(run, rng, n):
    from math import erf
    a = rng.standard_normal(n).astype(np.float32) * 3
    b = rng.standard_normal(n).astype(np.float32)
    res = []
    ok, note = exact(_ew(run, "add_f32", n, [run.put(a), run.put(b), n, n]), a + b, "add")
    res.append(Result("add_f32", f"n{n}", ok, 0.0, "exact", note))
    row = 24
    bb = b[:row].copy()
    ok, note = exact(_ew(run, "add_f32", n, [run.put(a), run.put(bb), n, row]), a + np.resize(bb, n), "bias")
    res.append(Result("add_f32 bcast", f"n{n} row{row}", ok, 0.0, "exact", note))
    s = rng.uniform(0.5, 2, row).astype(np.float32)
    ok, note = exact(_ew(run, "div_cols_f32", n, [run.put(a), run.put(s), n, row]), a / np.resize(s, n), "div")
    res.append(Result("div_cols_f32", f"n{n} k{row}", ok, 0.0, "exact", note))
    a64 = a.astype(np.float64)
    ref = a64 / (1 + np.exp(-a64)) * b
    out = _ew(run, "swiglu_f32", n, [run.put(a), run.put(b), n])
    ok, err, note = close(out, ref, 4e-6 * np.abs(ref) + 1e-7, "swiglu")
    res.append(Result("swiglu_f32", f"n{n}", ok, err, "4e-6 rel", note))
    a[:8] = [0, -0.0, 1e-3, -1e-3, 6, -6, 12, -12]
    ref = np.array([0.5 * v * (1 + erf(v / math.sqrt(2))) for v in a.astype(np.float64)])
    ok, err, note = close(_ew(run, "gelu_f32", n, [run.put(a), n]), ref, 1e-6 * (1 + np.abs(a)), "gelu")
    res.append(Result("gelu_f32", f"n{n}", ok, err, "1e-6 (1+|x|)", note))
    return res


def case_norms(run, rng, M, d):
    x = (rng.standard_normal((M, d)) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    x64 = x.astype(np.float64)
    res = []
    out = run.out((M, d), np.float32)
    run.launch("ops.ptx", "rmsnorm_f32", (M, 1, 1), (256, 1, 1), [out, run.put(x), run.put(w), d, 1e-5])
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    ok, err, note = close(run.get(out, (M, d), np.float32), ref, 2e-6 * np.abs(ref) + 1e-6, "rmsnorm")
    res.append(Result("rmsnorm_f32", f"M{M} d{d}", ok, err, "2e-6 rel", note))
    out = run.out((M, d), np.float32)
    run.launch("ops.ptx", "layernorm_f32", (M, 1, 1), (256, 1, 1),
               [out, run.put(x), run.put(w), run.put(b), d, 1e-12])
    mu = x64.mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-12) * w + b
    bound = 2e-6 * (np.abs(w) * 4 + np.abs(b)) + 1e-6
    ok, err, note = close(run.get(out, (M, d), np.float32), ref, bound, "layernorm")
    res.append(Result("layernorm_f32", f"M{M} d{d}", ok, err, "2e-6 (4|w|+|b|)", note))
    return res


def rope_tables(theta, hd, npos):
    """cos/sin tables (npos, hd/2) float32 from float64 angles, as the GPU backend builds them."""
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(npos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def case_rope(run, rng, M, H, hd, style):
    from runtime.numpy_backend import NumpyBackend
    x = rng.standard_normal((M, H, hd)).astype(np.float32)
    pos = rng.integers(0, 300, M).astype(np.int32)
    c, s = rope_tables(10000.0, hd, 300)
    xa = run.put(x)
    npairs = M * H * hd // 2
    run.launch("ops.ptx", "rope_f32", (cdiv(npairs, 256), 1, 1), (256, 1, 1),
               [xa, run.put(pos), run.put(c), run.put(s), npairs, H, hd, 0 if style == "adjacent" else 1])
    ref = x.copy()
    NumpyBackend().rope(ref, pos, 10000.0, style)
    ok, note = exact(run.get(xa, (M, H, hd), np.float32), ref, "rope")
    return [Result("rope_f32", f"M{M} H{H} hd{hd} {style}", ok, 0.0, "exact", note)]


def case_embed(run, rng, M, V, d, p):
    res = []
    table = rng.standard_normal((V, d)).astype(np.float32)
    ids = rng.integers(0, V, M).astype(np.int32)
    out = run.out((M, d), np.float32)
    run.launch("ops.ptx", "embed_f32", (M, 1, 1), (128, 1, 1), [out, run.put(table), run.put(ids), d])
    ok, note = exact(run.get(out, (M, d), np.float32), table[ids], "embed")
    res.append(Result("embed_f32", f"M{M} V{V} d{d}", ok, 0.0, "exact", note))
    lin = PackedLinear.from_quant(quantize_weights(table, p, 32, asymmetric=True))
    out = run.out((M, d), np.float32)
    run.launch("ops.ptx", "embed_packed", (M, 1, 1), (128, 1, 1),
               [out, run.put(lin.planes), run.put(lin.scales), run.put(lin.offsets), run.put(ids), p, V,
                lin.planes.shape[2], d, 32, lin.scales.shape[1]])
    ref = lin.dequantize()[ids]
    ok, err, note = close(run.get(out, (M, d), np.float32), ref, 1e-6 * np.abs(ref) + 1e-7, "embed_packed")
    res.append(Result("embed_packed", f"M{M} V{V} d{d} p{p}", ok, err, "1e-6 rel", note))
    src = rng.standard_normal((M, 12)).astype(np.float32)
    cache = rng.standard_normal((M + 5, 12)).astype(np.float32)
    pos = rng.permutation(M + 5)[:M].astype(np.int32)
    ca = run.put(cache)
    run.launch("ops.ptx", "kv_store", (M, 1, 1), (128, 1, 1), [ca, run.put(src), run.put(pos), 12])
    ref = cache.copy()
    ref[pos] = src
    ok, note = exact(run.get(ca, cache.shape, np.float32), ref, "kv_store")
    res.append(Result("kv_store", f"M{M} row12", ok, 0.0, "exact", note))
    return res


def case_argmax(run, rng, n):
    x = rng.standard_normal(n).astype(np.float32)
    k = int(rng.integers(0, n))
    x[k] = 10.0
    x[min(n - 1, k + 1 + int(rng.integers(0, 5)))] = 10.0        # a tie: the first index wins
    o = run.out((2,), np.uint32)
    run.launch("ops.ptx", "argmax_f32", (1, 1, 1), (1024, 1, 1), [o, run.put(x), n])
    got = run.get(o, (2,), np.uint32)
    ok = int(got[0]) == int(np.argmax(x))
    return [Result("argmax_f32", f"n{n}", ok, 0.0, "exact", "" if ok else f"{got[0]} != {np.argmax(x)}")]


def case_attention(run, rng, M, T, H, Hkv, hd, masked):
    from runtime.numpy_backend import NumpyBackend
    q = rng.standard_normal((M, H, hd)).astype(np.float32)
    kc = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    vc = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    qpos = np.arange(T - M, T).astype(np.int32)
    mask = (rng.random(T) > 0.3) if masked else None
    if masked:
        mask[0] = True
    out = run.out((M, H, hd), np.float32)
    run.launch("ops.ptx", "attention_f32", (H, M, 1), (32, 1, 1),
               [out, run.put(q), run.put(kc), run.put(vc), run.put(qpos),
                None if mask is None else run.put(mask.astype(np.uint8)), H, Hkv, hd, T, 1.0 / math.sqrt(hd)])
    ref = NumpyBackend().attention(q.astype(np.float64), kc.astype(np.float64), vc.astype(np.float64),
                                   T, qpos, mask)
    ok, err, note = close(run.get(out, (M, H, hd), np.float32), ref, 2e-5 * (1 + np.abs(ref)), "attention")
    return [Result("attention_f32", f"M{M} T{T} H{H}/{Hkv} hd{hd}{' mask' if masked else ''}", ok, err,
                   "2e-5 (1+|o|)", note)]


def case_rows(run, rng, M, K, block, width):
    """copy_cols_f32 (a column range of each row) and hadamard_f32 (block rotation, in place and not)."""
    from loader.rotation import hadamard_blocks
    x = rng.standard_normal((M, K)).astype(np.float32) * 3
    res = []
    col0 = K - width - 1
    out = run.out((M, width), np.float32)
    run.launch("rows.ptx", "copy_cols_f32", (cdiv(M * width, 256), 1, 1), (256, 1, 1),
               [out, run.put(x), M, K, col0, width])
    ok, note = exact(run.get(out, (M, width), np.float32), x[:, col0:col0 + width], "copy_cols")
    res.append(Result("copy_cols_f32", f"M{M} K{K} [{col0}:+{width}]", ok, 0.0, "exact", note))
    ref = hadamard_blocks(x, block)
    scale = np.float32(1.0 / np.sqrt(block))
    for inplace in (False, True):
        xa = run.put(x)
        out = xa if inplace else run.out((M, K), np.float32)
        run.launch("rows.ptx", "hadamard_f32", (K // block, M, 1), (256, 1, 1), [out, xa, K, block, scale],
                   smem=4 * block)
        ok, note = exact(run.get(out, (M, K), np.float32), ref, "hadamard")
        res.append(Result("hadamard_f32", f"M{M} K{K} b{block}{' in place' if inplace else ''}", ok, 0.0,
                          "exact", note))
    return res


def ref_sample(logits, T, top_k, top_p, u):
    """(token, kept, u margin, top-p margin) of engine/sampling.Sampler's rule in float64 for a given
    uniform u. Margins: how far u lies from the nearest boundary of the normalized cdf, and how far top_p
    lies from the cumulative sums on either side of its crossing (1 when top-p is off)."""
    z = np.asarray(logits, np.float64) / T
    keep = np.ones(z.size, bool)
    if top_k and top_k < z.size:
        keep = z >= np.partition(z, -top_k)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p_margin = 1.0
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order]) / p.sum()
        j = int(np.searchsorted(cum, top_p))
        keep &= p >= p[order[j]]
        p_margin = min(cum[j] - top_p, top_p - cum[j - 1] if j else 1.0)
        p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p) / p.sum()
    tok = int(np.searchsorted(cdf, u, side="right"))
    u_margin = float(np.abs(cdf[p > 0] - u).min())
    return tok, int(keep.sum()), u_margin, float(p_margin)


def case_sample(run, rng, V, T, top_k, top_p, draws=3):
    """sample_f32 against ref_sample: the same token and the same kept count for fresh u (draws whose u
    lies within 1e-4 of a boundary, where float32 rounding may decide, are redrawn)."""
    x = (rng.standard_normal(V) * 2.5).astype(np.float32)
    xa = run.put(x)
    while top_p < 1.0 and ref_sample(x, T, top_k, top_p, 0.5)[3] < 1e-4:
        top_p = round(top_p + 0.001, 6)          # a cumulative sum too close to top_p: move off it
    res = []
    for _ in range(draws):
        while True:
            u = float(np.float32(rng.random()))
            tok, kept, margin, _ = ref_sample(x, T, top_k, top_p, u)
            if margin > 1e-4:
                break
        o = run.out((2,), np.uint32)
        run.launch("sample.ptx", "sample_f32", (1, 1, 1), (1024, 1, 1), [o, xa, V, T, top_k, top_p, u])
        got = run.get(o, (2,), np.uint32)
        ok = (int(got[0]), int(got[1])) == (tok, kept)
        res.append(Result("sample_f32", f"V{V} T{T} k{top_k} p{top_p} u{u:.3f}", ok, 0.0, "exact",
                          "" if ok else f"token/kept {int(got[0])}/{int(got[1])}, expected {tok}/{kept}"))
    return res


# ---- the list of cases ----------------------------------------------------------------------------

def cases(quick: bool):
    """[(label, fn(run, rng) -> list[Result])]. quick: the small shapes the interpreter tests use."""
    out = []

    def add(f, *a):
        out.append((f"{f.__name__}{a}", lambda run, rng: _as_list(f(run, rng, *a))))

    add(case_actquant, 3, 300, 4, 64, False)
    add(case_actquant, 1, 160, 8, 1 << 30, True)
    add(case_actquant, 2, 96, 2, 32, False)
    add(case_gemv_a16, 1, 24, 300, 4, 32, True)
    add(case_gemv_a16, 3, 40, 160, 3, 32, False)
    add(case_gemv_a16, 5, 8, 96, 8, 96, False)
    add(case_gemv_a16, 6, 16, 128, 3, 32, True)             # 4 token rows per pass, residual on each
    add(case_gemv_a16_m1, 24, 300, 4, 32, True)
    add(case_gemv_a16_m1, 40, 200, 2, 64, False)
    add(case_gemv_a16_m1, 8, 96, 8, 96, False)
    add(case_gemv_q, 1, 24, 300, 3, 4, 64, 32, True)
    add(case_gemv_q, 2, 40, 160, 4, 8, 32, 64, False)
    add(case_bgemm, 1, 24, 300, 2, 3, 128, 128, True)
    add(case_bgemm, 5, 40, 640, 3, 2, 128, 256, True)       # L = 128: blocks end inside 256-lane steps
    add(case_bgemm, 3, 24, 300, 4, 4, 320, 1 << 30, True)   # per channel: one block, K % 256 != 0
    add(case_bgemm, 4, 24, 384, 2, 8, 384, 384, False)      # L = 384 = 3 x 128
    add(case_elementwise, 300)
    add(case_norms, 3, 200)
    add(case_rope, 2, 3, 64, "adjacent")
    add(case_rope, 2, 3, 32, "half")
    add(case_embed, 3, 50, 96, 8)
    add(case_argmax, 3000)
    add(case_attention, 3, 7, 4, 2, 64, False)
    add(case_attention, 2, 6, 3, 3, 32, True)
    add(case_rows, 3, 192, 64, 37)
    add(case_rows, 1, 1024, 1024, 100)      # b > block size: each thread takes several pairs
    add(case_rows, 2, 24, 2, 5)
    add(case_sample, 3000, 0.8, 0, 1.0)
    add(case_sample, 3000, 1.0, 40, 1.0)
    add(case_sample, 2500, 0.7, 0, 0.9)
    add(case_sample, 1000, 1.3, 50, 0.8)
    add(case_sample, 7, 1.0, 3, 1.0)
    if not quick:
        add(case_sample, 49152, 0.7, 40, 0.95)
        add(case_rows, 2, 1536, 256, 576)
        add(case_gemv_a16, 8, 72, 1000, 5, 128, False)
        add(case_gemv_q, 8, 72, 1000, 8, 6, 128, 128, False)
        add(case_gemv_a16_m1, 72, 1000, 5, 128, False)
        add(case_bgemm, 70, 72, 1000, 4, 8, 128, 128, True)
        add(case_bgemm, 70, 40, 1000, 4, 8, 256, 128, False)
        add(case_bgemm, 17, 56, 700, 8, 8, 704, 1 << 20, False)   # per channel, G = round_up(K, 32)
        add(case_attention, 9, 40, 6, 2, 128, False)
        add(case_norms, 2, 1000)
        add(case_argmax, 49152)
    return out


def _as_list(r):
    return r if isinstance(r, list) else [r]


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
