"""The compiled CPU program (runtime/cpu/program.py: the graph in one C call per step) against the
op-by-op interpreter of the same graph (runtime/interpret.py) on the same CPU backend: the C loop calls the
same kernels in the same order, so logits and kv caches must be bitwise equal; ops it does not cover run
in Python between C segments, also bitwise."""
import numpy as np
import pytest

from engine.decoder import ContextOverflow, Decoder
from loader.pack import Recipe, quantize_model
from tests.test_pack import tiny_llama

cpu = pytest.importorskip("runtime.cpu.backend")


@pytest.fixture(scope="module")
def be():
    b = cpu.CpuBackend(threads=2)
    yield b
    b.close()


@pytest.mark.parametrize("style", ["adjacent", "half"])
@pytest.mark.parametrize("wbits,group", [(4, 32), (2, 64), (8, 32)])
def test_compiled_equals_per_op(be, style, wbits, group):
    src = tiny_llama(seed=5)
    src.config.rope_style = style
    pm = quantize_model(src, Recipe(wbits=wbits, group=group))
    ref, fast = Decoder(pm, be, interpret=True), Decoder(pm, be)
    assert fast.program.python_ops == ["embed"]
    ids = [3, 9, 27, 81, 11, 2, 50]
    c0, c1 = ref.new_cache(), fast.new_cache()
    full0 = ref.forward(ids, c0, all_logits=True)
    full1 = fast.forward(ids, c1, all_logits=True)
    np.testing.assert_array_equal(full1, full0)
    for t in (4, 8, 15):
        np.testing.assert_array_equal(fast.forward([t], c1), ref.forward([t], c0))
    assert c1.n == c0.n == len(ids) + 3
    np.testing.assert_array_equal(c1.k, c0.k)
    np.testing.assert_array_equal(c1.v, c0.v)
    # a prefill split in pieces gives the last-token logits of one long prefill
    c2 = fast.new_cache()
    fast.forward(ids[:4], c2)
    np.testing.assert_array_equal(fast.forward(ids[4:], c2), full1[-1])


@pytest.mark.parametrize("isa", cpu.available_isas())
@pytest.mark.parametrize("wbits,abits,group,agroup", [(4, 8, 32, None), (8, 8, 32, None), (2, 4, 64, 32),
                                                       (3, 6, 32, "token"), (8, 3, 64, 128)])
def test_compiled_quantized_activations_equal_per_op(isa, wbits, abits, group, agroup):
    """abits < 16: the C forward quantizes each linear's input like the per-op backend call does."""
    b = cpu.CpuBackend(threads=2, isa=isa)
    try:
        pm = quantize_model(tiny_llama(seed=8), Recipe(wbits=wbits, group=group))
        ref = Decoder(pm, b, abits=abits, agroup=agroup, interpret=True)
        fast = Decoder(pm, b, abits=abits, agroup=agroup)
        assert fast.program.python_ops == ["embed"]
        ids = [5, 17, 2, 99, 31]
        c0, c1 = ref.new_cache(), fast.new_cache()
        np.testing.assert_array_equal(fast.forward(ids, c1, all_logits=True), ref.forward(ids, c0, all_logits=True))
        for t in (7, 3):
            np.testing.assert_array_equal(fast.forward([t], c1), ref.forward([t], c0))
        np.testing.assert_array_equal(c1.k, c0.k)
    finally:
        b.close()


def test_compiled_quantized_same_on_every_isa():
    pm = quantize_model(tiny_llama(seed=9), Recipe(wbits=4, group=32))
    outs = []
    for isa in cpu.available_isas():
        with cpu.CpuBackend(threads=2, isa=isa) as b:
            fast = Decoder(pm, b, abits=8)
            assert fast.program.python_ops == ["embed"]
            outs.append(fast.forward([4, 8, 15, 16, 23, 42], fast.new_cache(), all_logits=True))
    # the linears give identical integers on every isa (test_cpu_quant); attention is float SIMD whose
    # summation order differs per isa, so the logits agree to float tolerance, not bitwise
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-4, atol=1e-4 * np.abs(outs[0]).max())


@pytest.mark.parametrize("recipe,abits,quant", [(Recipe(wbits=16), 16, None), (Recipe(wbits=4, group=32), 8, "popcount")])
def test_uncovered_ops_run_in_python(recipe, abits, quant):
    be = cpu.CpuBackend(threads=2, quant=quant)
    pm = quantize_model(tiny_llama(seed=6), recipe)
    ref, fast = Decoder(pm, be, abits=abits, interpret=True), Decoder(pm, be, abits=abits)
    assert "linear" in fast.program.python_ops
    ids = [1, 2, 3]
    np.testing.assert_array_equal(fast.forward(ids, fast.new_cache(), all_logits=True),
                                  ref.forward(ids, ref.new_cache(), all_logits=True))


def test_compiled_errors(be):
    pm = quantize_model(tiny_llama(seed=7), Recipe(wbits=4, group=32))
    fast = Decoder(pm, be, context=8)
    with pytest.raises(ContextOverflow, match="exceed the context of 8"):
        fast.forward(list(range(9)), fast.new_cache())
    with pytest.raises(ValueError, match="out of range"):
        fast.forward([10**6], fast.new_cache())


@pytest.mark.parametrize("src,wbits,abits", [("Q4_1", 4, 16), ("Q4_1", 8, 8), ("Q8_0", 8, 16), ("Q4_0", 4, 4)])
def test_compiled_f16_params_equal_per_op_and_f32(src, wbits, abits):
    """Exact GGUF-like imports take float16 group parameters (runtime/cpu/params.py f16_params); the compiled
    forward still equals the per-op decoder bitwise, and both equal the float32-parameter backend."""
    from loader.bipolar import PackedLinear
    from tests.test_cpu_linear import exact_lin
    rng = np.random.default_rng(21)
    pm = quantize_model(tiny_llama(seed=10), Recipe(wbits=4, group=32))
    for name, t in list(pm.tensors.items()):
        if isinstance(t, PackedLinear):
            pm.tensors[name] = exact_lin(rng, t.N, t.K, src, wbits)
    ids = [5, 17, 2, 99, 31]
    outs = []
    for params in ("auto", "float32"):
        with cpu.CpuBackend(threads=2, params=params) as b:
            assert b.prepare_linear(pm.tensors["layers.0.wq"]).param_dtype == ("float16" if params == "auto" else "float32")
            ref, fast = Decoder(pm, b, abits=abits, interpret=True), Decoder(pm, b, abits=abits)
            assert fast.program.python_ops == ["embed"]
            c0, c1 = ref.new_cache(), fast.new_cache()
            y = fast.forward(ids, c1, all_logits=True)
            np.testing.assert_array_equal(y, ref.forward(ids, c0, all_logits=True))
            for t in (7, 3):
                step = fast.forward([t], c1)
                np.testing.assert_array_equal(step, ref.forward([t], c0))
            outs.append((y, step, c1.k.copy()))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_step_checks_its_rows(be):
    pm = quantize_model(tiny_llama(seed=7), Recipe(wbits=4, group=32))
    dec = Decoder(pm, be, context=8)
    c = dec.new_cache()
    with pytest.raises(ValueError, match="one position and one cache per token id"):
        dec.step([1, 2], [0], [c, c], [1])
    with pytest.raises(ContextOverflow, match="outside the context of 8"):
        dec.step([1], [8], [c], [0])
    with pytest.raises(ValueError, match="out of range"):
        dec.step([100], [0], [c], [0])
