"""The graph (engine/graph.py): every op of the contract on the CPU program against the NumPy interpreter,
batched decode (one row per sequence, each with its own position and cache) against one sequence at a
time, and a second architecture (engine/archs/llama_bias.py) against the float64 reference of
tests/test_decoder.py."""
import numpy as np
import pytest

from engine.decoder import Decoder, Embedding, KVCache, Linear, compile_graph
from engine.graph import Builder, Step
from loader.pack import Recipe, quantize_model
from loader.source import SourceTensor
from runtime.numpy_backend import NumpyBackend
from tests.test_decoder import reference_forward
from tests.test_pack import tiny_llama

cpu = pytest.importorskip("runtime.cpu.backend")


@pytest.fixture(scope="module")
def be():
    b = cpu.CpuBackend(threads=2)
    yield b
    b.close()


def every_op_graph(W):
    """A graph that uses each op and option once (not a model: shapes chosen to exercise the options)."""
    g = Builder(W)
    x = g.buf("x", 64)
    g.embed(x, "emb")
    y = g.linear(x, "lin", g.buf("y", 64), bias="b")
    qn = g.rmsnorm(y, "qn", 1e-5, g.buf("qn", 64), group=16)                     # per head (q/k norm)
    q = g.rope(qn, g.buf("q", 64), heads=4, head_dim=16, theta=500.0, style="half", n_rot=8, freqs="ff")
    k = g.rope(g.cols(x, 0, 32), g.buf("k", 32), heads=2, head_dim=16, theta=1e4, style="adjacent")
    g.kv_store(k, g.cols(y, 32, 32), 0)
    a = g.attention(q, 0, g.buf("a", 64), heads=4, kv_heads=2, head_dim=16, scale=0.3, window=3, softcap=5.0)
    a2 = g.attention(q, 0, g.buf("a2", 64), heads=4, kv_heads=2, head_dim=16)
    a3 = g.attention(q, 0, g.buf("a3", 64), heads=4, kv_heads=2, head_dim=16, window=2)   # no soft-cap: SIMD
    h = g.act_mul(a, g.cols(y, 0, 64), g.buf("h", 64), act="gelu_tanh")
    h = g.act_mul(h, a2, g.buf("h2", 64), act="silu")
    h = g.add(h, a3, g.buf("h3", 64))
    s = g.add(g.scale(h, 8.0, g.buf("s", 64)), x, g.buf("s2", 64))
    c = g.softcap(s, 2.0, g.buf("c", 64))
    o = g.take_rows(c, g.buf("o", 64, "out"))
    return g.finish(o, kv_layers=1, kv_heads=2, head_dim=16)


def every_op_weights(backend):
    rng = np.random.default_rng(11)
    pm = quantize_model(tiny_llama(seed=4), Recipe(wbits=6, group=32))
    return {"emb": Embedding(rng.standard_normal((50, 64)).astype(np.float32)),
            "lin": Linear(backend, pm.tensors["layers.0.wq"], 16, None),
            "b": rng.standard_normal(64).astype(np.float32),
            "qn": (1 + 0.1 * rng.standard_normal(16)).astype(np.float32),
            "ff": np.array([1.0, 2.0, 4.0, 8.0], np.float32)}


def run_steps(program, graph, backend, T=16):
    """A 6-token prefill then two decode steps; returns every output."""
    cache = KVCache(graph.kv_layers, T, graph.kv_heads, graph.head_dim, backend)
    outs = [program.run(Step(np.arange(6), np.arange(6, dtype=np.int32), [cache] * 6, np.arange(6)))]
    for p, t in ((6, 9), (7, 33)):
        outs.append(program.run(Step(np.array([t]), np.array([p], np.int32), [cache], np.array([0]))))
    return outs, cache


def test_every_op_cpu_program_equals_numpy_interpreter(be):
    nb = NumpyBackend()
    g_np = every_op_graph(every_op_weights(nb))
    g_cpu = every_op_graph(every_op_weights(be))
    ref, c0 = run_steps(compile_graph(g_np, nb), g_np, nb)
    prog = compile_graph(g_cpu, be)
    assert prog.python_ops == ["embed"]          # everything else in the one C loop
    got, c1 = run_steps(prog, g_cpu, be)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(c1.k[:, :8], c0.k[:, :8], rtol=1e-5, atol=1e-5)
    # and the C program equals the op-by-op interpreter on the same backend where both use the same kernels
    assert not np.allclose(ref[0], 0)


def test_graph_check_catches_builder_mistakes():
    g = Builder({"w": np.ones(8, np.float32)})
    x = g.buf("x", 8)
    g.rmsnorm(g.cols(x, 4, 8), "w", 1e-5, x)
    with pytest.raises(ValueError, match="outside its buffer"):
        g.finish(x)
    g = Builder({})
    x = g.buf("x", 8)
    g.rmsnorm(x, "missing", 1e-5, x)
    with pytest.raises(ValueError, match="no weight 'missing'"):
        g.finish(x)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("wbits", [16, 4])
def test_batched_decode_equals_one_sequence_at_a_time(be, backend, wbits):
    """One step with a row per sequence (own position, own cache) gives each sequence's next logits."""
    b = NumpyBackend() if backend == "numpy" else be
    pm = quantize_model(tiny_llama(seed=12), Recipe(wbits=wbits, group=32))
    dec = Decoder(pm, b)
    prompts = [[3, 9, 27], [5, 1, 4, 1, 5, 9], [8]]
    nxt = [11, 22, 33]
    singles, caches = [], []
    for p, t in zip(prompts, nxt):
        c = dec.new_cache()
        dec.forward(p, c)
        singles.append(dec.forward([t], c))
        c2 = dec.new_cache()
        dec.forward(p, c2)
        caches.append(c2)
    pos = [c.n for c in caches]
    batched = dec.step(nxt, pos, caches, np.arange(3))
    # the C program on packed weights: bitwise (a served sequence's tokens must not depend on the others
    # in its batch); float weights go through BLAS, whose many-row kernels round differently
    same = np.testing.assert_array_equal if backend == "cpu" and wbits < 16 else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    for i in range(3):
        same(batched[i], singles[i])
    # and a batch with a prefill run and a decode row in one step
    c_a, c_b = dec.new_cache(), dec.new_cache()
    dec.forward(prompts[0], c_a)
    mixed = dec.step([nxt[0]] + prompts[1], [c_a.n] + list(range(6)), [c_a] + [c_b] * 6, [0, 6])
    same(mixed[0], singles[0])
    c_c = dec.new_cache()
    same(mixed[1], dec.forward(prompts[1], c_c))


def biased_llama(seed=13):
    src = tiny_llama(seed=seed)
    rng = np.random.default_rng(seed)
    c = src.config
    for i in range(c.n_layers):
        for b, n in (("bq", c.n_heads), ("bk", c.n_kv_heads), ("bv", c.n_kv_heads)):
            a = (0.5 * rng.standard_normal(n * c.head_dim)).astype(np.float32)
            src.tensors[f"layers.{i}.{b}"] = SourceTensor(f"layers.{i}.{b}", a.shape, (lambda a=a: a))
    return src


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_llama_bias_builder_matches_float64_reference(be, backend):
    b = NumpyBackend() if backend == "numpy" else be
    src = biased_llama()
    ids = [5, 17, 3, 99, 42, 0, 7]
    dec = Decoder(quantize_model(src, Recipe(wbits=16)), b, arch="llama_bias")
    got = dec.forward(ids, dec.new_cache(), all_logits=True)
    ref = reference_forward(src, ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    plain = Decoder(quantize_model(src, Recipe(wbits=16)), b)       # the biases matter
    assert not np.allclose(plain.forward(ids, plain.new_cache(), all_logits=True), ref, atol=1e-2)


def test_llama_bias_compiled_equals_interpreted_bitwise(be):
    pm = quantize_model(biased_llama(), Recipe(wbits=4, group=32))
    ref, fast = Decoder(pm, be, arch="llama_bias", interpret=True), Decoder(pm, be, arch="llama_bias")
    assert fast.program.python_ops == ["embed"]
    ids = [5, 17, 3, 99, 42]
    c0, c1 = ref.new_cache(), fast.new_cache()
    np.testing.assert_array_equal(fast.forward(ids, c1, all_logits=True), ref.forward(ids, c0, all_logits=True))
    np.testing.assert_array_equal(fast.forward([8], c1), ref.forward([8], c0))


def test_numpy_reference_of_the_new_op_options_against_loops():
    """The oracle's options (partial rotary with frequency factors, attention scale / window / soft-cap,
    GeGLU) against float64 loops written from their definitions."""
    rng = np.random.default_rng(31)
    nb = NumpyBackend()
    M, H, hd, n_rot, theta = 3, 2, 8, 4, 500.0
    x = rng.standard_normal((M, H, hd)).astype(np.float32)
    pos = np.array([0, 5, 9], np.int32)
    ff = np.array([1.0, 4.0], np.float32)
    got = x.copy()
    nb.rope(got, pos, theta, "half", n_rot=n_rot, freqs=ff)
    want = x.astype(np.float64).copy()
    for m in range(M):
        for i in range(n_rot // 2):
            ang = pos[m] * theta ** (-2 * i / n_rot) / ff[i]
            a, b = want[m, :, i].copy(), want[m, :, i + n_rot // 2].copy()
            want[m, :, i], want[m, :, i + n_rot // 2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)          # dims n_rot.. untouched
    T, Hkv, scale, window, cap = 10, 1, 0.7, 3, 2.0
    q = rng.standard_normal((M, H, hd)).astype(np.float32)
    k, v = (rng.standard_normal((T, Hkv, hd)).astype(np.float32) for _ in range(2))
    got = nb.attention(q, k, v, T, pos, scale=scale, window=window, softcap=cap)
    for m in range(M):
        for h in range(H):
            js = [j for j in range(T) if pos[m] - window < j <= pos[m]]
            s = np.array([cap * np.tanh(scale * float(q[m, h] @ k[j, 0]) / cap) for j in js])
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[m, h], (p / p.sum()) @ v[js, 0], rtol=1e-5, atol=1e-6)
    a, b = rng.standard_normal((2, 50)).astype(np.float32)
    ga = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a.astype(np.float64) ** 3)))
    np.testing.assert_allclose(nb.geglu_tanh(a, b), ga * b, rtol=1e-5, atol=1e-6)


def test_gpu_compile_refuses_ops_without_kernels_and_the_engine_interprets():
    import tools.kernelcheck as kc
    from runtime.gpu_backend import GpuBackend
    from runtime.interpret import Interpreter
    gb = GpuBackend(dev=kc.SimDevice())
    g = every_op_graph(every_op_weights(gb))
    with pytest.raises(NotImplementedError, match="no kernel for linear with a bias"):
        gb.compile(g)
    assert isinstance(compile_graph(g, gb), Interpreter)
    gb.close()


def test_every_backend_meets_the_contract_and_declares_known_capabilities(be):
    import tools.kernelcheck as kc
    from runtime.contract import CAPABILITIES, Backend, has
    from runtime.gpu_backend import GpuBackend
    gb = GpuBackend(dev=kc.SimDevice())
    for b in (NumpyBackend(), be, gb):
        assert isinstance(b, Backend), b.name
        assert set(b.capabilities) <= set(CAPABILITIES), b.name
        for c in b.capabilities:        # a declared capability has its method
            method = {"compile": "compile", "device_kv": "kv_store", "hadamard": "hadamard", "rope_ext": "rope",
                      "attn_ext": "attention", "geglu": "geglu_tanh", "prepare_rows": "prepare_rows"}[c]
            assert callable(getattr(b, method)), (b.name, c)
    assert has(be, "compile") and has(gb, "device_kv") and not has(NumpyBackend(), "compile")
    with pytest.raises(ValueError, match="unknown capability"):
        has(be, "teleport")
    gb.close()


def test_packed_embedding_rows_with_kept_rows_equal_the_dequantized_table(monkeypatch):
    # the kept (recently used) rows must give what the table holds, also after evictions and repeats
    from loader.bipolar import PackedLinear, quantize_weights
    rng = np.random.default_rng(5)
    lin = PackedLinear.from_quant(quantize_weights(rng.standard_normal((40, 64)), 4, 32, asymmetric=True))
    ref = lin.dequantize()                                    # float64 (N, K)
    monkeypatch.setattr(Embedding, "CACHE_BYTES", 3 * 4 * 64)   # keep 3 rows
    emb = Embedding(lin)
    for ids in ([5], [5, 6, 7, 5], [9, 1], [5], [39, 0, 39], list(range(40)), [2]):
        got = emb.rows(ids)
        assert got.dtype == np.float32 and got.shape == (len(ids), 64)
        np.testing.assert_allclose(got, ref[ids], rtol=1e-6, atol=1e-6)
        assert len(emb._kept) <= max(3, len(set(ids)))
