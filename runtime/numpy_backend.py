"""A pure-NumPy backend: the backend interface of docs/DESIGN.md written as plainly as possible.

It is the readable definition of every op (the C and PTX kernels are checked against the same
semantics) and a fallback where no C compiler exists. Linear weights are dequantized once to float32.
"""
from __future__ import annotations

import numpy as np

from loader.bipolar import PackedLinear, quantize_activations
from loader.precision import Q8
from runtime.act_q8 import check_q8_block, q8_values


class NumpyLinear:
    def __init__(self, lin: PackedLinear):
        self.lin = lin
        self.w = lin.dequantize().astype(np.float32)          # (N, K)
        self.N, self.K = lin.N, lin.K


class NumpyBackend:
    name = "numpy"
    capabilities = frozenset({"rope_ext", "attn_ext", "geglu"})

    def __init__(self, threads: int | None = None):
        self.threads = threads or 1

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- linear algebra -----------------------------------------------------------------------
    def prepare_linear(self, lin: PackedLinear) -> NumpyLinear:
        return NumpyLinear(lin)

    def linear(self, h: NumpyLinear, x: np.ndarray, *, abits: int = 16, agroup: int | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if h.lin.smooth is not None:
            x = x / h.lin.smooth
        if abits == Q8:
            x = q8_values(x, check_q8_block(agroup)).astype(np.float32)
        elif abits != 16:
            qa = quantize_activations(x, abits, h.lin.group if agroup is None else agroup)
            x = qa.dequantize().astype(np.float32)
        y = x @ h.w.T
        if out is not None:
            out[...] = y
            return out
        return y

    def linear_float(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ np.asarray(w, np.float32).T

    # ---- elementwise and normalisation ---------------------------------------------------------
    def rmsnorm(self, x, w, eps):
        x = np.asarray(x, np.float32)
        r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return (x * r * w).astype(np.float32)

    def layernorm(self, x, w, b, eps):
        x = np.asarray(x, np.float32)
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)

    def rope(self, x, pos, theta, style, n_rot=None, freqs=None):
        """In place. x (M, H, hd); pos (M,). The first n_rot (default hd) dims of each head rotate;
        freqs: per-pair divisors of the frequencies (Llama 3's rope_freqs), or None."""
        M, H, hd = x.shape
        n = hd if n_rot is None else int(n_rot)
        inv = theta ** (-np.arange(0, n, 2, dtype=np.float64) / n)         # (n/2,)
        if freqs is not None:
            inv = inv / np.asarray(freqs, np.float64)
        ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]           # (M, n/2)
        c = np.cos(ang).astype(np.float32)[:, None, :]
        s = np.sin(ang).astype(np.float32)[:, None, :]
        if style == "adjacent":
            a, b = x[..., 0:n:2].copy(), x[..., 1:n:2].copy()
            x[..., 0:n:2] = a * c - b * s
            x[..., 1:n:2] = a * s + b * c
        elif style == "half":
            a, b = x[..., : n // 2].copy(), x[..., n // 2:n].copy()
            x[..., : n // 2] = a * c - b * s
            x[..., n // 2:n] = a * s + b * c
        else:
            raise ValueError(f"unknown rope style {style!r}")

    def attention(self, q, k_cache, v_cache, n_ctx, q_pos, mask=None, *, scale=None, window=0, softcap=0.0):
        """q (M,H,hd); caches (T,Hkv,hd); query i sees keys [0, q_pos[i]] (or `mask` (n_ctx,) bool), and
        with window > 0 only the last `window` of them; scores scaled by `scale` (default 1/sqrt(hd)),
        then soft-capped to (-softcap, softcap) when softcap > 0."""
        M, H, hd = q.shape
        Hkv = k_cache.shape[1]
        rep = H // Hkv
        k = np.repeat(k_cache[:n_ctx], rep, axis=1)                         # (T, H, hd)
        v = np.repeat(v_cache[:n_ctx], rep, axis=1)
        s = np.einsum("mhd,thd->hmt", q, k)                                 # (H, M, T)
        s = s / np.sqrt(hd) if scale is None else s * scale
        if softcap:
            s = np.tanh(s / softcap) * softcap
        if mask is not None:
            allowed = np.broadcast_to(np.asarray(mask, bool)[:n_ctx][None, :], (M, n_ctx))
        else:
            qp = np.asarray(q_pos)[:, None]
            t = np.arange(n_ctx)[None, :]
            allowed = (t <= qp) & ((t > qp - window) if window else True)
        s = np.where(allowed[None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        return np.einsum("hmt,thd->mhd", p, v).astype(np.float32)

    def swiglu(self, a, b):
        """silu(a) * b."""
        g = np.asarray(a, np.float32)
        return (g / (1.0 + np.exp(-g)) * b).astype(np.float32)

    def geglu_tanh(self, a, b):
        """gelu with the tanh approximation (Gemma's GeGLU) times b."""
        a = np.asarray(a, np.float32)
        g = 0.5 * a * (1.0 + np.tanh(np.float32(0.7978845608028654) * (a + np.float32(0.044715) * a * a * a)))
        return (g * b).astype(np.float32)

    def gelu(self, x):
        from math import erf, sqrt
        x = np.asarray(x, np.float32)
        return (0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))).astype(np.float32)

    def add(self, a, b, out=None):
        return np.add(a, b, out=out)

    def argmax(self, x) -> int:
        return int(np.argmax(x))
