"""The cases of tools/kernelcheck.py: every PTX kernel beside its NumPy reference (the quantized linear
algebra here, the transformer ops in tools/kernel_cases_ops.py).

Each case draws its inputs from the rng it is given, poisons the outputs (runner.out), launches the
kernel through the runner and returns Result rows: integer paths compared exactly, float paths within a
stated bound per element. cases(quick) lists them; quick keeps the shapes the interpreter runs in CI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loader.bipolar import (PackedLinear, pack_planes, quantize_activations, quantize_weights, round_up,
                            values_of)
from runtime.driver import cdiv
from runtime.gpu_layout import chunk_code_sums, gpu_words, to_gpu_planes


# ---- helpers shared by the cases ----------------------------------------------------------------------



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


NO_KQ = (None, None, 0, 0, 0.0)      # the GEMVs' two-level arguments (sc, m, kq, S, c0): float32 tables


def residual(rng, M, N):
    """Integer-valued float32 residual rows: res + an integer product is exact in float32."""
    return rng.integers(-50, 51, (M, N)).astype(np.float32)


def _a16_inputs(rng, M, N, K, p, G, integer):
    """(weight, x): unit scales and small integer activations (exact), or random ones."""
    if integer:
        return unit_linear(rng, N, K, p, G), rng.integers(-4, 5, (M, K)).astype(np.float32)
    return random_linear(rng, N, K, p, G, asym=True), rng.standard_normal((M, K)).astype(np.float32)


def _a16_result(name, out, x, lin, K, shape, res, what):
    """Result of an A16 GEMV: exact (integer inputs, with the residual res added) or within the bound."""
    wd = lin.dequantize()
    ref = x.astype(np.float64) @ wd.T
    if res is not None:
        ok, note = exact(out, ref.astype(np.float32) + res, what)
        return Result(f"{name} int", shape, ok, 0.0, "exact", note, {"y": out})
    ok, err, note = close(out, ref, float_bound(x, wd, K), "y")
    return Result(name, shape, ok, err, "2e-6 sqrt(K) |x||w|", note)


def case_gemv_a16(run, rng, M, N, K, p, G, integer):
    lin, x = _a16_inputs(rng, M, N, K, p, G, integer)
    w, kw = weight_dev(run, lin)
    y = run.out((M, N), np.float32)
    res = residual(rng, M, N) if integer else None           # integer runs check the fused residual add
    run.launch("gemv.ptx", "gemv_a16", (cdiv(N, 4), cdiv(M, 4), 1), (128, 1, 1),
               [y, run.put(x), w["planes"], w["scales"], w["offsets"], M, N, K, kw, p, G, lin.scales.shape[1],
                None if res is None else run.put(res), *NO_KQ])
    return _a16_result("gemv_a16", run.get(y, (M, N), np.float32), x, lin, K, f"M{M} N{N} K{K} p{p} G{G}", res,
                       "res + y")


def case_gemv_a16_m1(run, rng, N, K, p, G, integer):
    """The one-token GEMV (sign-flip accumulation)."""
    lin, x = _a16_inputs(rng, 1, N, K, p, G, integer)
    w, kw = weight_dev(run, lin)
    res = residual(rng, 1, N) if integer else None
    y = run.out((1, N), np.float32) if res is None else run.put(res)      # in place: y = y + W x
    run.launch("gemv.ptx", "gemv_a16_m1", (cdiv(N, 4), 1, 1), (128, 1, 1),
               [y, run.put(x), w["planes"], w["scales"], w["offsets"], N, K, kw, p, G, lin.scales.shape[1],
                None if res is None else y, *NO_KQ])
    return _a16_result("gemv_a16_m1", run.get(y, (1, N), np.float32), x, lin, K, f"M1 N{N} K{K} p{p} G{G}", res,
                       "y + W x in place")


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
                lin.scales.shape[1], a["nga"], None if res is None else run.put(res), *NO_KQ])
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


# ---- the list of cases ----------------------------------------------------------------------------

def _as_list(r):
    return r if isinstance(r, list) else [r]


def cases(quick: bool):
    """[(label, fn(run, rng) -> list[Result])]. quick: the small shapes the interpreter tests use."""
    from tools.kernel_cases_ops import (case_argmax, case_attention, case_elementwise, case_embed, case_norms,
                                        case_rope, case_rows, case_sample)
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
    add(case_bgemm, 9, 32, 1024, 4, 8, 128, 128, True)      # 4 K steps of 256: both stages refilled
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
    from tools.kernel_cases_kq import add_cases as add_kq
    add_kq(add, quick)
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
