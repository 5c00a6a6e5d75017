"""The compiled GPU program (runtime/gpu_program.py) in the PTX interpreter: no GPU needed.

It must give bitwise the logits of the op-by-op interpreter on the same backend (same kernels, same inputs),
through prefill, an eager first decode step and graph replays, and the NumPy backend's greedy tokens.
"""
import numpy as np
import pytest

import tools.kernelcheck as kc
from engine.decoder import Decoder
from loader.pack import Recipe, quantize_model
from loader.rotation import hadamard_blocks
from runtime.gpu_backend import GpuBackend
from runtime.gpu_program import Arena, GpuProgram
from runtime.numpy_backend import NumpyBackend
from tests.test_pack import tiny_llama


def sim_backend():
    return GpuBackend(dev=kc.SimDevice())


@pytest.mark.parametrize("wbits,abits,agroup,rotate", [(4, 16, None, 64), (8, 8, "token", 0)],
                         ids=["W4A16-rotated", "W8A8-token"])
@pytest.mark.slow
def test_compiled_equals_op_by_op_and_replays(wbits, abits, agroup, rotate):
    src = tiny_llama(layers=1, d=64, F=64, V=40, seed=5)
    pm = quantize_model(src, Recipe(wbits=wbits, group=32, rotate=rotate))
    ref_be, be = sim_backend(), sim_backend()
    ref = Decoder(pm, ref_be, abits=abits, agroup=agroup, interpret=True)
    fast = Decoder(pm, be, abits=abits, agroup=agroup)
    host = Decoder(pm, NumpyBackend(), abits=abits, agroup=agroup)
    assert isinstance(fast.program, GpuProgram)
    c_ref, c, c_host = ref.new_cache(), fast.new_cache(), host.new_cache()
    assert c.device
    ids, steps = [3, 7], [5, 9]
    graph = run_and_compare((fast, c), (ref, c_ref), (host, c_host), ids, steps)
    n = len(ids) + len(steps)
    np.testing.assert_array_equal(be.download(c.k[0])[:n], ref_be.download(c_ref.k[0])[:n])
    # a new cache: the graph is bound to the old one's arrays, so it is captured again
    c2 = fast.new_cache()
    fast.forward(ids, c2)
    np.testing.assert_array_equal(fast.forward([steps[0]], c2), ref.forward([steps[0]], _prefilled(ref, ids)))
    assert fast.program.graph_exec is not graph
    be.close()
    ref_be.close()


def run_and_compare(fast, ref, host, prompt, steps):
    """(decoder, cache) pairs: the compiled one must give bitwise the op-by-op logits on prefill and every
    step, close to the host backend's with the same argmax, with one graph captured and then replayed."""
    (fd, c), (rd, c_ref), (hd, c_host) = fast, ref, host
    np.testing.assert_array_equal(fd.forward(prompt, c), rd.forward(prompt, c_ref))
    hd.forward(prompt, c_host)
    graphs = []
    for tok in steps:
        got = fd.forward([tok], c)
        np.testing.assert_array_equal(got, rd.forward([tok], c_ref))
        want = hd.forward([tok], c_host)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        assert got.argmax() == want.argmax()
        graphs.append(fd.program.graph_exec)
    assert graphs[0] is not None and all(g is graphs[0] for g in graphs)     # captured once, then replayed
    return graphs[0]


def _prefilled(dec, ids):
    cache = dec.new_cache()
    dec.forward(ids, cache)
    return cache


@pytest.mark.slow
def test_all_logits_prefill_equals_per_token_rows():
    src = tiny_llama(layers=1, d=64, F=64, V=40, seed=6)
    pm = quantize_model(src, Recipe(wbits=4, group=32))
    be = sim_backend()
    fast, ref = Decoder(pm, be), Decoder(pm, NumpyBackend())
    got = fast.forward([1, 2, 3], fast.new_cache(), all_logits=True)
    want = ref.forward([1, 2, 3], ref.new_cache(), all_logits=True)
    assert got.shape == (3, 40)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    be.close()


def test_backend_layout_ops_match_numpy():
    be = sim_backend()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(be.hadamard(x, 64), hadamard_blocks(x, 64))       # host in, host out
    d = be.upload(x)
    np.testing.assert_array_equal(be.download(be.hadamard(d, 256)), hadamard_blocks(x, 256))
    np.testing.assert_array_equal(be.download(be.columns(d, 10, 33)), x[:, 10:43])
    np.testing.assert_array_equal(be.download(be.rows(d, 1, 2)), x[1:3])
    np.testing.assert_array_equal(be.download(be.reshape(d, (3, 4, 64))), x.reshape(3, 4, 64))
    with pytest.raises(ValueError, match="outside"):
        be.columns(d, 250, 10)
    with pytest.raises(ValueError, match="reshape"):
        be.reshape(d, (5, 64))
    with pytest.raises(ValueError, match="power of two"):
        be.hadamard(d, 48)
    be.arena = Arena(be.dev)
    with pytest.raises(RuntimeError, match="host array"):       # no hidden copies inside a captured step
        be.rmsnorm(x, np.ones(256, np.float32), 1e-5)
    be.arena = None
    be.close()


class FakeDev:
    """Chunks as SimArray-like views over a counter of fake addresses."""

    def __init__(self):
        self.next, self.made = 1 << 20, []

    def empty(self, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        a = kc.SimArray(None, self.next, shape, dtype)
        self.next += n + (1 << 16)
        self.made.append(n)
        return a


def test_arena_gives_the_same_addresses_after_reset_and_refuses_to_grow_when_frozen():
    dev = FakeDev()
    ar = Arena(dev, chunk=4096)
    seq = [((10,), np.float32), ((3000,), np.uint8), ((2, 600), np.float32), ((1,), np.int32)]
    first = [ar.empty(s, t) for s, t in seq]
    assert all(a.ptr % 256 == 0 for a in first) and dev.made == [4096, 4864, 4096]   # grows as asked
    spans = sorted((a.ptr, a.ptr + a.nbytes) for a in first)
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))           # no overlap
    ar.reset()
    ar.frozen = True
    again = [ar.empty(s, t) for s, t in seq]
    assert [a.ptr for a in again] == [a.ptr for a in first]
    assert [(a.shape, a.dtype) for a in again] == [(a.shape, a.dtype) for a in first]
    with pytest.raises(RuntimeError, match="captured step"):
        ar.empty((5000,), np.uint8)
    ar.frozen = False
    big = ar.empty((5000,), np.uint8)
    assert big.nbytes == 5000 and dev.made[-1] == 5120
