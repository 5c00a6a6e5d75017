"""The Llama forward pass on the GPU with every activation on the device; decode steps as CUDA graphs.

engine/decoder.py drives GpuBackend op by op with host arrays: each op uploads its inputs and downloads
its result, a dozen round trips per layer and token. GpuFusedModel runs the same ops - the same kernels
with the same inputs in the same order, so its logits are bitwise those of Decoder.forward on
GpuBackend - on device arrays: a call uploads the embedded rows and positions and downloads the logits,
nothing else. It is GpuBackend's `fused_model` / `fused_forward`, the interface engine/fast_decode.py
already uses for the one-call C forward of the CPU backend.

The residual adds are fused into the GEMVs' output stores (bitwise the separate add).

A decode step (one token, last logits) is captured once as a CUDA graph and replayed: one launch call
instead of ~15 per layer. Replays rely on three things:
- memory: a step's intermediates come from an Arena, a bump allocator over chunks of pool memory reset
  at the start of every step, so each buffer has the address it was captured with and no pool call (or
  event record) happens during capture;
- inputs: the token's row and position are written into fixed device buffers before each replay;
- the cache: attention is given n_ctx = the cache length and stops at each query's position (causal),
  so one graph serves every position. A graph is bound to one KVCache's arrays and re-captured for another.
Prefill (M > 1) runs eagerly on pool memory, freeing as it goes, since its intermediates grow with M.

Untested on a GPU at the time of writing: the interpreter (tools/ptxsim) has executed it, graphs
included (SimDevice records and replays launches).
"""
from __future__ import annotations

import numpy as np

from loader.bipolar import round_up

ARENA_CHUNK = 1 << 22


class Arena:
    """Bump allocation of device arrays (views of chunks from `dev.empty`), reset per step.

    The same sequence of requests after reset() gets the same addresses. frozen: no new chunks (during
    capture, where a pool allocation would be a driver call inside the graph)."""

    def __init__(self, dev, chunk: int = ARENA_CHUNK):
        self.dev, self.chunk = dev, int(chunk)
        self.chunks: list = []
        self.i = self.off = 0
        self.frozen = False

    def reset(self) -> None:
        self.i = self.off = 0

    def empty(self, shape, dtype=np.float32):
        dt = np.dtype(dtype)
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        n = round_up(max(int(np.prod(shape, dtype=np.int64)) * dt.itemsize, 1), 256)
        while True:
            if self.i < len(self.chunks):
                c = self.chunks[self.i]
                if self.off + n <= c.nbytes:
                    v = c.view(self.off, shape, dt)
                    self.off += n
                    return v
                self.i, self.off = self.i + 1, 0
                continue
            if self.frozen:
                raise RuntimeError(f"arena: a captured step asked for {n} bytes more than its first run")
            self.chunks.append(self.dev.empty((max(n, self.chunk),), np.uint8))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def close(self) -> None:
        for c in self.chunks:
            c.close()
        self.chunks.clear()


class GpuFusedModel:
    """Device copies of the norms and rope tables, the prepared linears, and the decode graph.

    layers: dicts with attn_norm, ffn_norm (d,) and GpuLinears qkv (q|k|v fused), wo, gate_up (gate|up
    fused), down; norm (d,), output: GpuLinear (V, d)."""

    def __init__(self, be, *, d, n_heads, n_kv_heads, head_dim, ffn, eps, theta, rope_style, layers,
                 norm, output, abits=16, agroup=None, context=4096):
        if rope_style not in ("adjacent", "half"):
            raise ValueError(f"rope style must be 'adjacent' or 'half', got {rope_style!r}")
        if not (abits == 16 or 1 <= abits <= 8):
            raise ValueError(f"abits must be 1..8 or 16, got {abits!r}")
        self.be, self.d, self.H, self.Hkv, self.hd, self.F = be, d, n_heads, n_kv_heads, head_dim, ffn
        self.eps, self.theta, self.style, self.abits, self.agroup = eps, theta, rope_style, abits, agroup
        self.context = int(context)
        self._owned = []
        self.layers = [dict(L, attn_norm=self._vec(L["attn_norm"]), ffn_norm=self._vec(L["ffn_norm"]))
                       for L in layers]
        self.norm, self.output = self._vec(norm), output
        self.rope = be.rope_tables(theta, head_dim, self.context)        # every position a step can see
        self._owned += list(self.rope)
        self.arena = Arena(be.dev)
        self.graph = self.graph_key = None
        self.x_in, self.pos_in = be.dev.empty((1, d)), be.dev.empty((1,), np.int32)
        self._owned += [self.x_in, self.pos_in]
        self.step_out = None

    def _vec(self, a):
        a = np.ascontiguousarray(a, np.float32)
        if a.shape != (self.d,):
            raise ValueError(f"norm weight must be ({self.d},), got {a.shape}")
        v = self.be.upload(a)
        self._owned.append(v)
        return v

    # ---- one forward on device arrays ----------------------------------------------------------------
    def _linear(self, h, x, residual=None):
        """x W^T (+ residual, fused into the product's output store)."""
        be = self.be
        xr = be.hadamard(x, h.lin.rotate) if h.lin.rotate else x    # W R stored (loader/rotation.py): R x
        ag = h.lin.Kp if self.agroup == "token" else self.agroup
        y = be.linear(h, xr, abits=self.abits, agroup=ag, residual=residual)
        if xr is not x:
            xr.close()
        return y

    def forward_device(self, x, pos, M: int, n_ctx: int, ks, vs, last_only: bool):
        """x (M, d) and pos (M,) device arrays (x is consumed: closed unless it is the caller's
        fixed input); keys/values stored at pos; returns device logits (1 or M, V)."""
        be, H, Hkv, hd = self.be, self.H, self.Hkv, self.hd
        qd, kd = H * hd, Hkv * hd
        own_x = x is not self.x_in
        for li, L in enumerate(self.layers):
            h = be.rmsnorm(x, L["attn_norm"], self.eps)
            qkv = self._linear(L["qkv"], h)
            h.close()
            q, k, v = be.columns(qkv, 0, qd), be.columns(qkv, qd, kd), be.columns(qkv, qd + kd, kd)
            qkv.close()
            q3, k3 = be.reshape(q, (M, H, hd)), be.reshape(k, (M, Hkv, hd))
            be.rope(q3, pos, self.theta, self.style, tables=self.rope)
            be.rope(k3, pos, self.theta, self.style, tables=self.rope)
            be.kv_store(ks[li], k, pos)
            be.kv_store(vs[li], v, pos)
            k.close()
            v.close()
            a = be.attention(q3, ks[li], vs[li], n_ctx, pos)                   # (M, H, hd)
            q.close()
            x2 = self._linear(L["wo"], be.reshape(a, (M, qd)), residual=x)     # x + attention W_o^T
            a.close()
            if own_x:
                x.close()
            x, own_x = x2, True
            h = be.rmsnorm(x, L["ffn_norm"], self.eps)
            gu = self._linear(L["gate_up"], h)
            h.close()
            g, u = be.columns(gu, 0, self.F), be.columns(gu, self.F, self.F)
            gu.close()
            s = be.swiglu(g, u)
            g.close()
            u.close()
            x2 = self._linear(L["down"], s, residual=x)                        # x + ffn W_down^T
            s.close()
            x.close()
            x = x2
        last = be.rows(x, M - 1, 1) if last_only else x
        h = be.rmsnorm(last, self.norm, self.eps)
        if own_x:
            x.close()
        logits = self._linear(self.output, h)
        h.close()
        return logits

    # ---- the backend's fused_forward ------------------------------------------------------------------
    def __call__(self, x: np.ndarray, ks, vs, start: int, all_logits: bool) -> np.ndarray:
        be = self.be
        x = np.ascontiguousarray(x, np.float32)
        M = x.shape[0]
        T = ks[0].shape[0]
        if M == 1 and not all_logits:
            return self._decode_step(x, start, ks, vs, T)
        pos = be.upload(np.arange(start, start + M, dtype=np.int32))
        xd = be.upload(x)
        try:
            logits = self.forward_device(xd, pos, M, start + M, ks, vs, not all_logits)
        finally:
            pos.close()
        out = be.download(logits)
        logits.close()
        return out

    def _decode_step(self, x, start, ks, vs, T):
        be = self.be
        self.x_in.copy_from_host(x)
        self.pos_in.copy_from_host(np.array([start], np.int32))
        key = tuple(a.ptr for a in ks) + tuple(a.ptr for a in vs)
        if self.graph is not None and self.graph_key == key:
            self.graph.replay(be.dev.stream)
            return be.download(self.step_out)
        self._drop_graph()
        # first step on this cache: run it eagerly (filling the arena), then capture the same step
        self.arena.reset()
        be.arena = self.arena
        try:
            out = self.forward_device(self.x_in, self.pos_in, 1, T, ks, vs, True)
            result = be.download(out)
            self.arena.reset()
            self.arena.frozen = True
            state = {}
            self.graph = be.capture_graph(
                lambda: state.setdefault("out", self.forward_device(self.x_in, self.pos_in, 1, T, ks, vs, True)))
            self.step_out, self.graph_key = state["out"], key
        finally:
            be.arena = None
            self.arena.frozen = False
        return result

    def _drop_graph(self) -> None:
        if self.graph is not None:
            self.graph.close()
        self.graph = self.graph_key = self.step_out = None

    def close(self) -> None:
        self._drop_graph()
        self.arena.close()
        for a in self._owned:
            a.close()
        self._owned.clear()
