"""The model as data: a graph of op records over named buffers, built once per model by an architecture's
builder (engine/archs/) and run by any backend (docs/DESIGN.md "The graph").

A buffer is a float32 matrix of `cols` columns and one row per token of the step ("tokens") or one row
per requested logit row ("out"). Ops read and write buffers whole or by a column range (Ref), in the
order of the list; a buffer may be written again later (llama2.c's RunState: x, xb, q, ... reused by
every layer), so a backend allocates each buffer once and keeps it for every step.

Weights are named; the graph's weight table maps names to what the engine prepared (a norm vector, a bias,
a Linear on a backend handle, an Embedding). An op names its weights; it never holds arrays itself, so a
backend compiles the records into its own form (C structs, device launches) once.

The step (Step): token ids, a position per row and a KV cache per row; rows of one sequence are
consecutive. One row per sequence is a batched decode step; a prompt is one sequence of M rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# op kind -> (number of inputs, description). The contract every executor implements (docs/DESIGN.md).
OPS = {
    "embed": (0, "out = table rows of the step's ids (host)"),
    "rmsnorm": (1, "out = x / rms(x) * w, over rows, or over each group of `group` columns (per head)"),
    "layernorm": (1, "out = (x - mean) / std * w + b (weights: w, b)"),
    "linear": (1, "out = x W^T (+ bias); W a Linear (packed handle or float), optional bias weight"),
    "rope": (1, "out = x rotated per head: heads, head_dim, n_rot, theta, style, optional freq factors"),
    "kv_store": (2, "KV cache plane `cache` of each row's cache, at the row's position = k, v"),
    "attention": (1, "out = softmax(scale q K^T, causal, window, softcap) V over cache plane `cache`"),
    "attention_seq": (3, "out = bidirectional attention of q, k, v within each sequence of the step"),
    "act_mul": (2, "out = act(a) * b, act silu or gelu_tanh"),
    "gelu": (1, "out = erf gelu(x)"),
    "add": (2, "out = a + b"),
    "scale": (1, "out = x * c"),
    "softcap": (1, "out = cap * tanh(x / cap)"),
    "take_rows": (1, "out = the step's output rows of x"),
}
ACTS = ("silu", "gelu_tanh")
ROPE_STYLES = ("adjacent", "half")


@dataclass(frozen=True)
class Buf:
    name: str
    cols: int
    rows: str = "tokens"        # "tokens" | "out"


@dataclass(frozen=True)
class Ref:
    """Columns col .. col+n-1 of a buffer (all of it when col == 0 and n == its cols)."""
    buf: str
    col: int
    n: int


@dataclass
class Op:
    kind: str
    out: Ref
    ins: tuple = ()
    weights: tuple = ()         # names in Graph.weights
    p: dict = field(default_factory=dict)


@dataclass
class Graph:
    bufs: dict                  # name -> Buf
    ops: list                   # [Op]
    weights: dict               # name -> float32 array | Linear | Embedding (engine/decoder.py)
    output: str                 # the buffer the step returns
    kv_layers: int = 0          # KV cache: planes (a model's layers), kv heads, head dim
    kv_heads: int = 0
    head_dim: int = 0

    def check(self) -> "Graph":
        """Every op known, every ref inside its buffer, every weight present (a builder's mistake is
        caught here, not inside a kernel)."""
        for i, op in enumerate(self.ops):
            if op.kind not in OPS:
                raise ValueError(f"op {i}: unknown kind {op.kind!r}")
            if len(op.ins) != OPS[op.kind][0]:
                raise ValueError(f"op {i} ({op.kind}): {len(op.ins)} inputs, expected {OPS[op.kind][0]}")
            for r in (op.out, *op.ins):
                b = self.bufs.get(r.buf)
                if b is None or r.col < 0 or r.n < 1 or r.col + r.n > b.cols:
                    raise ValueError(f"op {i} ({op.kind}): {r} is outside its buffer")
            for w in op.weights:
                if w is not None and w not in self.weights:
                    raise ValueError(f"op {i} ({op.kind}): no weight {w!r}")
        return self


@dataclass
class Step:
    """One forward call. ids (M,), pos (M,) int32, caches: one KVCache per row (rows of one sequence
    share it), out_rows: the rows whose output is returned (take_rows)."""
    ids: np.ndarray
    pos: np.ndarray
    caches: list
    out_rows: np.ndarray

    @property
    def M(self) -> int:
        return len(self.ids)

    def runs(self):
        """(first row, row count) of each run of consecutive rows on one cache."""
        i, M = 0, self.M
        while i < M:
            j = i + 1
            while j < M and self.caches[j] is self.caches[i]:
                j += 1
            yield i, j - i
            i = j


class Builder:
    """Emit ops into a graph; each method returns its output Ref. Buffers are declared on first use."""

    def __init__(self, weights: dict):
        self.bufs: dict = {}
        self.ops: list = []
        self.weights = weights

    def buf(self, name: str, cols: int, rows: str = "tokens") -> Ref:
        b = self.bufs.setdefault(name, Buf(name, int(cols), rows))
        if b.cols != cols or b.rows != rows:
            raise ValueError(f"buffer {name!r} declared as {b}, used as ({cols}, {rows})")
        return Ref(name, 0, int(cols))

    @staticmethod
    def cols(r: Ref, col: int, n: int) -> Ref:
        return Ref(r.buf, r.col + col, n)

    def _emit(self, kind, out, ins=(), weights=(), **p) -> Ref:
        self.ops.append(Op(kind, out, tuple(ins), tuple(weights), p))
        return out

    def has(self, name: str) -> bool:
        return name in self.weights

    # ---- ops ------------------------------------------------------------------------------------
    def embed(self, out: Ref, table: str) -> Ref:
        return self._emit("embed", out, (), (table,))

    def rmsnorm(self, x: Ref, w: str, eps: float, out: Ref, group: int = 0) -> Ref:
        return self._emit("rmsnorm", out, (x,), (w,), eps=float(eps), group=int(group))

    def layernorm(self, x: Ref, w: str, b: str, eps: float, out: Ref) -> Ref:
        return self._emit("layernorm", out, (x,), (w, b), eps=float(eps))

    def linear(self, x: Ref, w: str, out: Ref, bias: str | None = None) -> Ref:
        return self._emit("linear", out, (x,), (w, bias) if bias else (w,))

    def linears(self, x: Ref, names: list[str], out: str, biases=None) -> list[Ref]:
        """Products of x with several weights: one product into `out` split by columns when the engine
        fused them (weight "a|b|c"), else one product each into out.0, out.1, ..."""
        fused = "|".join(names)
        biases = biases or [None] * len(names)
        if fused not in self.weights and not all(n in self.weights for n in names):
            raise ValueError(f"no weight {next(n for n in names if n not in self.weights)!r} (nor {fused!r})")
        if fused in self.weights:
            sizes = self.weights[fused].splits
            y = self.buf(out, sum(sizes))
            fb = "|".join(b for b in biases) if all(biases) else None
            if any(biases) and fb not in self.weights:
                raise ValueError(f"fused {fused!r} needs the fused bias {fb!r}")
            self.linear(x, fused, y, fb)
            outs, c = [], 0
            for n in sizes:
                outs.append(self.cols(y, c, n))
                c += n
            return outs
        return [self.linear(x, n, self.buf(f"{out}.{i}", self.weights[n].N), b)
                for i, (n, b) in enumerate(zip(names, biases))]

    def rope(self, x: Ref, out: Ref, *, heads: int, head_dim: int, theta: float, style: str,
             n_rot: int | None = None, freqs: str | None = None) -> Ref:
        if style not in ROPE_STYLES:
            raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {style!r}")
        n_rot = head_dim if n_rot is None else int(n_rot)
        if n_rot % 2 or not 2 <= n_rot <= head_dim:
            raise ValueError(f"rope n_rot must be even and in 2..{head_dim}, got {n_rot}")
        return self._emit("rope", out, (x,), (freqs,) if freqs else (), heads=int(heads), head_dim=int(head_dim),
                          theta=float(theta), style=style, n_rot=n_rot)

    def kv_store(self, k: Ref, v: Ref, cache: int) -> None:
        """Rows of k and v into plane `cache` (a model's layer) of each row's KV cache. It writes no
        buffer: its record's out is its k input."""
        self._emit("kv_store", k, (k, v), (), cache=int(cache))

    def attention(self, q: Ref, cache: int, out: Ref, *, heads: int, kv_heads: int, head_dim: int,
                  scale: float | None = None, window: int = 0, softcap: float = 0.0) -> Ref:
        return self._emit("attention", out, (q,), (), cache=int(cache), heads=int(heads), kv_heads=int(kv_heads),
                          head_dim=int(head_dim), scale=None if scale is None else float(scale),
                          window=int(window), softcap=float(softcap))

    def attention_seq(self, q: Ref, k: Ref, v: Ref, out: Ref, *, heads: int, head_dim: int) -> Ref:
        return self._emit("attention_seq", out, (q, k, v), (), heads=int(heads), head_dim=int(head_dim))

    def act_mul(self, a: Ref, b: Ref, out: Ref, act: str = "silu") -> Ref:
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        return self._emit("act_mul", out, (a, b), (), act=act)

    def gelu(self, x: Ref, out: Ref) -> Ref:
        return self._emit("gelu", out, (x,))

    def add(self, a: Ref, b: Ref, out: Ref) -> Ref:
        return self._emit("add", out, (a, b))

    def scale(self, x: Ref, c: float, out: Ref) -> Ref:
        return self._emit("scale", out, (x,), (), c=float(c))

    def softcap(self, x: Ref, cap: float, out: Ref) -> Ref:
        return self._emit("softcap", out, (x,), (), cap=float(cap))

    def take_rows(self, x: Ref, out: Ref) -> Ref:
        return self._emit("take_rows", out, (x,))

    def finish(self, output: Ref, *, kv_layers=0, kv_heads=0, head_dim=0) -> Graph:
        return Graph(self.bufs, self.ops, self.weights, output.buf, kv_layers, kv_heads, head_dim).check()
