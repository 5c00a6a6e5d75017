"""CPU backend ops against NumPy float64 references written from their definitions."""
import math
import threading

import numpy as np
import pytest

from loader.bipolar import PackedLinear, quantize_weights, ref_linear_a16
from runtime.cpu import CpuBackend, available_isas


@pytest.fixture(scope="module")
def be():
    with CpuBackend(threads=2) as b:
        yield b


def close(a, ref, tol=1e-5):
    np.testing.assert_allclose(a, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


def test_rmsnorm_layernorm(be):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 77)).astype(np.float32) * 3
    w, b = rng.standard_normal(77).astype(np.float32), rng.standard_normal(77).astype(np.float32)
    xd = x.astype(np.float64)
    close(be.rmsnorm(x, w, 1e-5), xd / np.sqrt((xd ** 2).mean(1, keepdims=True) + 1e-5) * w)
    mu, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
    close(be.layernorm(x, w, b, 1e-12), (xd - mu) / np.sqrt(var + 1e-12) * w + b)


def rope_ref(x, pos, theta, style):
    M, H, hd = x.shape
    out = x.astype(np.float64).copy()
    i = np.arange(hd // 2)
    ang = pos[:, None].astype(np.float64) * theta ** (-2.0 * i / hd)          # (M, hd/2)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    i0, i1 = (2 * i, 2 * i + 1) if style == "adjacent" else (i, i + hd // 2)
    a, b = out[..., i0].copy(), out[..., i1].copy()
    out[..., i0], out[..., i1] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("style", ["adjacent", "half"])
def test_rope(be, style):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 17, 3000], np.int32)
    ref = rope_ref(x, pos, 10000.0, style)
    be.rope(x, pos, 10000.0, style)
    close(x, ref, 1e-5)
    with pytest.raises(ValueError, match="style"):
        be.rope(x, pos, 10000.0, "rotary")


def attn_ref(q, k, v, n_ctx, qpos, mask):
    M, H, hd = q.shape
    Hkv = k.shape[1]
    out = np.zeros((M, H, hd))
    for m in range(M):
        for h in range(H):
            kh = h // (H // Hkv)
            vis = np.arange(n_ctx)
            vis = vis[mask[:n_ctx]] if mask is not None else vis[vis <= qpos[m]]
            if len(vis) == 0:
                continue
            s = k[vis, kh].astype(np.float64) @ q[m, h] / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[m, h] = p @ v[vis, kh] / p.sum()
    return out


@pytest.fixture(scope="module", params=available_isas())
def isa_be(request):
    with CpuBackend(threads=2, isa=request.param) as b:
        yield b


@pytest.mark.parametrize("M,H,Hkv,T,n_ctx,masked,hd", [
    (1, 9, 3, 40, 17, False, 32), (5, 4, 4, 8, 8, False, 64), (6, 6, 2, 10, 7, True, 24),
    (3, 2, 1, 50, 50, False, 40), (1, 9, 3, 700, 613, False, 64), (2, 3, 1, 300, 300, True, 80),
    (2, 2, 2, 37, 37, False, 128), (1, 2, 1, 5, 5, False, 6),
    # more query heads than a task scores in one pass (16), a kv head's run split between passes, more query
    # heads per kv head than a value pass takes (4), and 7 per kv head over several chunks
    (1, 32, 8, 60, 45, False, 64), (2, 20, 4, 40, 33, True, 48), (1, 14, 2, 300, 290, False, 64)])
def test_attention(isa_be, M, H, Hkv, T, n_ctx, masked, hd):
    """Every isa path (vector exp, masked tails, keys beyond one vector, head groupings) against float64."""
    rng = np.random.default_rng(M * 100 + T + hd)
    q = (rng.standard_normal((M, H, hd)) * 2).astype(np.float32)
    k = (rng.standard_normal((T, Hkv, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    qpos = np.arange(n_ctx - M, n_ctx, dtype=np.int32)
    mask = None
    if masked:
        mask = np.zeros(T, bool)
        mask[: n_ctx - 2] = True
        mask[::7] = False
    close(isa_be.attention(q, k, v, n_ctx, qpos, mask), attn_ref(q, k, v, n_ctx, qpos, mask), 1e-5)


def test_attention_all_masked_row_is_zero(isa_be):
    q = np.ones((1, 2, 16), np.float32)
    kv = np.ones((4, 1, 16), np.float32)
    out = isa_be.attention(q, kv, kv, 4, np.array([3], np.int32), np.zeros(4, bool))
    assert out.shape == (1, 2, 16) and not out.any()


@pytest.mark.parametrize("n", [1, 7, 8, 17, 1536, 40003])
def test_swiglu_every_isa(isa_be, n):
    """Vector exp paths (and their scalar tails) against float64, including large |g| where exp overflows."""
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 6).astype(np.float32)
    g[: min(n, 4)] = np.array([100.0, -100.0, 0.0, -88.5], np.float32)[: min(n, 4)]
    u = rng.standard_normal(n).astype(np.float32)
    gd = g.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = gd / (1 + np.exp(-gd)) * u
    close(isa_be.swiglu(g, u), ref)


@pytest.mark.parametrize("n", [1, 17, 2048, 40003])
def test_geglu_tanh_every_isa(isa_be, n):
    """gelu_tanh(g) * u (the vector path's g / (1 + exp(-2t)) form, the scalar tanh form) against float64,
    large |g| included."""
    rng = np.random.default_rng(n + 5)
    g = (rng.standard_normal(n) * 4).astype(np.float32)
    g[: min(n, 4)] = np.array([60.0, -60.0, 0.0, 1e-6], np.float32)[: min(n, 4)]
    u = rng.standard_normal(n).astype(np.float32)
    gd = g.astype(np.float64)
    ref = 0.5 * gd * (1 + np.tanh(np.sqrt(2 / np.pi) * (gd + 0.044715 * gd ** 3))) * u
    close(isa_be.geglu_tanh(g, u), ref)


def test_elementwise_and_argmax(be):
    rng = np.random.default_rng(2)
    g, u = rng.standard_normal((3, 40000)).astype(np.float32), rng.standard_normal((3, 40000)).astype(np.float32)
    gd = g.astype(np.float64)
    close(be.swiglu(g, u), gd / (1 + np.exp(-gd)) * u)
    close(be.add(g, u), gd + u)
    out = np.empty_like(g)
    assert be.add(g, u, out=out) is out
    erf = np.vectorize(math.erf)
    ref = 0.5 * gd * (1 + erf(gd / math.sqrt(2)))
    y = g.copy()
    assert be.gelu(y) is y
    close(y, ref)
    x = rng.standard_normal(49152).astype(np.float32)
    x[123] = x[40000] = 99.0
    assert be.argmax(x) == 123 == int(np.argmax(x))


@pytest.mark.parametrize("threads", [1, 3])
def test_pool_sizes_and_host_threads(threads):
    """Repeated calls on pools of several sizes, from several Python threads at once (GIL released)."""
    rng = np.random.default_rng(4)
    lin = PackedLinear.from_quant(quantize_weights(rng.standard_normal((300, 256)), 4, 64))
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ref = ref_linear_a16(lin, x)
    with CpuBackend(threads=threads, isa=available_isas()[-1]) as be:
        h = be.prepare_linear(lin)
        first = be.linear(h, x)
        assert np.abs(first - ref).max() < 0.05 * np.abs(ref).max()
        bad = []

        def work():
            for _ in range(50):
                if not np.array_equal(be.linear(h, x), first):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not bad
