"""Two-level weights (exact K-quant imports, loader/kquant.py) on the GPU kernels, run by the PTX
interpreter (no GPU needed): gemv_a16_m1, gemv_a16 and gemv_q read float16 d / dmin and the integer
sub-scales per sub-block of 16 or 32 lanes (runtime/gpu_device.GpuLinear). The reference is the source
format's own dequantization (gguf.quants.dequantize of the blocks) and a float64 product; the bound is
the one the float-table kernels are held to (tools/kernel_cases.float_bound)."""
import gguf
import numpy as np
import pytest

import tools.kernelcheck as kc
from loader.bipolar import quantize_activations
from loader.kquant import KQ_TYPES
from runtime.gpu_backend import GpuBackend
from tests.test_kquant import packed, random_blocks
from tools.kernel_cases import float_bound


@pytest.fixture(scope="module")
def be():
    b = GpuBackend(dev=kc.SimDevice())
    yield b
    b.close()


def kq_weight(kind, N, K, seed):
    """(PackedLinear, float64 (N, K) reference weights) from random blocks of a GGUF type."""
    raw = random_blocks(kind, N, K, seed)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).astype(np.float64)
    return packed(raw, kind), w


def check(y, xr, w, K):
    """y against xr @ w^T (float64) within the float-table kernels' bound."""
    ref = xr.astype(np.float64) @ w.T
    bound = float_bound(xr, w, K)
    err = np.abs(y - ref)
    assert np.isfinite(y).all() and (err <= bound).all(), f"{(err > bound).sum()} off, worst {(err / bound).max():.2f}"


# Q6_K: 16 lanes, signed sub-scales, no offset; Q4_K: 32 lanes, sub-scale and min; Q2_K: 16 lanes, nibble
# pairs (sc | m << 4) and min; Q3_K: 16 lanes signed; Q5_K; Q5_0 / Q5_1: one level (S = G = 32)
MAIN = ["Q6_K", "Q4_K", "Q2_K"]
OTHER = ["Q3_K", "Q5_K", "Q5_0", "Q5_1"]


# the prefill shape (M = 10) for the three main forms only: the others share their code paths
A16_CASES = [(k, M, p) for k in MAIN + OTHER for M, p in [(1, "gemv_a16_m1"), (3, "gemv_a16"), (10, "gemv_a16")]
             if k in MAIN or M < 10]


@pytest.mark.parametrize("kind,M,path", A16_CASES)
def test_a16(be, kind, M, path):
    N, K = (24, 512) if M == 1 else (8, 256)
    lin, w = kq_weight(kind, N, K, seed=M)
    h = be.prepare_linear(lin)
    assert h.kq and h.G == KQ_TYPES[kind][1] and h.csum is None
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = be.linear(h, x)
    assert be.last_path == path
    check(y, x, w, K)


@pytest.mark.parametrize("kind", MAIN + ["Q5_0"])
@pytest.mark.parametrize("M,q,ga", [(1, 8, None), (3, 6, 64), (10, 8, 256)])
def test_quantized_activations(be, kind, M, q, ga):
    """gemv_q for every M (two-level groups are below bgemm_b1's 128 lanes): 16-lane groups split each
    32-lane word into two popcount passes."""
    N, K = 8, 256 + 256 * (M == 1)
    lin, w = kq_weight(kind, N, K, seed=10 + M)
    h = be.prepare_linear(lin)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    y = be.linear(h, x, abits=q, agroup=ga)
    assert be.last_path == "gemv_q"
    xq = quantize_activations(x, q, 32 if ga is None else ga).dequantize()
    check(y, xq, w, K)


def test_ragged_k_and_residual(be):
    """K not a multiple of 32 lanes (the last word half empty: its second 16-lane sub-block is pad) and the
    fused residual add, on all three GEMVs."""
    N, K = 16, 256
    lin, w = kq_weight("Q2_K", N, K, seed=3)
    Kr = 240                                       # a linear over the first 240 inputs
    lin.K = Kr
    w = w[:, :Kr]
    h = be.prepare_linear(lin)
    rng = np.random.default_rng(4)
    for M, abits in ((1, 16), (3, 16), (2, 8)):
        x = rng.standard_normal((M, Kr)).astype(np.float32)
        res = rng.standard_normal((M, N)).astype(np.float32)
        y = be.linear(h, x, abits=abits, residual=res)
        xr = x if abits == 16 else quantize_activations(x, abits, 32).dequantize()
        check(y - res, xr, w, Kr)


def test_nested_weight(be):
    """The top planes of a two-level weight (d * 2^j, c0 / 2^j) on the device, against loader's float64
    dequantization of the nested weight."""
    lin, _ = kq_weight("Q6_K", 8, 256, seed=5)
    low = lin.nested(4)
    x = np.random.default_rng(5).standard_normal((1, 256)).astype(np.float32)
    y = be.linear(be.prepare_linear(low), x)
    check(y, x, low.dequantize(), 256)


def test_device_bytes_near_source(be):
    """Device bytes per weight (planes, d, dmin, sub-scales; rows padded to 256 lanes) equal the
    in-memory form's: at the source's own bits per weight or within 10% of it."""
    from tests.test_kquant import SOURCE_BPW
    for kind in MAIN + OTHER:
        lin, _ = kq_weight(kind, 8, 512, seed=6)
        h = be.prepare_linear(lin)
        bpw = 8 * h.nbytes / (8 * 512)
        assert bpw == 8 * lin.nbytes / (8 * 512)
        assert bpw <= 1.10 * SOURCE_BPW[kind], (kind, bpw, SOURCE_BPW[kind])


@pytest.mark.slow
@pytest.mark.parametrize("abits", [16, 8])
def test_model_matches_cpu_backend(abits):
    """A tiny Llama whose linears are Q6_K / Q4_K / Q2_K / Q3_K / Q5_K / Q5_0 blocks, packed at its sources'
    precisions (wbits 0: every linear exact and two-level), on GpuBackend in the interpreter against the
    CPU backend: prompt logits and a decode step within the GPU-vs-CPU tolerance of
    tests/test_decoder.py, same greedy tokens. Slow: K-quant rows need K >= 256, and the interpreter takes
    about 6 s per GEMV launch at 256 x 256 (two to three minutes per run)."""
    from engine.decoder import Decoder
    from loader.pack import Recipe, quantize_model
    from runtime.cpu import CpuBackend
    from tests.test_kquant_cpu import kq_llama

    mix = dict(wq="Q4_K", wk="Q6_K", wv="Q2_K", wo="Q3_K", w_gate="Q6_K", w_up="Q5_K", w_down="Q2_K", output="Q5_0")
    pm = quantize_model(kq_llama(mix, d=256, F=256, V=32, H=2, Hkv=1, seed=7), Recipe(wbits=0))
    assert all(pm.tensors[n].sub is not None for n in pm.info)
    gpu = GpuBackend(dev=kc.SimDevice())
    cpu = CpuBackend(threads=1)
    g, c = Decoder(pm, gpu, abits=abits), Decoder(pm, cpu, abits=abits)
    gc, cc = g.new_cache(), c.new_cache()
    ids = [3, 9, 27]
    for step in (ids, [11]):
        got = g.forward(step, gc, all_logits=True)
        want = c.forward(step, cc, all_logits=True)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    gpu.close()


@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K", "Q2_K"])
def test_same_floats_as_expanded_tables(be, kind):
    """The kernels' rebuilt (s, o) are bitwise SubScales.params(): every GEMV gives bitwise the output of
    the same weight with float32 tables per sub-block (the expanded form, G = 16 or 32)."""
    from loader.bipolar import PackedLinear
    lin, _ = kq_weight(kind, 8, 256, seed=8)
    s, o = lin.sub.params()
    flat = PackedLinear(lin.planes, s, o, lin.bits, lin.group, lin.K, lin.N)
    h2, hf = be.prepare_linear(lin), be.prepare_linear(flat)
    assert h2.kq and not hf.kq
    rng = np.random.default_rng(9)
    for M, abits in ((1, 16), (3, 16), (2, 8)):
        x = rng.standard_normal((M, 256)).astype(np.float32)
        a = be.linear(h2, x, abits=abits)
        b = be.linear(hf, x, abits=abits)
        np.testing.assert_array_equal(a, b)
