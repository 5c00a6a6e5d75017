"""CPU backend linears against the float64 references of loader/bipolar.py, on every ISA path."""
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from loader.bipolar import (PackedLinear, pack_planes, quantize_activations, quantize_weights,
                            ref_linear_a16, ref_linear_quant, unpack_planes, values_of)
from runtime.cpu import CpuBackend, a16_block, available_isas
from runtime.cpu import backend as cpu_backend, build, layout

ISAS = available_isas()
_backends = {}


def backend(isa, a16="lut", i8=None):
    """i8: i8_min_bits (1: byte-code kernel at every precision, 9: table kernel only, None: default)."""
    key = (isa, a16, i8)
    if key not in _backends:
        _backends[key] = CpuBackend(threads=2, isa=isa, a16=a16, i8_min_bits=i8)
    return _backends[key]


KERNELS = {"table": 9, "bytecode": 1}


def make_lin(rng, N, K, bits, group, asym, smooth=False):
    w = rng.standard_normal((N, K)) * rng.uniform(0.5, 2.0, (N, 1))
    q = quantize_weights(w, bits, group, asymmetric=asym)
    sm = rng.uniform(0.5, 2.0, K).astype(np.float32) if smooth else None
    return PackedLinear.from_quant(q, smooth=sm)


def a16_bound(lin, x):
    """Worst-case error of the 16-bit tables: every lookup rounds by <= half a table step (step = block
    max of sum|x| over 4 lanes / 32767), L/4 lookups per plane and block, planes weighted 2^(p-1-r)."""
    x = np.asarray(x, np.float64)
    if lin.smooth is not None:
        x = x / lin.smooth.astype(np.float32).astype(np.float64)
    M, K = x.shape
    L = a16_block(lin.group)
    xp = np.zeros((M, lin.Kp))
    xp[:, :K] = np.abs(x)
    step = xp.reshape(M, lin.Kp // L, L // 4, 4).sum(-1).max(-1) / 32767.0 * 1.0001     # (M, nb)
    sw = np.repeat(np.abs(lin.scales.astype(np.float64)), lin.group // L, axis=1)         # (N, nb)
    per_block = 0.5 * (L / 4) * ((1 << lin.bits) - 1)
    slop = 1e-5 * np.abs(x) @ np.abs(lin.dequantize()).T + 1e-6
    return per_block * step @ sw.T + slop


CASES = [  # M, N, K, bits, group, asym
    (1, 64, 64, 4, 32, False), (1, 100, 200, 4, 64, True), (3, 130, 300, 2, 128, False),
    (5, 70, 96, 8, 32, True), (1, 33, 576, 1, 128, False), (2, 129, 250, None, None, True),
    (7, 65, 1000, 3, 64, False), (4, 257, 520, 5, None, False), (1, 40, 40, 6, 32, True),
    (9, 64, 160, 7, 96, True), (1, 20, 1100, 4, 512, True),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES)
def test_a16_matches_reference(isa, case, kernel):
    M, N, K, bits, group, asym = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))   # reproducible across runs
    bits = bits or int(rng.integers(1, 9))
    lin = make_lin(rng, N, K, bits, group, asym, smooth=(N % 2 == 1))
    x = rng.standard_normal((M, K)).astype(np.float32)
    be = backend(isa, i8=KERNELS[kernel])
    y = be.linear(be.prepare_linear(lin), x)
    ref = ref_linear_a16(lin, x)
    assert y.shape == (M, N) and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= a16_bound(lin, x)), np.abs(y - ref).max()
    # stated tolerance: error relative to ||x|| * ||w_row|| below 1e-4 (int8 tables gave ~1e-3)
    norm = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(lin.dequantize(), axis=1)[None]
    assert np.max(np.abs(y - ref) / norm) < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES[:6])
def test_a16_paths_agree_and_exact_f32(case, kernel):
    M, N, K, bits, group, asym = case
    rng = np.random.default_rng(7)
    lin = make_lin(rng, N, K, bits or 3, group, asym)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bes = [backend(isa, i8=KERNELS[kernel]) for isa in ISAS]
    ys = [be.linear(be.prepare_linear(lin), x) for be in bes]
    for y in ys[1:]:          # same integers; only float contraction (FMA) may differ
        np.testing.assert_allclose(y, ys[0], rtol=1e-5, atol=1e-5 * np.abs(ys[0]).max())
    be = backend(ISAS[0], "f32")
    y = be.linear(be.prepare_linear(lin), x)
    ref = ref_linear_a16(lin, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("isa", ISAS)
def test_nested_and_out(isa, kernel):
    rng = np.random.default_rng(3)
    lin8 = make_lin(rng, 90, 200, 8, 32, True)
    x = rng.standard_normal((2, 200)).astype(np.float32)
    be = backend(isa, i8=KERNELS[kernel])
    for k in (1, 2, 4, 8):
        lin = lin8.nested(k)
        h = be.prepare_linear(lin)
        out = np.full((2, 90), np.nan, np.float32)
        y = be.linear(h, x, out=out)
        assert y is out
        assert np.all(np.abs(y - ref_linear_a16(lin, x)) <= a16_bound(lin, x))
        yq = be.linear(h, x, abits=8, agroup=32)
        ref = ref_linear_quant(lin, x, 8, 32)
        np.testing.assert_allclose(yq, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 8), N=st.integers(1, 200), W=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_preprocess_roundtrip(p, N, W, seed):
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 2**32, (p, N, W), dtype=np.uint64).astype(np.uint32)
    wl = layout.preprocess(planes)
    assert wl.shape == (-(-N // 64), p, 4 * W, 64)
    np.testing.assert_array_equal(layout.unpreprocess(wl, N), planes)
    s = rng.standard_normal((N, W)).astype(np.float32)
    np.testing.assert_array_equal(layout.untile_rows(layout.tile_rows(s), N), s)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 8), N=st.integers(1, 200), W=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_codes_tiles_roundtrip(p, N, W, seed):
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 2**32, (p, N, W), dtype=np.uint64).astype(np.uint32)
    ct = layout.codes_tiles(planes)
    per = 8 // layout.container_bits(p)
    assert ct.shape == (-(-N // 64), 8 * W // per, 64, 4)
    np.testing.assert_array_equal(layout.uncodes_tiles(ct, N, p), planes)
    np.testing.assert_array_equal(layout.codes_tiles(planes, chunk_tiles=1), ct)     # built a tile at a time


def test_codes_tiles_places_codes():
    """Hand check: 4-bit code 0b1011 of row 70, lane 13 -> tile 1, row 6, super-quad 1 (lanes 8..15),
    nibble u = 1 (lanes 12..15), byte e = 1."""
    planes = np.zeros((4, 75, 1), np.uint32)
    for r, bit in enumerate((1, 0, 1, 1)):        # MSB first
        planes[r, 70, 0] = bit << 13
    ct = layout.codes_tiles(planes)
    (t, j, r, e), = np.argwhere(ct)
    assert (t, j, r, e, ct[t, j, r, e]) == (1, 1, 6, 1, 0b1011 << 4)


def _np_i8_quantize(x, K, Kp, G):
    """NumPy transcription of the activation rule of kernels_int8.c (float32 arithmetic, round half even)."""
    L = a16_block(G)
    xp = np.zeros(Kp, np.float32)
    xp[:K] = x
    blocks = xp.reshape(-1, L)
    mx = np.abs(blocks).max(1)
    inv = np.where(mx > 0, np.float32(32639.0) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[:, None]), -32639, 32639).astype(np.int64)
    return q.reshape(-1), (mx / np.float32(32639.0)).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group,K", [(1, 32, 100), (2, 64, 576), (3, 32, 96), (4, 32, 576), (5, 128, 300),
                                          (8, 32, 576), (8, 512, 1100), (6, 96, 200)])
def test_bytecode_integers(isa, bits, group, K):
    """The byte-code kernel computes y = sum_b s_w * sx_b * sum_k v_k x16_k + o * sum_g x: check it against
    that formula in float64 with the integers from NumPy, tighter than any rounding of x16 could pass."""
    rng = np.random.default_rng(bits * 1000 + K)
    M, N = 3, 130
    lin = make_lin(rng, N, K, bits, group, True)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K)).astype(np.float32)
    x[1, 5] = 0.0
    x[2, :] = 0.0 if K < 200 else x[2, :]                  # an all-zero row: scale 0, codes 0
    be = backend(isa, i8=1)
    y = be.linear(be.prepare_linear(lin), x)
    ffi, lib = build.load()
    v = values_of(unpack_planes(lin.planes), bits).astype(np.int64)          # (N, Kp)
    L = a16_block(lin.group)
    for m in range(M):
        q, sx = _np_i8_quantize(x[m], K, lin.Kp, lin.group)
        q16 = np.empty(lin.Kp, np.int16)
        sxc = np.empty(lin.Kp // L, np.float32)
        gs = np.empty(lin.Kp // lin.group, np.float32)
        assert lib.ab_i8_quantize(cpu_backend.ISAS.index(isa), ffi.cast("float *", x[m].ctypes.data), K, lin.Kp, lin.group,
                                  ffi.cast("int16_t *", q16.ctypes.data), ffi.cast("float *", sxc.ctypes.data),
                                  ffi.cast("float *", gs.ctypes.data)) == 0
        np.testing.assert_array_equal(q16, q)
        np.testing.assert_array_equal(sxc, sx)
        D = (v * q).reshape(N, -1, L).sum(-1)                                  # exact block integers
        sw = np.repeat(lin.scales.astype(np.float64), lin.group // L, axis=1)
        terms = sw * sx.astype(np.float64) * D
        gsum = np.pad(x[m].astype(np.float64), (0, lin.Kp - K)).reshape(-1, lin.group).sum(-1)
        oterms = lin.offsets.astype(np.float64) * gsum
        ref = terms.sum(1) + oterms.sum(1)
        tol = 1e-6 * (np.abs(terms).sum(1) + np.abs(oterms).sum(1)) + 1e-30
        assert np.all(np.abs(y[m] - ref) <= tol), np.max(np.abs(y[m] - ref) / tol)


def test_preprocess_places_bytes():
    """Hand check: byte c of row n lands at tile n//64, position with ROW_OF_POS == n%64."""
    planes = np.zeros((1, 70, 2), np.uint32)
    planes[0, 37, 1] = 0xAB << 8          # byte 5 of row 37
    wl = layout.preprocess(planes)
    (t, r, c, pos), = np.argwhere(wl)
    assert (t, r, c, wl[t, r, c, pos]) == (0, 0, 5, 0xAB) and layout.ROW_OF_POS[pos] == 37


_qbackends = {}


def qbackend(isa, kernel):
    if (isa, kernel) not in _qbackends:
        _qbackends[isa, kernel] = CpuBackend(threads=2, isa=isa, quant=kernel)
    return _qbackends[isa, kernel]


QCASES = [  # M, N, K, bits, abits, group, agroup, asym
    (1, 64, 64, 4, 8, 32, None, False), (3, 100, 200, 4, 8, 64, 32, True), (2, 70, 300, 2, 4, 128, "token", False),
    (5, 33, 96, 8, 8, 32, 96, True), (1, 129, 576, 1, 1, 128, 64, False), (4, 50, 250, 3, 6, None, None, True),
    (2, 65, 1000, 6, 2, 32, 256, True), (1, 17, 40, 5, 3, 32, "token", False), (6, 80, 520, 7, 5, 64, 128, False),
]


@pytest.mark.parametrize("kernel", ["bytes", "popcount"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", QCASES)
def test_quant_matches_reference_and_integers(isa, case, kernel):
    M, N, K, bits, abits, group, agroup, asym = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))   # reproducible across runs
    lin = make_lin(rng, N, K, bits, group, asym, smooth=(M % 2 == 0))
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K)).astype(np.float32)
    be = qbackend(isa, kernel)
    h = be.prepare_linear(lin)
    y, I, U, L = be.linear_quant_debug(h, x, abits, agroup)
    ag = None if agroup is None else (10**9 if agroup == "token" else agroup)
    ref = ref_linear_quant(lin, x, abits, ag)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(be.linear(h, x, abits=abits, agroup=agroup), y)
    # exact integers from unpacked codes: I = sum v_w * u_a, U = sum u_a over the valid lanes of a block
    xs = x / lin.smooth if lin.smooth is not None else x
    qa = quantize_activations(xs.astype(np.float64) if lin.smooth is None else
                              np.asarray(x, np.float64) / lin.smooth, abits, lin.group if ag is None else ag)
    u = values_of(qa.codes, abits)[:, :K]
    v = values_of(unpack_planes(lin.planes), bits)[:, :K]
    nb = lin.Kp // L
    for b in range(nb):
        sl = slice(b * L, min((b + 1) * L, K))
        np.testing.assert_array_equal(I[:, :, b], u[:, sl] @ v[:, sl].T)
        np.testing.assert_array_equal(U[:, :, b], np.broadcast_to(u[:, sl].sum(1)[:, None], (M, N)))


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 11), N=st.integers(1, 140), K=st.integers(1, 400), p=st.integers(1, 8), q=st.integers(1, 8),
       group=st.sampled_from([32, 64, 128]), agroup=st.sampled_from([None, 32, 64, 256, "token"]),
       asym=st.booleans(), seed=st.integers(0, 2**31))
def test_quant_kernels_identical_integers_and_isas(M, N, K, p, q, group, agroup, asym, seed):
    """The byte-code kernel and the popcount kernel give the same exact block integers; the byte kernel
    gives bitwise the same y on every isa path (the recovery rounds identically everywhere)."""
    rng = np.random.default_rng(seed)
    lin = make_lin(rng, N, K, p, group, asym)
    if agroup not in (None, "token") and max(agroup, group) % min(agroup, group):
        return
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K)).astype(np.float32)
    x[:, rng.integers(0, K)] *= 30
    hp = qbackend(ISAS[0], "popcount").prepare_linear(lin)
    _, Ip, Up, Lp = qbackend(ISAS[0], "popcount").linear_quant_debug(hp, x, q, agroup)
    for isa in ISAS:     # each isa's activation quantizer feeds the (portable) debug product
        hb = qbackend(isa, "bytes").prepare_linear(lin)
        _, Ib, Ub, Lb = qbackend(isa, "bytes").linear_quant_debug(hb, x, q, agroup)
        assert Lb == Lp
        np.testing.assert_array_equal(Ib, Ip)
        np.testing.assert_array_equal(Ub, Up)
    ys = [qbackend(isa, "bytes").linear(qbackend(isa, "bytes").prepare_linear(lin), x, abits=q, agroup=agroup)
          for isa in ISAS]
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])


def test_quant_word_sums():
    rng = np.random.default_rng(3)
    lin = make_lin(rng, 70, 100, 5, 32, False)
    be = qbackend(ISAS[0], "bytes")
    h = be.prepare_linear(lin)
    be._quant_weights(h)
    codes = unpack_planes(lin.planes).astype(np.int64)          # (N, Kp)
    want = 2 * codes.reshape(70, -1, 32).sum(-1)                 # (N, W)
    got = h.wpw.transpose(0, 2, 1).reshape(-1, want.shape[1])[:70]
    np.testing.assert_array_equal(got, want)
    assert not h.wpw.transpose(0, 2, 1).reshape(-1, want.shape[1])[70:].any()


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 5), K=st.integers(1, 700), q=st.integers(1, 8), ga=st.sampled_from([32, 64, 96, 128, 4096]),
       smooth=st.booleans(), seed=st.integers(0, 2**31))
def test_activation_quantizer_bit_exact(M, K, q, ga, smooth, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * rng.choice([0.0, 1e-3, 1.0, 50.0])).astype(np.float32)
    x[:, rng.integers(0, K)] *= 20       # an outlier channel
    sm = rng.uniform(0.3, 3, K).astype(np.float32) if smooth else None
    k32 = -(-K // 32) * 32
    g = min(ga, k32)
    Kp = -(-K // g) * g
    be = backend(ISAS[0])
    planes, scales, csum = be.quantize_activations(x, q, g, Kp, sm)
    xr = np.asarray(x, np.float64) / sm if smooth else x
    qa = quantize_activations(xr, q, ga)
    np.testing.assert_array_equal(planes, pack_planes(qa.codes, q))
    np.testing.assert_array_equal(scales, qa.scales)
    np.testing.assert_array_equal(csum, qa.codes.reshape(M, Kp // 32, 32).sum(-1))


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    lin = make_lin(rng, 10, 64, 4, 32, False)
    be = backend(ISAS[0])
    h = be.prepare_linear(lin)
    with pytest.raises(ValueError, match=r"\(M, 64\)"):
        be.linear(h, np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="agroup"):
        be.linear(h, np.zeros((2, 64), np.float32), abits=8, agroup=48)
    with pytest.raises(ValueError, match="abits"):
        be.linear(h, np.zeros((2, 64), np.float32), abits=9)
    with pytest.raises(ValueError, match="out"):
        be.linear(h, np.zeros((2, 64), np.float32), out=np.zeros((2, 11), np.float32))
    with pytest.raises(ValueError, match="unknown CPU isa"):
        CpuBackend(isa="sse9")


def test_linear_float():
    rng = np.random.default_rng(1)
    w, x = rng.standard_normal((30, 50)).astype(np.float32), rng.standard_normal((4, 50)).astype(np.float32)
    np.testing.assert_allclose(backend(ISAS[0]).linear_float(w, x), x.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-4, atol=1e-4)


def test_no_compiler_message(monkeypatch, tmp_path):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C compiler found: install gcc"):
        build._compile(tmp_path / "x")


def test_build_cache_key_and_env_isa(monkeypatch):
    assert len(build.build_key()) == 64 and build.build_key() == build.build_key()
    monkeypatch.setenv("ANYBIT_CPU_ISA", "portable")
    with CpuBackend(threads=1) as be:
        assert be.isa == "portable"
    with pytest.raises(RuntimeError, match="closed"):
        be.linear(be.prepare_linear(make_lin(np.random.default_rng(0), 4, 32, 2, 32, False)),
                  np.zeros((1, 32), np.float32))


# ---- float16 group parameters (runtime/cpu/params.py): exact GGUF imports read half the parameter bytes ----

def gguf_blocks(rng, N, K, ggml_type, tiny=False):
    """Random raw GGUF block fields (d, m float16 per 32 lanes; q codes), as loader.gguf_reader gives them.
    tiny: some scales are float16 subnormals and some groups all zero (d = m = 0)."""
    nb = K // 32
    d = (rng.uniform(0.002, 0.08, (N, nb)) * rng.choice([-1, 1], (N, nb)) ** (ggml_type != "Q4_1")).astype(np.float16)
    if tiny:
        d.flat[::7] = np.float16(2.0 ** -20) * np.arange(1, d.size // 7 + 2, dtype=np.float16)[: d.flat[::7].size]
        d.flat[::11] = 0
    if ggml_type == "Q8_0":
        return d, rng.integers(-128, 128, (N, K)).astype(np.int8)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    if ggml_type == "Q4_0":
        return d, q
    m = (-rng.uniform(0.0, 0.5, (N, nb))).astype(np.float16)
    if tiny:
        m.flat[::11] = 0
    return d, m, q


def exact_lin(rng, N, K, ggml_type="Q4_1", bits=None, tiny=False):
    from loader.pack import exact_import
    return PackedLinear.from_quant(exact_import(gguf_blocks(rng, N, K, ggml_type, tiny), ggml_type, bits))


_pbackends = {}


def pbackend(isa, params):
    if (isa, params) not in _pbackends:
        _pbackends[isa, params] = CpuBackend(threads=2, isa=isa, params=params)
    return _pbackends[isa, params]


@pytest.mark.parametrize("src,bits,r,k", [("Q4_1", 4, 15, 0), ("Q4_1", 8, 15, 0), ("Q4_1", 6, 15, 0),
                                          ("Q4_0", 4, 15, 8), ("Q4_0", 5, 31, 16), ("Q8_0", 8, 255, 128)])
def test_f16_params_exact_import(src, bits, r, k):
    """An exact import takes the float16 path (r as documented; Q4_0 and Q8_0 store no z, since z = -k a
    with k = 8 d / d at 4 bits, 16 at 5, 128 for Q8_0) and gives bitwise the float32 path's output on
    every isa, A16 and quantized activations, within the float64 reference's bounds."""
    rng = np.random.default_rng(bits * 7 + len(src))
    N, K, M = 130, 320, 3
    lin = exact_lin(rng, N, K, src, bits, tiny=True)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3, K)).astype(np.float32)
    ref16, refq = ref_linear_a16(lin, x), ref_linear_quant(lin, x, 8, 32)
    outs = {}
    for isa in ISAS:
        for params in ("auto", "float32"):
            be = pbackend(isa, params)
            h = be.prepare_linear(lin)
            if params == "auto":
                assert h.param_dtype == "float16" and h.f16 == r | k << 16 and h.wsc.dtype == np.float16
                nz = 1 if k else 2                      # a alone, or a and z
                assert h.wsc.nbytes + (0 if h.woff is None else h.woff.nbytes) == \
                    nz * 2 * (N + -N % 64) * (K // 32)
                assert (h.woff is None) == (k > 0)
            else:
                assert h.param_dtype == "float32" and h.f16 == 0
            y, yq = be.linear(h, x), be.linear(h, x, abits=8, agroup=32)
            assert np.all(np.abs(y - ref16) <= a16_bound(lin, x)), np.abs(y - ref16).max()
            for m in range(M):                  # decode (one row) has its own loop on AVX-512
                np.testing.assert_array_equal(be.linear(h, x[m:m + 1])[0], y[m], err_msg=f"{isa} {params} row {m}")
            np.testing.assert_allclose(yq, refq, rtol=1e-5, atol=1e-6 * np.abs(refq).max())
            outs[isa, params] = (y, yq, be.linear(h, x, abits=4, agroup="token"))
    first = outs[ISAS[0], "float32"]
    for key, o in outs.items():
        for a, b in zip(o, first):
            np.testing.assert_array_equal(a, b, err_msg=str(key))


def test_f16_params_rule():
    """Direct checks of the exactness rule against hand-computed values."""
    from runtime.cpu.params import f16_params
    d, m = np.float16(0.0312), np.float16(-0.2)
    s = np.full((1, 2), np.float32(d) / 2, np.float32)
    # Q4_1 at p = 4: a = d, z = m with r = 15 (code 0)
    a, z, r = f16_params(s, (7.5 * np.float64(d) + np.float64(m)) * np.ones((1, 2), np.float32), 4)
    assert r == 15 and a[0, 0] == d and z[0, 0] == m
    # the same at p = 8 (codes shifted by 120): o - 255 s is not a float16, r = 15 still gives z = m
    o = np.float32(7.5 * np.float64(d) + np.float64(m)) * np.ones((1, 2), np.float32)
    assert np.float16(np.float64(o[0, 0]) - 255 * np.float64(s[0, 0])) != np.float64(o[0, 0]) - 255 * np.float64(s[0, 0])
    a, z, r = f16_params(s, o, 8)
    assert r == 15 and z[0, 0] == m
    # symmetric Q8_0-like
    a, z, r = f16_params(s, None, 8)
    assert z is None and r == 255 and a[0, 0] == d
    # not exact: a scale with more than 11 significant bits, an offset that no r makes a float16, overflow
    assert f16_params(np.full((1, 1), 0.1, np.float32), None, 4) is None
    assert f16_params(s[:, :1], np.full((1, 1), 0.1, np.float32), 4) is None
    assert f16_params(np.full((1, 1), 2.0 ** 17, np.float32), None, 4) is None


@pytest.mark.parametrize("isa", ISAS)
def test_f16_params_fallback(isa):
    """Weights quantized from floats (scales not float16) keep float32 parameters and the reference bounds."""
    rng = np.random.default_rng(11)
    be = pbackend(isa, "auto")
    x = rng.standard_normal((2, 200)).astype(np.float32)
    for asym in (False, True):
        lin = make_lin(rng, 70, 200, 4, 32, asym)
        h = be.prepare_linear(lin)
        assert h.param_dtype == "float32" and h.f16 == 0 and h.wsc.dtype == np.float32
        assert np.all(np.abs(be.linear(h, x) - ref_linear_a16(lin, x)) <= a16_bound(lin, x))
    # float16 scales, but one offset that is not: the whole linear stays float32
    lin = exact_lin(rng, 70, 224, "Q4_1")
    lin.offsets[5, 3] = np.float32(0.1)
    h = be.prepare_linear(lin)
    assert h.param_dtype == "float32"
    x = rng.standard_normal((2, 224)).astype(np.float32)
    assert np.all(np.abs(be.linear(h, x) - ref_linear_a16(lin, x)) <= a16_bound(lin, x))
    # the table kernel (i8_min_bits 9) reads float32 only
    tb = backend(isa, i8=9)
    assert tb.prepare_linear(exact_lin(rng, 70, 224, "Q4_1")).param_dtype == "float32"
    with pytest.raises(ValueError, match="params"):
        CpuBackend(params="half")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_handles_drop_planes_and_rebuild_them_exactly(bits):
    """A handle keeps its kernel tiles, not the planes (a fused q|k|v's concatenated copy is freed):
    the planes it rebuilds from its tiles when a path needs them are the original ones, and the
    quantized-activation and popcount paths, which rebuild them, give the output of a fresh backend
    that kept them."""
    rng = np.random.default_rng(bits)
    lin = make_lin(rng, 70, 200, bits, 32, True)
    be = CpuBackend(threads=2)
    h = be.prepare_linear(lin)
    assert h.planes is None and not hasattr(h.lin, "planes")
    np.testing.assert_array_equal(be._planes(h), lin.planes)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    keep = CpuBackend(threads=2, quant="popcount")
    hk = keep.prepare_linear(lin)
    assert hk.planes is not None
    ref = ref_linear_quant(lin, x, 4, 32)
    np.testing.assert_allclose(be.linear(h, x, abits=4, agroup=32), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    y, *_ = be.linear_quant_debug(h, x, 4, 32, kernel="popcount")
    np.testing.assert_array_equal(y, keep.linear(hk, x, abits=4, agroup=32))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 32), (4, 128), (8, 32), (3, 64)])
def test_batched_rows_equal_rows_alone(isa, kernel, bits, group):
    """Batched decode rests on this: row m of an M-row product is bitwise the product of row m alone,
    whatever rows sit beside it (M = 2..7 and 11: every row count of a row tile, and two row tiles)."""
    rng = np.random.default_rng(bits * 100 + group)
    lin = make_lin(rng, 70, 320, bits, group, True)
    be = backend(isa, i8=KERNELS[kernel])
    h = be.prepare_linear(lin)
    for M in (2, 3, 4, 5, 6, 7, 11):
        x = (rng.standard_normal((M, 320)) * rng.uniform(0.1, 3, (M, 1))).astype(np.float32)
        y = be.linear(h, x)
        for m in range(M):
            np.testing.assert_array_equal(y[m], be.linear(h, x[m:m + 1])[0], err_msg=f"M={M} row {m}")
