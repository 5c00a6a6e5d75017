"""Run a graph (engine/graph.py) op by op through a backend's per-op methods on host arrays.

This is the NumPy backend's executor (NumpyBackend.compile: the readable reference and the oracle of the
tests), the executor of any backend without a compiler (the GPU's host-array ops), and the CPU program's
fallback for the few ops its C loop does not run (float weights, the popcount kernel). It knows op kinds
and buffers only: a weight is whatever the engine put in the graph's table (a linear has .h or .float_w,
.rotate, .abits, .agroup; an embedding has .rows(ids)), a KV cache is an object with k, v arrays
(planes, T, kv_heads, head_dim) on the host, or a device array per plane when .device is set.
"""
from __future__ import annotations

import numpy as np

from loader.bipolar import quantize_activations
from loader.precision import Q8
from runtime.act_q8 import q8_values
from loader.rotation import rotate_rows
from runtime.contract import has

_HOST = []          # the NumPy backend, made on first need


def ext(be, capability: str):
    """`be` where it implements the optional `capability` (runtime/contract.py), else the NumPy backend:
    an op variant the backend has no kernel for (the GPU's partial or scaled RoPE, windowed attention,
    GeGLU) runs on the host, on the same host buffers, rather than not at all."""
    if has(be, capability):
        return be
    if not _HOST:
        from runtime.numpy_backend import NumpyBackend
        _HOST.append(NumpyBackend())
    return _HOST[0]


def host(a) -> np.ndarray:
    """A host view of a KV cache plane (a device array is downloaded: the slow path of the fallback)."""
    return a.to_host() if hasattr(a, "to_host") else a


def view(env: dict, r):
    """The (rows, n) view of Ref r in the step's buffers."""
    a = env[r.buf]
    return a if (r.col == 0 and r.n == a.shape[1]) else a[:, r.col:r.col + r.n]


def alloc(graph, M: int, R: int) -> dict:
    return {b.name: np.zeros((M if b.rows == "tokens" else R, b.cols), np.float32) for b in graph.bufs.values()}


def linear(be, lin, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    if lin.float_w is not None:
        if lin.act_quant:       # simulate quantized activations on a float weight (abits < 16 measured alone)
            bits, group = lin.act_quant
            x = (q8_values(x, group) if bits == Q8 else
                 quantize_activations(x, bits, group).dequantize()[:, :x.shape[1]]).astype(np.float32)
        return be.linear_float(lin.float_w, x)
    if lin.rotate:              # the weight holds W R (loader/rotation.py): feed it R x
        x = rotate_rows(be, x, lin.rotate)
    return be.linear(lin.h, x, abits=lin.abits, agroup=lin.agroup)


def run_op(be, graph, op, env: dict, step) -> None:
    """Execute one op record; the result is written into its output view."""
    k, p, W = op.kind, op.p, graph.weights
    out = view(env, op.out)
    ins = [view(env, r) for r in op.ins]
    M = out.shape[0]
    if k == "embed":
        out[...] = W[op.weights[0]].rows(step.ids, step.pos)
    elif k == "rmsnorm":
        x, g = np.ascontiguousarray(ins[0]), p["group"]
        if g:
            out[...] = be.rmsnorm(x.reshape(-1, g), W[op.weights[0]], p["eps"]).reshape(x.shape)
        else:
            out[...] = be.rmsnorm(x, W[op.weights[0]], p["eps"])
    elif k == "layernorm":
        out[...] = be.layernorm(np.ascontiguousarray(ins[0]), W[op.weights[0]], W[op.weights[1]], p["eps"])
    elif k == "linear":
        y = linear(be, W[op.weights[0]], ins[0])
        if len(op.weights) > 1:
            y = y + W[op.weights[1]]
        out[...] = y
    elif k == "rope":
        H, hd = p["heads"], p["head_dim"]
        x = np.array(ins[0], np.float32, order="C").reshape(M, H, hd)
        extra = {}
        rb = be
        if p["n_rot"] != hd or op.weights:
            extra = dict(n_rot=p["n_rot"], freqs=W[op.weights[0]] if op.weights else None)
            rb = ext(be, "rope_ext")
        rb.rope(x, step.pos, p["theta"], p["style"], **extra)
        out[...] = x.reshape(M, H * hd)
    elif k == "kv_store":
        kv, hd, li = graph.kv_heads, graph.head_dim, p["cache"]
        for r0, n in step.runs():
            c, pos = step.caches[r0], step.pos[r0:r0 + n]
            kk = np.ascontiguousarray(ins[0][r0:r0 + n]).reshape(n, kv, hd)
            vv = np.ascontiguousarray(ins[1][r0:r0 + n]).reshape(n, kv, hd)
            if getattr(c, "device", False):
                be.kv_store(c.k[li], kk, pos)
                be.kv_store(c.v[li], vv, pos)
            else:
                c.k[li, pos] = kk
                c.v[li, pos] = vv
    elif k == "attention":
        H, hd, li = p["heads"], p["head_dim"], p["cache"]
        extra, ab = {}, be
        if p["scale"] is not None or p["window"] or p["softcap"]:
            extra = dict(scale=p["scale"], window=p["window"], softcap=p["softcap"])
            ab = ext(be, "attn_ext")
        for r0, n in step.runs():
            c, pos = step.caches[r0], step.pos[r0:r0 + n]
            q = np.ascontiguousarray(ins[0][r0:r0 + n]).reshape(n, H, hd)
            kc, vc = (c.k[li], c.v[li]) if ab is be else (host(c.k[li]), host(c.v[li]))
            a = ab.attention(q, kc, vc, int(pos.max()) + 1, pos, **extra)
            out[r0:r0 + n] = np.asarray(a).reshape(n, H * hd)
    elif k == "attention_seq":
        H, hd = p["heads"], p["head_dim"]
        for r0, n in step.runs():
            q, kk, vv = (np.ascontiguousarray(a[r0:r0 + n]).reshape(n, H, hd) for a in ins)
            a = be.attention(q, kk, vv, n, np.arange(n, dtype=np.int32), np.ones((n,), bool))
            out[r0:r0 + n] = np.asarray(a).reshape(n, H * hd)
    elif k == "act_mul":
        a, b = np.ascontiguousarray(ins[0]), np.ascontiguousarray(ins[1])
        out[...] = be.swiglu(a, b) if p["act"] == "silu" else ext(be, "geglu").geglu_tanh(a, b)
    elif k == "gelu":
        out[...] = be.gelu(np.array(ins[0], np.float32, order="C"))
    elif k == "add":
        out[...] = be.add(np.ascontiguousarray(ins[0]), np.ascontiguousarray(ins[1]))
    elif k == "scale":
        out[...] = ins[0] * np.float32(p["c"])
    elif k == "softcap":
        cap = np.float32(p["cap"])
        out[...] = (np.tanh(ins[0] / cap) * cap).astype(np.float32)
    elif k == "take_rows":
        out[...] = ins[0][step.out_rows]
    else:
        raise ValueError(f"the interpreter has no op {k!r}")


class Interpreter:
    """graph.run(step) -> the output buffer (R, cols), through `backend`'s per-op methods."""

    def __init__(self, graph, backend):
        self.graph, self.be = graph, backend

    def run(self, step) -> np.ndarray:
        env = alloc(self.graph, step.M, len(step.out_rows))
        for op in self.graph.ops:
            run_op(self.be, self.graph, op, env, step)
        return env[self.graph.output]

    def close(self) -> None:
        pass
