"""FastDecoder: engine/decoder.py's Decoder with the whole forward pass in one backend call.

The per-op decoder makes about a dozen backend calls per layer and token; on the CPU their fixed costs
(cffi argument conversion, NumPy allocations, waking the thread pool) add up to more than the kernels of
a small model. A backend that offers `fused_model` / `fused_forward` (runtime/cpu: the C function
ab_forward; runtime/gpu_forward.py: every activation on the device, decode steps as CUDA graphs) runs
the same math - the same kernels in the same order - in one call per step, so the logits are bitwise
equal to Decoder's on that backend. Quantized activations (abits 1..8) are covered
when the backend runs them on its byte-code kernel (CpuBackend.quant == "bytes"): the C forward quantizes
each linear's input per token and group exactly as the per-op call does. Anything the fused path does not
cover (unquantized weights, unfused q/k/v, smoothing, another backend) falls back to Decoder.forward, so
FastDecoder can replace Decoder everywhere (ANYBIT_FUSED=0 in the environment forces that fallback):

    from engine.fast_decode import FastDecoder
    dec = FastDecoder(packed, backend, wbits_run=..., abits=..., agroup=..., context=...)
"""
from __future__ import annotations

import os

import numpy as np

from engine.decoder import ContextOverflow, Decoder, KVCache


class FastDecoder(Decoder):
    def __init__(self, pm, backend, **kw):
        super().__init__(pm, backend, **kw)
        self.agroup = kw.get("agroup")
        self.fused = self._build_fused()

    @property
    def fast(self) -> bool:
        """Whether forward() takes the one-call path."""
        return self.fused is not None

    def _build_fused(self):
        be, c = self.backend, self.cfg
        if os.environ.get("ANYBIT_FUSED", "1") == "0":        # the op-by-op path, for comparisons
            return None
        if not hasattr(be, "fused_model") or not be.fused_supported(self.abits):
            return None
        qd, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        layers = []
        for L in self.layers:
            if len(L.qkv) != 1 or len(L.gate_up) != 1:
                return None
            lins = {"qkv": L.qkv[0], "wo": L.wo, "gate_up": L.gate_up[0], "down": L.w_down}
            if any(f.h is None or f.h.lin.smooth is not None for f in lins.values()):
                return None
            if lins["qkv"].N != qd + 2 * kd or lins["gate_up"].N % 2:
                return None
            layers.append(dict(attn_norm=L.attn_norm, ffn_norm=L.ffn_norm,
                               **{k: f.h for k, f in lins.items()}))
        out = self.output
        if out.h is None or out.h.lin.smooth is not None:
            return None
        F = layers[0]["gate_up"].lin.N // 2 if layers else 0
        if any(L["gate_up"].lin.N != 2 * F or L["down"].lin.K != F for L in layers):
            return None
        return be.fused_model(d=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, ffn=F,
                              eps=c.norm_eps, theta=c.rope_theta, rope_style=c.rope_style, layers=layers,
                              norm=self.norm, output=out.h, abits=self.abits, agroup=self.agroup,
                              context=self.context)

    def forward(self, ids, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        if self.fused is None:
            return super().forward(ids, cache, all_logits=all_logits)
        c = self.cfg
        ids = np.asarray(ids, np.int64)
        M = len(ids)
        start = cache.n
        if start + M > cache.T:
            raise ContextOverflow(f"{start + M} tokens exceed the context of {cache.T}")
        if M == 0:
            raise ValueError("forward needs at least one token id")
        if np.any(ids < 0) or np.any(ids >= c.vocab_size):
            raise ValueError(f"token id out of range 0..{c.vocab_size - 1}")
        x = np.ascontiguousarray(self.embed(ids), np.float32)
        logits = self.backend.fused_forward(self.fused, x, cache.k, cache.v, start, all_logits)
        cache.n = start + M
        return logits if all_logits else logits[0]
