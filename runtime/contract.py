"""The backend contract (docs/DESIGN.md "Backend interface"): what every backend implements, and the
optional capabilities a backend declares in `capabilities` (never found by hasattr).

Arrays are float32 NumPy arrays unless a backend says otherwise (the GPU backend also takes its device
arrays). The graph executors (runtime/interpret.py, a backend's compile) call only these methods.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

# Optional capabilities:
#   "compile"    compile(graph) -> Program with run(step) -> output rows and close(): the backend runs a
#                whole graph itself (CPU: one C loop; GPU: device buffers, CUDA graphs)
#   "device_kv"  the KV cache lives on the device: empty(shape) gives its arrays, kv_store(cache, rows, pos)
#                writes rows
#   "hadamard"   hadamard(x, block): the rotation of rotated linears' inputs in the backend's own code
#   "rope_ext"   rope(..., n_rot=, freqs=): partial rotary and per-dimension frequency factors
#   "attn_ext"   attention(..., scale=, window=, softcap=): scale, sliding window, score soft-capping
#   "geglu"      geglu_tanh(a, b): gelu_tanh(a) * b
#   "prepare_rows" prepare_rows(lins, release=None) -> one handle for linears stacked along N (products
#                that share an input) without a concatenated copy; release(arrays) is told of the sources read
CAPABILITIES = ("compile", "device_kv", "hadamard", "rope_ext", "attn_ext", "geglu", "prepare_rows")


@runtime_checkable
class Backend(Protocol):
    name: str
    capabilities: frozenset

    def close(self) -> None: ...

    def prepare_linear(self, lin) -> object: ...

    def linear(self, h, x: np.ndarray, *, abits: int = 16, agroup=None, out=None) -> np.ndarray: ...

    def linear_float(self, w: np.ndarray, x: np.ndarray) -> np.ndarray: ...

    def rmsnorm(self, x, w, eps: float) -> np.ndarray: ...

    def layernorm(self, x, w, b, eps: float) -> np.ndarray: ...

    def rope(self, x: np.ndarray, pos, theta: float, style: str) -> None: ...

    def attention(self, q, k_cache, v_cache, n_ctx: int, q_pos, mask=None) -> np.ndarray: ...

    def swiglu(self, a, b) -> np.ndarray: ...       # silu(a) * b

    def gelu(self, x) -> np.ndarray: ...

    def add(self, a, b, out=None) -> np.ndarray: ...

    def argmax(self, x) -> int: ...


def has(backend, capability: str) -> bool:
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    return capability in getattr(backend, "capabilities", frozenset())
