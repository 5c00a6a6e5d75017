"""engine/fast_decode.py (one C call per forward) against engine/decoder.py (one call per op) on the
same CPU backend: the fused path runs the same kernels in the same order, so logits and kv caches must be
bitwise equal; configurations it does not cover must fall back to the per-op path."""
import numpy as np
import pytest

from engine.decoder import ContextOverflow, Decoder
from engine.fast_decode import FastDecoder
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
def test_fused_equals_per_op(be, style, wbits, group):
    src = tiny_llama(seed=5)
    src.config.rope_style = style
    pm = quantize_model(src, Recipe(wbits=wbits, group=group))
    ref, fast = Decoder(pm, be), FastDecoder(pm, be)
    assert fast.fast
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


@pytest.mark.parametrize("recipe,abits", [(Recipe(wbits=16), 16), (Recipe(wbits=4, group=32), 8)])
def test_uncovered_configs_fall_back(be, recipe, abits):
    pm = quantize_model(tiny_llama(seed=6), recipe)
    ref, fast = Decoder(pm, be, abits=abits), FastDecoder(pm, be, abits=abits)
    assert not fast.fast
    ids = [1, 2, 3]
    np.testing.assert_array_equal(fast.forward(ids, fast.new_cache(), all_logits=True),
                                  ref.forward(ids, ref.new_cache(), all_logits=True))


def test_fused_errors(be):
    pm = quantize_model(tiny_llama(seed=7), Recipe(wbits=4, group=32))
    fast = FastDecoder(pm, be, context=8)
    with pytest.raises(ContextOverflow, match="exceed the context of 8"):
        fast.forward(list(range(9)), fast.new_cache())
    with pytest.raises(ValueError, match="out of range"):
        fast.forward([10**6], fast.new_cache())
