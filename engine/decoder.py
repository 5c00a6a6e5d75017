"""The Llama-family decoder on any backend: prefill a prompt, then one token per step.

Read top to bottom like llama2.c's run.c: weights (with shapes), the KV cache, then forward().
Linear weights are PackedLinear (bit planes) or float32 (N, K) arrays for the unquantized path; the
backend decides how to run each. q/k/v and gate/up are fused into one product each where their
recipes agree, because one call with a wider N costs less than three in decode.
"""
from __future__ import annotations

from dataclasses import dataclass

import mmap

import numpy as np

from loader.bipolar import PackedLinear, concat_rows, unpack_planes, values_of
from loader.errors import FormatError
from loader.rotation import hadamard_blocks, rotate_rows
from loader.pack import PackedModel


def _concat(lins: list[PackedLinear]) -> PackedLinear | None:
    """Stack linears along N when they share K, bits, group, parameter form, offsets and smoothing."""
    return concat_rows(lins)


class Linear:
    """One product y = x W^T on a backend, whatever the weight's form."""

    def __init__(self, backend, w, abits: int, agroup):
        self.backend, self.abits = backend, abits
        if isinstance(w, PackedLinear):
            self.h, self.float_w = backend.prepare_linear(w), None
            self.rotate = w.rotate
            self.N = w.N
            self.agroup = w.Kp if agroup == "token" else agroup
        else:
            self.h, self.float_w = None, np.ascontiguousarray(w, np.float32)
            self.rotate = 0
            self.N = w.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.float_w is not None:
            return self.backend.linear_float(self.float_w, x)
        if self.rotate:         # the weight holds W R (loader/rotation.py): feed it R x
            x = rotate_rows(self.backend, x, self.rotate)
        return self.backend.linear(self.h, x, abits=self.abits, agroup=self.agroup)


@dataclass
class Layer:
    attn_norm: np.ndarray   # (d,)
    qkv: list               # [Linear (H*hd + 2*Hkv*hd, d)] fused, or [wq, wk, wv]
    wo: Linear              # (d, H*hd)
    ffn_norm: np.ndarray    # (d,)
    gate_up: list           # [Linear (2F, d)] fused, or [w_gate, w_up]
    w_down: Linear          # (d, F)


def lazy_zeros(shape) -> np.ndarray:
    """A zero float32 array whose memory is mapped page by page on first touch, in small pages.

    Why: the cache is sized for the whole context (4096 positions: 190 MB for SmolLM2) but a generation
    touches a few hundred. np.zeros of that size asks for transparent huge pages, so each layer's first
    row written zeroes 2 MiB; measured, those faults took 0.5 ms of a 5 ms decode step whenever a row
    crossed into a new huge page. An anonymous mapping without huge pages zeroes only what is written."""
    n = int(np.prod(shape)) * 4
    mm = mmap.mmap(-1, max(n, 4))
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, np.float32, count=n // 4).reshape(shape)


class KVCache:
    """Preallocated keys and values: per layer (T, Hkv, hd) float32. Build/free as a pair.

    With a backend that offers kv_store (the GPU backend) the cache lives on the device, one array per
    layer: a step then sends only its new rows, instead of every layer's whole cache to each attention
    call. Rows past n are never read, so the device arrays need no clearing."""

    def __init__(self, n_layers: int, T: int, n_kv_heads: int, head_dim: int, backend=None):
        self.T = T
        self.device = backend is not None and hasattr(backend, "kv_store")
        if self.device:
            self.k = [backend.empty((T, n_kv_heads, head_dim)) for _ in range(n_layers)]
            self.v = [backend.empty((T, n_kv_heads, head_dim)) for _ in range(n_layers)]
        else:
            self.k = lazy_zeros((n_layers, T, n_kv_heads, head_dim))
            self.v = lazy_zeros((n_layers, T, n_kv_heads, head_dim))
        self.n = 0      # positions filled

    def store(self, backend, li: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Rows start .. start+M-1 of layer li."""
        if self.device:
            pos = np.arange(start, start + len(k), dtype=np.int32)
            backend.kv_store(self.k[li], k, pos)
            backend.kv_store(self.v[li], v, pos)
        else:
            self.k[li, start:start + len(k)] = k
            self.v[li, start:start + len(v)] = v

    def close(self) -> None:
        if self.device:
            for a in self.k + self.v:
                a.close()
        self.k = self.v = None      # host mappings go with the last view


class ContextOverflow(ValueError):
    pass


class Decoder:
    def __init__(self, pm: PackedModel, backend, *, wbits_run: int | None = None, abits: int = 16,
                 agroup=None, context: int | None = None):
        cfg = pm.config
        if cfg.arch != "llama":
            raise FormatError(f"the decoder runs Llama-family models, not {cfg.arch!r}")
        self.cfg, self.backend = cfg, backend
        self.context = min(cfg.max_seq_len, context or 4096)
        self.abits = abits

        def get(name):
            w = pm.linear(name)
            if isinstance(w, PackedLinear) and wbits_run is not None and wbits_run < w.bits:
                w = w.nested(wbits_run)
            return w

        def lin(w):
            return Linear(backend, w, abits, agroup)

        def fused(names):
            ws = [get(n) for n in names]
            if all(isinstance(w, PackedLinear) for w in ws):
                cat = _concat(ws)
                if cat is not None:
                    return [lin(cat)]
            elif all(not isinstance(w, PackedLinear) for w in ws):
                return [lin(np.concatenate([np.asarray(w, np.float32) for w in ws], axis=0))]
            return [lin(w) for w in ws]

        self.layers = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            self.layers.append(Layer(
                attn_norm=np.asarray(pm.linear(p + "attn_norm"), np.float32),
                qkv=fused([p + "wq", p + "wk", p + "wv"]),
                wo=lin(get(p + "wo")),
                ffn_norm=np.asarray(pm.linear(p + "ffn_norm"), np.float32),
                gate_up=fused([p + "w_gate", p + "w_up"]),
                w_down=lin(get(p + "w_down")),
            ))
            # the backend holds its own copies now: give back the layer's mapped file pages, so that
            # the peak memory of loading is one layer of file data, not the whole file
            pm.release_pages([p + n for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")])
        self.norm = np.asarray(pm.linear("norm"), np.float32)          # (d,)
        self.output = lin(pm.linear("output"))                          # (V, d), kept at its packed bits
        pm.release_pages(["output"])
        self._embed_src = pm.tensors.get("tok_embeddings", pm.linear("output"))  # (V, d)

    # ---- pieces ---------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Gather rows (M, d). A packed table is dequantized one row per token, never as a whole."""
        e = self._embed_src
        if not isinstance(e, PackedLinear):
            return np.asarray(e[ids], np.float32)
        codes = unpack_planes(np.ascontiguousarray(e.planes[:, ids, :]))          # (M, Kp)
        v = values_of(codes, e.bits).astype(np.float32)
        sr, orow = e.row_params(ids)
        w = np.repeat(sr, e.group, axis=1) * v
        if orow is not None:
            w += np.repeat(orow, e.group, axis=1)
        w = w[:, :e.K]
        if e.smooth is not None:          # a smoothed tied output holds W * s: undo it for the rows
            w = w / e.smooth
        if e.rotate:                      # a rotated one holds W R, and R R = I
            w = hadamard_blocks(w, e.rotate)
        return np.ascontiguousarray(w, np.float32)

    def new_cache(self) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, self.context, c.n_kv_heads, c.head_dim, self.backend)

    def _qkv(self, layer: Layer, h: np.ndarray):
        c = self.cfg
        qd, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        if len(layer.qkv) == 1:
            y = layer.qkv[0](h)
            return y[:, :qd], y[:, qd:qd + kd], y[:, qd + kd:]
        return tuple(f(h) for f in layer.qkv)

    def _gate_up(self, layer: Layer, h: np.ndarray):
        if len(layer.gate_up) == 1:
            y = layer.gate_up[0](h)
            F = y.shape[1] // 2
            return y[:, :F], y[:, F:]
        return tuple(f(h) for f in layer.gate_up)

    # ---- the forward pass -----------------------------------------------------------------------
    def forward(self, ids, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.n .. cache.n+M-1; returns logits of the last token
        (V,) or of every token (M, V)."""
        c, be = self.cfg, self.backend
        ids = np.asarray(ids, np.int64)
        M = len(ids)
        start = cache.n
        if start + M > cache.T:
            raise ContextOverflow(f"{start + M} tokens exceed the context of {cache.T}")
        if np.any(ids < 0) or np.any(ids >= c.vocab_size):
            raise ValueError(f"token id out of range 0..{c.vocab_size - 1}")
        pos = np.arange(start, start + M, dtype=np.int32)
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        x = self.embed(ids)                                                  # (M, d)
        for li, L in enumerate(self.layers):
            h = be.rmsnorm(x, L.attn_norm, c.norm_eps)
            q, k, v = self._qkv(L, h)
            q = np.ascontiguousarray(q).reshape(M, H, hd)
            k = np.ascontiguousarray(k).reshape(M, Hkv, hd)
            be.rope(q, pos, c.rope_theta, c.rope_style)
            be.rope(k, pos, c.rope_theta, c.rope_style)
            cache.store(be, li, start, k, v.reshape(M, Hkv, hd))
            a = be.attention(q, cache.k[li], cache.v[li], start + M, pos)   # (M, H, hd)
            x = be.add(x, L.wo(np.ascontiguousarray(a).reshape(M, H * hd)))
            h = be.rmsnorm(x, L.ffn_norm, c.norm_eps)
            g, u = self._gate_up(L, h)
            x = be.add(x, L.w_down(be.swiglu(np.ascontiguousarray(g), np.ascontiguousarray(u))))
        cache.n = start + M
        if not all_logits:
            x = x[-1:]
        logits = self.output(be.rmsnorm(x, self.norm, c.norm_eps))
        return logits if all_logits else logits[0]
