"""The PTX kernels on a real GPU (pytest -m gpu); skipped cleanly without one.

Runs every tools.kernelcheck case (its larger shapes too) on the device with fresh random inputs and
poisoned outputs, the same cases in the interpreter with the same seed (the integer outputs must be
identical), and GpuBackend on the device against the NumPy backend. Not yet run on a GPU when written.
"""
import numpy as np
import pytest

from runtime import driver as drv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not drv.available(), reason="no CUDA GPU / driver available")]


@pytest.fixture(scope="module")
def gpu_runner():
    from tools.kernelcheck import GpuRunner
    r = GpuRunner()
    yield r
    r.close()


def _labels(quick):
    from tools.kernelcheck import cases
    return [c[0] for c in cases(quick)]


@pytest.mark.parametrize("label", _labels(False))
def test_kernel_on_gpu(gpu_runner, label):
    from tools.kernelcheck import cases
    fn = dict(cases(False))[label]
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    res = fn(gpu_runner, np.random.default_rng(seed))
    bad = [f"{r.case} {r.shape}: {r.note}" for r in res if not r.ok]
    assert not bad, f"seed {seed}: " + "; ".join(bad)


@pytest.mark.parametrize("label", _labels(True))
def test_gpu_integer_results_equal_interpreter(gpu_runner, label):
    from tools.kernelcheck import SimRunner, cases
    fn = dict(cases(True))[label]
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    on_gpu = fn(gpu_runner, np.random.default_rng(seed))
    on_sim = fn(SimRunner(), np.random.default_rng(seed))
    for g, s in zip(on_gpu, on_sim):
        assert g.ok, f"seed {seed}: {g.case} {g.shape}: {g.note}"
        for k, v in s.ints.items():
            np.testing.assert_array_equal(g.ints[k], v, err_msg=f"{g.case} {k} differs from the interpreter")


def test_backend_on_gpu_matches_numpy():
    from loader.bipolar import PackedLinear, quantize_activations, quantize_weights, ref_linear_a16
    from runtime.gpu_backend import GpuBackend
    from runtime.numpy_backend import NumpyBackend
    rng = np.random.default_rng()
    nb = NumpyBackend()
    with GpuBackend() as be:
        lin = PackedLinear.from_quant(quantize_weights(rng.standard_normal((72, 576)), 4, 128, asymmetric=True))
        h = be.prepare_linear(lin)
        for M in (1, 5, 40):
            x = rng.standard_normal((M, 576)).astype(np.float32)
            ref = ref_linear_a16(lin, x)
            np.testing.assert_allclose(be.linear(h, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            ref = quantize_activations(x, 8, 128).dequantize() @ lin.dequantize().T
            np.testing.assert_allclose(be.linear(h, x, abits=8), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        x = rng.standard_normal((4, 576)).astype(np.float32)
        w = rng.standard_normal(576).astype(np.float32)
        np.testing.assert_allclose(be.rmsnorm(x, w, 1e-5), nb.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
        q = rng.standard_normal((4, 9, 64)).astype(np.float32)
        kc = rng.standard_normal((20, 3, 64)).astype(np.float32)
        vc = rng.standard_normal((20, 3, 64)).astype(np.float32)
        pos = np.arange(16, 20, dtype=np.int32)
        np.testing.assert_allclose(be.attention(q, kc, vc, 20, pos), nb.attention(q, kc, vc, 20, pos),
                                   rtol=1e-4, atol=1e-5)
        v = rng.standard_normal(49152).astype(np.float32)
        assert be.argmax(v) == int(np.argmax(v))


@pytest.mark.parametrize("wbits,abits,agroup,rotate", [(4, 16, None, 64), (8, 8, "token", 0), (4, 8, 128, 0)])
def test_compiled_graph_on_gpu_equals_op_by_op(wbits, abits, agroup, rotate):
    """runtime/gpu_program.py on the device: the same logits, bit for bit, as the graph op by op on the
    same GPU (same kernels, deterministic), through prefill, the captured first step and replays; greedy
    tokens as the NumPy backend's."""
    from engine.decoder import Decoder
    from runtime.gpu_program import GpuProgram
    from loader.pack import Recipe, quantize_model
    from runtime.gpu_backend import GpuBackend
    from runtime.numpy_backend import NumpyBackend
    from tests.test_gpu_forward import run_and_compare
    from tests.test_pack import tiny_llama
    src = tiny_llama(layers=2, d=256, F=512, V=300, H=8, Hkv=2, seed=9)
    pm = quantize_model(src, Recipe(wbits=wbits, group=32 if agroup != 128 else 128, rotate=rotate))
    with GpuBackend() as be_ref, GpuBackend() as be:
        ref = Decoder(pm, be_ref, abits=abits, agroup=agroup, interpret=True)
        fast = Decoder(pm, be, abits=abits, agroup=agroup)
        host = Decoder(pm, NumpyBackend(), abits=abits, agroup=agroup)
        assert isinstance(fast.program, GpuProgram)
        c_ref, c, c_host = ref.new_cache(), fast.new_cache(), host.new_cache()
        prompt = [5, 17, 3, 99, 42, 0, 7, 250, 31]          # M = 9: bgemm_b1 where the groups allow
        run_and_compare((fast, c), (ref, c_ref), (host, c_host), prompt, [11, 12, 13, 14, 15, 16])
        c.close()
        c_ref.close()
