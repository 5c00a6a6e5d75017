"""The PTX kernels executed by the interpreter (tools/ptxsim) against NumPy references.

Two layers: every tools.kernelcheck case on its small shapes (each kernel alone, poisoned outputs,
integer paths exact), and runtime.gpu_backend.GpuBackend driven through the interpreter
(tools.kernelcheck.SimDevice) against the NumPy backend, op by op, as the engine calls them.
No GPU is needed; a GPU run of the same kernels is tests/test_kernels_gpu.py.
"""
import math
import zlib

import numpy as np
import pytest

from loader.bipolar import PackedLinear, quantize_activations, quantize_weights, ref_linear_a16
from runtime.gpu_backend import GpuBackend
from runtime.numpy_backend import NumpyBackend
from tools import kernelcheck as kc

CASES = kc.cases(quick=True)


@pytest.mark.parametrize("label", [c[0] for c in CASES])
def test_kernelcheck_case(label):
    fn = dict(CASES)[label]
    seed = zlib.crc32(label.encode())          # reproducible: hash() of a str changes per run
    results = fn(kc.SimRunner(), np.random.default_rng(seed))
    bad = [f"{r.case} {r.shape}: {r.note}" for r in results if not r.ok]
    assert not bad, f"seed {seed}: " + "; ".join(bad)


def test_kernelcheck_detects_a_wrong_reference():
    """The comparison can fail: a perturbed reference must be reported."""
    out = np.ones(4, np.float32)
    assert not kc.exact(out, out + np.float32(1e-7) * np.array([0, 0, 1, 0], np.float32) * 100, "y")[0]
    assert not kc.close(np.array([np.nan]), np.array([0.0]), np.array([1.0]), "y")[0]


@pytest.fixture(scope="module")
def be():
    b = GpuBackend(dev=kc.SimDevice())
    yield b
    b.close()


def _lin(rng, N, K, p, G, asym=True, smooth=False):
    w = rng.standard_normal((N, K))
    sm = rng.uniform(0.5, 2, K).astype(np.float32) if smooth else None
    return PackedLinear.from_quant(quantize_weights(w, p, G, asymmetric=asym), sm)


@pytest.mark.parametrize("M,N,K,p,G,smooth", [(1, 24, 300, 4, 32, False), (6, 40, 200, 3, 64, True)])
def test_backend_linear_a16(be, M, N, K, p, G, smooth):
    rng = np.random.default_rng(M * 7 + K)
    lin = _lin(rng, N, K, p, G, smooth=smooth)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = be.linear(be.prepare_linear(lin), x)
    assert be.last_path == ("gemv_a16_m1" if M == 1 else "gemv_a16")
    ref = ref_linear_a16(lin, x)                   # divides by lin.smooth itself (float64)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("M,N,K,p,q,G,ga,path", [
    (2, 24, 300, 4, 8, 64, None, "gemv_q"),
    (12, 40, 300, 4, 8, 128, None, "bgemm_b1"),
    (9, 24, 260, 3, 6, 128, 32, "gemv_q"),         # Ga = 32 < 128: not for the tensor-core path
])
def test_backend_linear_quant(be, M, N, K, p, q, G, ga, path):
    rng = np.random.default_rng(M + K + q)
    lin = _lin(rng, N, K, p, G)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = be.linear(be.prepare_linear(lin), x, abits=q, agroup=ga)
    assert be.last_path == path
    xq = quantize_activations(x, q, G if ga is None else ga).dequantize()
    ref = xq @ lin.dequantize().T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_backend_ops_match_numpy(be):
    rng = np.random.default_rng(5)
    nb = NumpyBackend()
    x = rng.standard_normal((3, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    np.testing.assert_allclose(be.rmsnorm(x, w, 1e-5), nb.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(be.layernorm(x, w, b, 1e-12), nb.layernorm(x, w, b, 1e-12), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(be.swiglu(x, x[::-1].copy()), nb.swiglu(x, x[::-1].copy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(be.gelu(x), nb.gelu(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(be.add(x, x[0]), x + x[0])
    v = rng.standard_normal(5000).astype(np.float32)
    assert be.argmax(v) == int(np.argmax(v))
    for style in ("adjacent", "half"):
        q = rng.standard_normal((3, 2, 32)).astype(np.float32)
        pos = np.array([0, 7, 300], np.int32)
        a, r = q.copy(), q.copy()
        be.rope(a, pos, 10000.0, style)
        nb.rope(r, pos, 10000.0, style)
        np.testing.assert_array_equal(a, r)


@pytest.mark.parametrize("masked", [False, True])
def test_backend_attention(be, masked):
    rng = np.random.default_rng(11 + masked)
    M, T, H, Hkv, hd = 3, 9, 6, 2, 64
    q = rng.standard_normal((M, H, hd)).astype(np.float32)
    kc_ = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    vc = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    pos = np.arange(T - M, T).astype(np.int32)
    mask = (rng.random(T) > 0.4) if masked else None
    if masked:
        mask[0] = True
    got = be.attention(q, kc_, vc, T, pos, mask)
    ref = NumpyBackend().attention(q, kc_, vc, T, pos, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_backend_device_arrays_and_replay(be):
    """A tiny 'decode step' on device arrays: captured launches replay to the same result."""
    rng = np.random.default_rng(3)
    lin = _lin(rng, 16, 64, 4, 32)
    h = be.prepare_linear(lin)
    x = be.upload(rng.standard_normal((1, 64)).astype(np.float32))
    w = be.upload(np.ones(64, np.float32))
    state = {}

    def step():
        state["n"] = be.rmsnorm(x, w, 1e-5)
        state["y"] = be.linear(h, state["n"])

    g = be.capture_graph(step)
    first = be.download(state["y"]).copy()
    be.dev.run.mem.write(state["y"].ptr, np.full((1, 16), np.nan, np.float32))
    g.replay()
    np.testing.assert_array_equal(be.download(state["y"]), first)
    n = NumpyBackend().rmsnorm(be.download(x), np.ones(64, np.float32), 1e-5)
    np.testing.assert_allclose(first, ref_linear_a16(lin, n), rtol=1e-4, atol=1e-4)


def test_sampling_rule_of_the_kernel_is_the_host_samplers():
    """kernelcheck.ref_sample (what sample_f32 computes) picks the token engine/sampling.Sampler picks
    for the same seed, since Sampler's choice draws exactly one u = rng.random()."""
    from engine.sampling import Sampler, SamplingParams
    rng = np.random.default_rng(5)
    checked = 0
    for seed in range(40):
        x = (rng.standard_normal(500) * 2).astype(np.float32)
        T, k, p = [(0.8, 0, 1.0), (1.0, 20, 1.0), (0.7, 0, 0.9), (1.2, 50, 0.8)][seed % 4]
        u = np.random.default_rng(seed).random()
        tok, _, um, pm = kc.ref_sample(x, T, k, p, u)
        if min(um, pm) < 1e-6:
            continue
        assert Sampler(SamplingParams(temperature=T, top_k=k, top_p=p, seed=seed))(x, []) == tok, seed
        checked += 1
    assert checked >= 35


@pytest.mark.parametrize("M,abits,G,path", [(1, 16, 32, "gemv_a16_m1"), (3, 16, 32, "gemv_a16"),
                                            (2, 8, 32, "gemv_q"), (12, 8, 128, "bgemm_b1")])
def test_backend_linear_residual_is_bitwise_the_separate_add(be, M, abits, G, path):
    rng = np.random.default_rng(M + abits)
    lin = _lin(rng, 40, 256, 4, G)
    h = be.prepare_linear(lin)
    x = rng.standard_normal((M, 256)).astype(np.float32)
    r = rng.standard_normal((M, 40)).astype(np.float32)
    fused = be.linear(h, x, abits=abits, residual=r)
    assert be.last_path == path
    np.testing.assert_array_equal(fused, be.add(r, be.linear(h, x, abits=abits)))
    with pytest.raises(ValueError, match="residual"):
        be.linear(h, x, abits=abits, residual=r[:, :8])
