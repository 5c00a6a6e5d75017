"""CpuOps: the elementwise, normalisation, RoPE, attention and rotation ops of CpuBackend (the C kernels of
kernels_ops.c and kernels_attn.c). A mixin of CpuBackend: it uses the backend's library (_lib), thread
pool (_live_pool), isa code (_isa_code) and pointer casts (_p)."""
from __future__ import annotations

import math

import numpy as np

from runtime.cpu.errors import check as _check

# Every public op checks shapes, dtypes and scalars before its C call: the kernels trust their
# arguments (a wrong size reads or writes out of range), so a bad call must stop here as a ValueError.


def _positive_finite(v, what: str) -> float:
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {v}")
    return v


class CpuOps:
    def rmsnorm(self, x, w, eps: float) -> np.ndarray:
        x, w = self._f32(x), self._f32(w)
        M, d = self._rows(x, w)
        eps = _positive_finite(eps, "rmsnorm eps")
        out = np.empty_like(x)
        self._lib.ab_rmsnorm(self._live_pool, self._p("float *", x), self._p("float *", w), M, d, eps,
                             self._p("float *", out))
        return out

    def layernorm(self, x, w, b, eps: float) -> np.ndarray:
        x, w, b = self._f32(x), self._f32(w), self._f32(b)
        M, d = self._rows(x, w)
        if b.shape != (d,):
            raise ValueError(f"layernorm bias must be ({d},), got {b.shape}")
        eps = _positive_finite(eps, "layernorm eps")
        out = np.empty_like(x)
        self._lib.ab_layernorm(self._live_pool, self._p("float *", x), self._p("float *", w), self._p("float *", b),
                               M, d, eps, self._p("float *", out))
        return out

    def rope(self, x: np.ndarray, pos, theta: float, style: str) -> None:
        """In place on x (M, H, hd), which must be C-contiguous float32."""
        if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 3:
            raise ValueError("rope works in place on a C-contiguous float32 (M, H, hd) array")
        if style not in ("adjacent", "half"):
            raise ValueError(f"rope style must be 'adjacent' or 'half', got {style!r}")
        M, H, hd = x.shape
        if hd % 2 or hd > 1024:
            raise ValueError(f"rope head size must be even and <= 1024, got {hd}")
        theta = _positive_finite(theta, "rope theta")
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        if pos.shape != (M,):
            raise ValueError(f"rope positions must be ({M},), got {pos.shape}")
        _check(self._lib.ab_rope(self._live_pool, self._p("float *", x), self._p("int32_t *", pos), M, H, hd,
                                 theta, 0 if style == "adjacent" else 1), "rope")

    def attention(self, q, k_cache, v_cache, n_ctx: int, q_pos, mask=None) -> np.ndarray:
        """Causal (query i sees keys 0..q_pos[i]) or, with mask (T,) bool (True = real token), bidirectional
        over the unmasked keys among the first n_ctx. Grouped heads: head h reads kv head h // (H/Hkv)."""
        q, k_cache, v_cache = self._f32(q), self._f32(k_cache), self._f32(v_cache)
        if q.ndim != 3 or k_cache.ndim != 3:
            raise ValueError(f"attention needs q (M, H, hd) and caches (T, Hkv, hd), got {q.shape} and {k_cache.shape}")
        n_ctx = int(n_ctx)
        M, H, hd = q.shape
        T, Hkv, hd2 = k_cache.shape
        if v_cache.shape != k_cache.shape or hd2 != hd or H % Hkv or not 0 <= n_ctx <= T:
            raise ValueError(f"attention shapes q {q.shape}, k {k_cache.shape}, v {v_cache.shape}, n_ctx {n_ctx}")
        qp = np.ascontiguousarray(q_pos if q_pos is not None else np.zeros(M), dtype=np.int32)
        if qp.shape != (M,):
            raise ValueError(f"q_pos must be ({M},), got {qp.shape}")
        mk = None
        if mask is not None:
            mk = np.ascontiguousarray(mask, dtype=np.uint8)
            if mk.shape != (T,) and mk.shape != (n_ctx,):
                raise ValueError(f"mask must be ({T},), got {mk.shape}")
        out = np.empty_like(q)
        _check(self._lib.ab_attention(self._live_pool, self._isa_code, self._p("float *", q), self._p("float *", k_cache),
                                      self._p("float *", v_cache), M, H, Hkv, hd, int(n_ctx),
                                      self._p("int32_t *", qp), self._p("uint8_t *", mk), self._p("float *", out)),
               "attention")
        return out

    def hadamard(self, x, block: int) -> np.ndarray:
        """x R for the rotated linears (loader/rotation.py: hadamard_blocks), in C; bitwise the NumPy result."""
        y = np.array(x, dtype=np.float32, order="C", copy=True)
        K = y.shape[-1] if y.ndim else 0
        # the C side checks the block (a power of two dividing K) and refuses with CpuKernelError
        _check(self._lib.ab_hadamard_rows(self._p("float *", y), y.size // max(K, 1), K, int(block)), "hadamard")
        return y

    def swiglu(self, a, b) -> np.ndarray:
        """silu(a) * b."""
        return self._gated("swiglu", a, b)

    def geglu_tanh(self, a, b) -> np.ndarray:
        """gelu_tanh(a) * b (the graph's act_mul 'gelu_tanh')."""
        return self._gated("geglu_tanh", a, b)

    def _gated(self, name, a, b) -> np.ndarray:
        """act(a) * b by the C kernel ab_<name>."""
        a, b = self._f32(a), self._f32(b)
        if a.shape != b.shape:
            raise ValueError(f"{name} shapes differ: {a.shape} vs {b.shape}")
        out = np.empty_like(a)
        _check(getattr(self._lib, "ab_" + name)(self._live_pool, self._isa_code, self._p("float *", a),
                                                self._p("float *", b), a.size, self._p("float *", out)), name)
        return out

    def gelu(self, x) -> np.ndarray:
        """erf GELU, in place when x is a C-contiguous float32 array (returned), else on a copy."""
        x = self._f32(x)
        self._lib.ab_gelu(self._live_pool, self._p("float *", x), x.size, self._p("float *", x))
        return x

    def add(self, a, b, out=None) -> np.ndarray:
        a, b = self._f32(a), self._f32(b)
        if a.shape != b.shape:
            raise ValueError(f"add shapes differ: {a.shape} vs {b.shape}")
        if out is None:
            out = np.empty_like(a)
        elif out.shape != a.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {a.shape}")
        self._lib.ab_add(self._live_pool, self._p("float *", a), self._p("float *", b), a.size, self._p("float *", out))
        return out

    def argmax(self, x) -> int:
        x = self._f32(x).reshape(-1)
        if x.size == 0:
            raise ValueError("argmax of an empty array")
        return int(self._lib.ab_argmax(self._p("float *", x), x.size))

    @staticmethod
    def _f32(a) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    @staticmethod
    def _rows(x, w):
        if x.ndim != 2 or w.shape != (x.shape[1],):
            raise ValueError(f"norm input must be (M, d) with weight (d,), got {x.shape} and {w.shape}")
        return x.shape
