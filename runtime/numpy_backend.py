"""A pure-NumPy backend: the backend interface of docs/DESIGN.md written as plainly as possible.

It is the readable definition of every op (the C and PTX kernels are checked against the same
semantics) and a fallback where no C compiler exists. Linear weights are dequantized once to float32.
"""
from __future__ import annotations

import numpy as np

from loader.bipolar import PackedLinear, quantize_activations


class NumpyLinear:
    def __init__(self, lin: PackedLinear):
        self.lin = lin
        self.w = lin.dequantize().astype(np.float32)          # (N, K)
        self.N, self.K = lin.N, lin.K


class NumpyBackend:
    name = "numpy"

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
        if abits != 16:
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

    def rope(self, x, pos, theta, style):
        """In place. x (M, H, hd); pos (M,)."""
        M, H, hd = x.shape
        inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)       # (hd/2,)
        ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]           # (M, hd/2)
        c = np.cos(ang).astype(np.float32)[:, None, :]
        s = np.sin(ang).astype(np.float32)[:, None, :]
        if style == "adjacent":
            a, b = x[..., 0::2].copy(), x[..., 1::2].copy()
            x[..., 0::2] = a * c - b * s
            x[..., 1::2] = a * s + b * c
        elif style == "half":
            a, b = x[..., : hd // 2].copy(), x[..., hd // 2:].copy()
            x[..., : hd // 2] = a * c - b * s
            x[..., hd // 2:] = a * s + b * c
        else:
            raise ValueError(f"unknown rope style {style!r}")

    def attention(self, q, k_cache, v_cache, n_ctx, q_pos, mask=None):
        """q (M,H,hd); caches (T,Hkv,hd); query i sees keys [0, q_pos[i]] (or `mask` (n_ctx,) bool)."""
        M, H, hd = q.shape
        Hkv = k_cache.shape[1]
        rep = H // Hkv
        k = np.repeat(k_cache[:n_ctx], rep, axis=1)                         # (T, H, hd)
        v = np.repeat(v_cache[:n_ctx], rep, axis=1)
        s = np.einsum("mhd,thd->hmt", q, k) / np.sqrt(hd)                   # (H, M, T)
        if mask is not None:
            allowed = np.broadcast_to(np.asarray(mask, bool)[:n_ctx][None, :], (M, n_ctx))
        else:
            allowed = np.arange(n_ctx)[None, :] <= np.asarray(q_pos)[:, None]
        s = np.where(allowed[None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        return np.einsum("hmt,thd->mhd", p, v).astype(np.float32)

    def swiglu(self, gate, up):
        g = np.asarray(gate, np.float32)
        return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)

    def gelu(self, x):
        from math import erf, sqrt
        x = np.asarray(x, np.float32)
        return (0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))).astype(np.float32)

    def add(self, a, b, out=None):
        return np.add(a, b, out=out)

    def argmax(self, x) -> int:
        return int(np.argmax(x))
