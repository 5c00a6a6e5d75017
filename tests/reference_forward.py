"""An independent float64 NumPy forward for every decoder architecture, written from the math (no engine
code): the oracle the runtime's graph builders are checked against, itself checked against llama.cpp
(tests/test_archs_llama.py).

It takes a `SourceModel` (the loader's config and tensors) and token ids, and returns the logits of every
position. One causal pass over the whole sequence, no cache:

    x = E[ids] * embed_scale
    per layer i:
        h = rms(x) * attn_norm
        q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv        (per head; kv head of q head j: j // (H / Hkv))
        q, k = rms(q) * q_norm, rms(k) * k_norm               (qk_norm, per head)
        q, k = rope_i(q), rope_i(k)                           (config.layer_rope(i), first rope_dim dims)
        a = softmax(q k^T * q_scale + mask_i) v               (mask_i: causal, and the window of layer i)
        o = a Wo^T + bo;  o = rms(o) * attn_post_norm         (post_norms)
        x = x + o
        h = rms(x) * ffn_norm
        f = (act(h Wg^T) * (h Wu^T)) Wd^T;  f = rms(f) * ffn_post_norm   (act: silu or tanh-GELU)
        x = x + f
    logits = (rms(x) * norm) Wout^T;  logits = c tanh(logits / c)      (logit_softcap c)
"""
from __future__ import annotations

import numpy as np

from loader.source import SourceModel


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope(x: np.ndarray, pos: np.ndarray, rot: int, base: float, scale: float, factors, style: str) -> np.ndarray:
    """Rotate the first `rot` dims of each head of x (M, heads, hd). Pair j turns by
    pos / scale / factors[j] * base ** (-2j / rot); pairs are dims (2j, 2j+1) ("adjacent") or (j, j + rot/2)."""
    j = np.arange(rot // 2, dtype=np.float64)
    inv = base ** (-2.0 * j / rot) / scale
    if factors is not None:
        inv = inv / np.asarray(factors, np.float64)
    ang = pos[:, None].astype(np.float64) * inv[None, :]                # (M, rot/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    if style == "adjacent":
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        out[..., 0:rot:2], out[..., 1:rot:2] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., :rot // 2], x[..., rot // 2:rot]
        out[..., :rot // 2], out[..., rot // 2:rot] = a * cos - b * sin, a * sin + b * cos
    return out


def attention_mask(M: int, window: int) -> np.ndarray:
    """(M, M) additive mask: query p sees keys q <= p, and with a window only p - q < window."""
    p, q = np.arange(M)[:, None], np.arange(M)[None, :]
    ok = q <= p
    if window:
        ok &= (p - q) < window
    return np.where(ok, 0.0, -np.inf)


def _rows(w: np.ndarray, chunk: int = 16384):
    for lo in range(0, w.shape[0], chunk):
        yield lo, w[lo:lo + chunk].astype(np.float64)


def reference_logits(src: SourceModel, ids, cache: dict | None = None, last_only: bool = False) -> np.ndarray:
    """float64 logits (len(ids), vocab) of the whole sequence `ids` (positions 0..M-1), or (1, vocab) of
    its last position with last_only. `cache`: a dict that keeps the dequantized tensors between calls
    (float64; the (V, d) table float32), for greedy loops on a real model."""
    c = src.config
    ids = np.asarray(ids, np.int64)
    M, H, Hkv, hd = len(ids), c.n_heads, c.n_kv_heads, c.head_dim

    def f32(name):
        if cache is None:
            return src[name].load()
        if name not in cache:
            cache[name] = src[name].load()
        return cache[name]

    def t(name):
        if cache is None:
            return src[name].load().astype(np.float64)
        key = name + ":f64"
        if key not in cache:
            cache[key] = src[name].load().astype(np.float64)
        return cache[key]

    emb = f32("output" if c.tied_embeddings else "tok_embeddings")              # float32 (V, d)
    x = emb[ids].astype(np.float64) * c.embed_scale
    pos = np.arange(M)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        h = rms(x, t(p + "attn_norm"), c.norm_eps)
        q, k, v = h @ t(p + "wq").T, h @ t(p + "wk").T, h @ t(p + "wv").T
        if c.qkv_bias:
            q, k, v = q + t(p + "bq"), k + t(p + "bk"), v + t(p + "bv")
        q, k, v = q.reshape(M, H, hd), k.reshape(M, Hkv, hd), v.reshape(M, Hkv, hd)
        if c.qk_norm:
            q, k = rms(q, t(p + "q_norm"), c.norm_eps), rms(k, t(p + "k_norm"), c.norm_eps)
        base, scale, factors = c.layer_rope(i)
        q = rope(q, pos, c.rope_dim, base, scale, factors, c.rope_style)
        k = rope(k, pos, c.rope_dim, base, scale, factors, c.rope_style)
        mask = attention_mask(M, c.layer_window(i))
        group = H // Hkv
        a = np.empty((M, H, hd))
        for j in range(H):
            s = q[:, j, :] @ k[:, j // group, :].T * c.q_scale + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            a[:, j, :] = (s / s.sum(axis=1, keepdims=True)) @ v[:, j // group, :]
        o = a.reshape(M, H * hd) @ t(p + "wo").T
        if c.o_bias:
            o = o + t(p + "bo")
        if c.post_norms:
            o = rms(o, t(p + "attn_post_norm"), c.norm_eps)
        x = x + o
        h = rms(x, t(p + "ffn_norm"), c.norm_eps)
        g, u = h @ t(p + "w_gate").T, h @ t(p + "w_up").T
        f = ((gelu_tanh(g) if c.ffn_act == "gelu_tanh" else silu(g)) * u) @ t(p + "w_down").T
        if c.post_norms:
            f = rms(f, t(p + "ffn_post_norm"), c.norm_eps)
        x = x + f
    x = rms(x[-1:] if last_only else x, t("norm"), c.norm_eps)
    out = np.empty((len(x), c.vocab_size))
    w_out = emb if c.tied_embeddings else f32("output")
    for lo, w in _rows(w_out):                      # a 262144-row table in float64 pieces
        out[:, lo:lo + w.shape[0]] = x @ w.T
    if c.logit_softcap:
        out = c.logit_softcap * np.tanh(out / c.logit_softcap)
    return out


def reference_greedy(src: SourceModel, ids, n: int, cache: dict | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation of `ids` by n tokens (full recompute per token) and the logits each was picked from."""
    seq, out, picked = [int(i) for i in ids], [], []
    cache = {} if cache is None else cache
    for _ in range(n):
        z = reference_logits(src, seq, cache, last_only=True)[-1]
        tok = int(np.argmax(z))
        out.append(tok)
        picked.append(z)
        seq.append(tok)
    return out, picked


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_position(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(other)) per row."""
    lp, lq = log_softmax(np.asarray(ref, np.float64)), log_softmax(np.asarray(other, np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)
