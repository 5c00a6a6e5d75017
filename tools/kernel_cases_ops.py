"""kernelcheck cases of the transformer ops (ops.ptx, rows.ptx, sample.ptx) against NumPy references."""
from __future__ import annotations

import math

import numpy as np

from loader.bipolar import PackedLinear, quantize_weights
from runtime.driver import cdiv
from tools.kernel_cases import Result, close, exact


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
