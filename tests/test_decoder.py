"""The decoder against an independent float64 NumPy forward pass written here from the definitions."""
import numpy as np
import pytest

from engine.decoder import ContextOverflow, Decoder
from loader.pack import Recipe, quantize_model
from runtime.numpy_backend import NumpyBackend
from tests.test_pack import tiny_llama


def reference_forward(src, ids):
    """float64 Llama forward: RMSNorm, RoPE (style of the source), GQA causal attention, SwiGLU."""
    c = src.config
    W = {n: t.load().astype(np.float64) for n, t in src.tensors.items()}
    emb = W.get("tok_embeddings", W["output"])
    x = emb[np.asarray(ids)]
    T, H, Hkv, hd = len(ids), c.n_heads, c.n_kv_heads, c.head_dim

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + c.norm_eps) * w

    def rope(v):                                   # v (T, heads, hd)
        inv = c.rope_theta ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None, None] * inv[None, None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        out = v.copy()
        if c.rope_style == "adjacent":
            a, b = v[..., 0::2], v[..., 1::2]
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = v[..., :hd // 2], v[..., hd // 2:]
            out[..., :hd // 2], out[..., hd // 2:] = a * cos - b * sin, a * sin + b * cos
        return out

    for i in range(c.n_layers):
        p = f"layers.{i}."
        h = norm(x, W[p + "attn_norm"])
        bq, bk, bv = (W.get(p + b, 0.0) for b in ("bq", "bk", "bv"))      # Qwen2-style biases, if any
        q = rope((h @ W[p + "wq"].T + bq).reshape(T, H, hd))
        k = rope((h @ W[p + "wk"].T + bk).reshape(T, Hkv, hd))
        v = (h @ W[p + "wv"].T + bv).reshape(T, Hkv, hd)
        att = np.zeros((T, H, hd))
        for hh in range(H):
            kv = hh // (H // Hkv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd)
            s[np.triu_indices(T, 1)] = -np.inf
            pr = np.exp(s - s.max(-1, keepdims=True))
            att[:, hh] = (pr / pr.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, H * hd) @ W[p + "wo"].T
        h = norm(x, W[p + "ffn_norm"])
        g, u = h @ W[p + "w_gate"].T, h @ W[p + "w_up"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "w_down"].T
    return norm(x, W["norm"]) @ W["output"].T


def backends():
    out = [NumpyBackend()]
    try:
        from runtime.cpu.backend import CpuBackend
        out.append(CpuBackend(threads=2))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("style", ["adjacent", "half"])
@pytest.mark.parametrize("backend", backends(), ids=lambda b: b.name)
def test_float_path_matches_float64_reference(style, backend):
    src = tiny_llama(seed=3)
    src.config.rope_style = style
    ids = [5, 17, 3, 99, 42, 0, 7]
    ref = reference_forward(src, ids)
    dec = Decoder(quantize_model(src, Recipe(wbits=16)), backend)
    got = dec.forward(ids, dec.new_cache(), all_logits=True)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"worst relative error {rel:.2e}"


@pytest.mark.parametrize("backend", backends(), ids=lambda b: b.name)
def test_incremental_decode_equals_full_prefill(backend):
    src = tiny_llama(seed=4)
    dec = Decoder(quantize_model(src, Recipe(wbits=4, group=32)), backend)
    ids = [1, 2, 3, 4, 5, 6]
    full = dec.forward(ids, dec.new_cache(), all_logits=True)
    cache = dec.new_cache()
    dec.forward(ids[:3], cache)
    steps = [dec.forward([t], cache) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(steps), full[3:], rtol=1e-4, atol=1e-4)


def test_context_overflow_is_a_clear_error():
    dec = Decoder(quantize_model(tiny_llama(), Recipe(wbits=16)), NumpyBackend(), context=8)
    with pytest.raises(ContextOverflow, match="exceed the context of 8"):
        dec.forward(list(range(9)), dec.new_cache())
    with pytest.raises(ValueError, match="out of range"):
        dec.forward([1000], dec.new_cache())


@pytest.mark.slow
def test_real_model_float_path_matches_reference(default_gguf):
    from loader.sources import read_source
    src = read_source(default_gguf)
    ids = [504, 3458, 282, 4649, 314, 1345, 30]
    ref = reference_forward(src, ids)
    dec = Decoder(quantize_model(src, Recipe(wbits=16)), NumpyBackend())
    got = dec.forward(ids, dec.new_cache(), all_logits=True)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"worst relative error {rel:.2e}"


@pytest.mark.parametrize("wbits,abits,group,n_ids", [(4, 16, 32, 3), (8, 8, 32, 3), (4, 8, 128, 10)],
                         ids=["W4A16-gemv", "W8A8-gemv_q", "W4A8-bgemm"])
@pytest.mark.slow
def test_engine_on_gpu_backend_in_interpreter_matches_cpu(wbits, abits, group, n_ids):
    """The whole decoder on GpuBackend, its kernels executed by the PTX interpreter (no GPU needed):
    same logits as the NumPy backend, and the same greedy tokens."""
    import tools.kernelcheck as kc
    from runtime.gpu_backend import GpuBackend
    src = tiny_llama(layers=1, d=128, F=128, V=40, seed=5)
    pm = quantize_model(src, Recipe(wbits=wbits, group=group))
    ids = [(7 * i + 3) % 40 for i in range(n_ids)]
    ref_dec = Decoder(pm, NumpyBackend(), abits=abits)
    gpu = GpuBackend(dev=kc.SimDevice())
    gpu_dec = Decoder(pm, gpu, abits=abits)
    ref_cache = ref_dec.new_cache()
    ref = ref_dec.forward(ids, ref_cache, all_logits=True)
    paths = []
    real_linear = gpu.linear

    def spy(*a, **k):
        y = real_linear(*a, **k)
        paths.append(gpu.last_path)
        return y
    gpu.linear = spy
    cache = gpu_dec.new_cache()
    assert cache.device          # keys and values stay on the device; a step sends its new rows only
    got = gpu_dec.forward(ids, cache, all_logits=True)
    for dev, host in ((cache.k[0], ref_cache.k[0]), (cache.v[0], ref_cache.v[0])):
        n = len(ids)
        np.testing.assert_allclose(gpu.download(dev)[:n], host[:n], rtol=1e-4, atol=1e-4 * np.abs(host[:n]).max())
    cache.close()
    expect = {(16, 3): "gemv_a16", (8, 3): "gemv_q", (8, 10): "bgemm_b1"}[(abits, n_ids)]
    assert any(p.startswith(expect) for p in paths), paths
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
