"""CpuBackend.compile: an engine/graph.py graph -> C op records (ab_gop) run by ab_graph_run in one call.

Compiled once: each op becomes a record of its kind code, buffer indices, first columns and parameters;
each linear an ab_lin over the backend's prepared tiles; RoPE ops that share (theta, n_rot, factors)
share one table per step. The step's buffers, kernel scratch and tables are allocated once and grown
when a step has more rows than any before. Ops the C loop does not run (the embedding gather, float
weights, the popcount or float32-A16 kernels, bidirectional attention) run in Python between C segments
through runtime/interpret.py on the same buffers, so every configuration compiles.
"""
from __future__ import annotations

import numpy as np

from loader.precision import Q8
from runtime.act_q8 import check_q8_block
from runtime.cpu import layout
from runtime.cpu.errors import check as _check
from runtime.interpret import run_op

KINDS = {"rmsnorm": 1, "layernorm": 2, "linear": 3, "rope": 4, "kv_store": 5, "attention": 6, "act_mul": 7,
         "gelu": 8, "add": 9, "scale": 10, "softcap": 11, "take_rows": 12}
WHOLE_IN = ("rmsnorm", "layernorm", "attention")        # ops whose input must be a whole buffer


def _abits_code(abits) -> int:
    """ab_graph.abits: 16 for A16 and for "q8" (A16 after the rounding), else the bits."""
    return 16 if abits == Q8 else int(abits)


def _aligned(n: int, dtype=np.float32) -> np.ndarray:
    """n elements on a 64-byte boundary (the vector kernels' loads)."""
    it = np.dtype(dtype).itemsize
    raw = np.empty(n * it + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n * it].view(dtype)


class CpuProgram:
    def __init__(self, be, graph):
        self.be, self.graph = be, graph
        ffi = be._ffi
        self.keep: list = []
        self.names = list(graph.bufs)
        self.index = {n: i for i, n in enumerate(self.names)}
        lins = [graph.weights[op.weights[0]] for op in graph.ops if op.kind == "linear"]
        # abits "q8" runs the A16 path with each linear's input rounding block (ab_lin.ar)
        self.abits = _abits_code(lins[0].abits) if lins else 16
        in_c = [self._runs_in_c(op) for op in graph.ops]
        self.segments: list = []            # ("c", op0, op1) over the C records, or ("py", op)
        recs = []
        for op, c in zip(graph.ops, in_c):
            if c:
                if not self.segments or self.segments[-1][0] != "c":
                    self.segments.append(["c", len(recs), len(recs)])
                recs.append(op)
                self.segments[-1][2] = len(recs)
            else:
                self.segments.append(["py", op])
        self.ops = ffi.new("ab_gop[]", max(len(recs), 1))
        self.tables: dict = {}
        self.max_rot = 2
        self.max_k = self.max_kp = 32
        for i, op in enumerate(recs):
            self._compile_op(self.ops[i], op)
        self.bufs = ffi.new("ab_gbuf[]", len(self.names))
        self.g = ffi.new("ab_graph *")
        self.g.ops, self.g.n_ops, self.g.bufs, self.g.abits = self.ops, len(recs), self.bufs, self.abits
        self.s = ffi.new("ab_gstep *")
        self.cap_rows = self.cap_out = 0
        self.arrays: dict = {}
        # the output is a fresh array per step (handed to the caller, no copy); Python ops see views of
        # the buffers they touch
        self.out_index = self.index[graph.output]
        self.py_bufs = sorted({r.buf for seg in self.segments if seg[0] == "py" for r in (seg[1].out, *seg[1].ins)}
                              - {graph.output})

    @property
    def python_ops(self) -> list[str]:
        """The kinds of the ops that run in Python (the embedding gather, and what C does not cover)."""
        return [seg[1].kind for seg in self.segments if seg[0] == "py"]

    # ---- compile ----------------------------------------------------------------------------------
    def _c_linear(self, lin) -> bool:
        be = self.be
        h = getattr(lin, "h", None)
        if h is None or be.a16 != "lut" or _abits_code(lin.abits) != self.abits:
            return False
        if lin.abits == Q8:             # the rounding is in the byte-code kernel; tables run in Python
            return h.codes is not None
        return self.abits == 16 or (be.quant == "bytes" and h.lin.Kp <= 32768)

    def _runs_in_c(self, op) -> bool:
        if op.kind == "linear":
            return self._c_linear(self.graph.weights[op.weights[0]])
        if op.kind in WHOLE_IN and not self._whole(op.ins[0]):
            return False
        if op.kind in ("rmsnorm", "layernorm", "rope", "attention", "linear") and not self._whole(op.out):
            return False
        return op.kind in KINDS

    def _whole(self, r) -> bool:
        return r.col == 0 and r.n == self.graph.bufs[r.buf].cols

    def _vec(self, a, n: int):
        a = np.ascontiguousarray(a, np.float32)
        if a.shape != (n,):
            raise ValueError(f"a graph vector weight has shape {a.shape}, expected ({n},)")
        self.keep.append(a)
        return self.be._ffi.cast("float *", a.ctypes.data)

    def _lin(self, lin):
        be, ffi = self.be, self.be._ffi
        h = lin.h
        lo = ffi.new("ab_lin *")
        self.keep += [lo, h]
        lo.wl, lo.codes = be._p("uint8_t *", h.wl), be._p("uint8_t *", h.codes)
        lo.cw = layout.container_bits(h.lin.bits)
        lo.wsc, lo.woff, lo.f16 = be._p("void *", h.wsc), be._p("void *", h.woff), h.f16
        lo.p, lo.N, lo.Kp, lo.G, lo.K = h.lin.bits, h.lin.N, h.lin.Kp, h.lin.group, h.lin.K
        lo.rotate = h.lin.rotate
        lo.smooth = ffi.NULL if h.lin.smooth is None else self._vec(h.lin.smooth, h.lin.K)
        lo.ar = check_q8_block(lin.agroup) if lin.abits == Q8 else 0
        if self.abits < 16:
            ga, L = be._agroups(h.lin, lin.agroup)
            be._quant_weights(h)
            lo.codes, lo.wpw, lo.Ga, lo.L = be._p("uint8_t *", h.qcodes), be._p("int32_t *", h.wpw), ga, L
        self.max_k, self.max_kp = max(self.max_k, h.lin.K), max(self.max_kp, h.lin.Kp)
        return lo

    def _compile_op(self, o, op) -> None:
        ffi, W, p = self.be._ffi, self.graph.weights, op.p
        o.kind, o.n = KINDS[op.kind], op.out.n
        o.rows = 1 if self.graph.bufs[op.out.buf].rows == "out" else 0
        o.out, o.out_col = self.index[op.out.buf], op.out.col
        o.a = o.b = -1
        if op.ins:
            o.a, o.a_col = self.index[op.ins[0].buf], op.ins[0].col
        if len(op.ins) > 1:
            o.b, o.b_col = self.index[op.ins[1].buf], op.ins[1].col
        o.w = o.w2 = ffi.NULL
        o.lin = ffi.NULL
        k = op.kind
        if k in ("rmsnorm", "layernorm"):
            o.f0 = p["eps"]
            o.i0 = p.get("group", 0)
            width = o.i0 or op.out.n
            o.w = self._vec(W[op.weights[0]], width)
            if k == "layernorm":
                o.w2 = self._vec(W[op.weights[1]], width)
        elif k == "linear":
            lin = W[op.weights[0]]
            if op.out.n != lin.N or op.ins[0].n != lin.K:
                raise ValueError(f"linear {op.weights[0]!r} is ({lin.N}, {lin.K}); the graph gives it "
                                 f"{op.ins[0].n} -> {op.out.n} columns")
            o.lin = self._lin(lin)
            if len(op.weights) > 1:
                o.w = self._vec(W[op.weights[1]], lin.N)
        elif k == "rope":
            o.i0, o.i1, o.i2 = p["heads"], p["head_dim"], p["n_rot"]
            o.i3 = 0 if p["style"] == "adjacent" else 1
            o.f0 = p["theta"]
            freqs = op.weights[0] if op.weights else None
            if freqs:
                o.w = self._vec(W[freqs], p["n_rot"] // 2)
            key = (p["theta"], p["n_rot"], freqs)
            o.i5 = int(key not in self.tables)
            o.i4 = self.tables.setdefault(key, len(self.tables))
            self.max_rot = max(self.max_rot, p["n_rot"])
        elif k == "kv_store":
            o.i0 = p["cache"]
        elif k == "attention":
            o.i0, o.i1, o.i2, o.i3 = p["cache"], p["heads"], p["kv_heads"], p["window"]
            o.f0 = 0.0 if p["scale"] is None else p["scale"]
            o.f1 = p["softcap"]
        elif k == "act_mul":
            o.i0 = 0 if p["act"] == "silu" else 1
        elif k == "scale":
            o.f0 = p["c"]
        elif k == "softcap":
            o.f0 = p["cap"]

    # ---- step memory --------------------------------------------------------------------------------
    def _reserve(self, M: int, R: int) -> None:
        if M <= self.cap_rows and R <= self.cap_out:
            return
        ffi, be, g = self.be._ffi, self.be, self.g
        cap, capo = max(M, self.cap_rows), max(R, self.cap_out)
        for i, n in enumerate(self.names):
            b = self.graph.bufs[n]
            if n == self.graph.output:
                continue
            a = _aligned((cap if b.rows == "tokens" else capo) * b.cols).reshape(-1, b.cols)
            a[...] = 0
            self.arrays[n] = a
            self.bufs[i].base, self.bufs[i].ld = be._p("float *", a), b.cols
        self.scratch = _aligned(int(be._lib.ab_lin_scratch(cap, self.max_kp)) + 64, np.uint8)
        self.xr = _aligned(cap * self.max_k + 16)
        stride = cap * self.max_rot
        self.rope = _aligned(max(len(self.tables), 1) * stride, np.float64)
        g.scratch, g.xr = be._p("void *", self.scratch), be._p("float *", self.xr)
        g.rope, g.rope_stride = be._p("double *", self.rope), stride
        g.cap_rows, g.cap_out = cap, capo
        self.pos = np.zeros(cap, np.int32)
        self.out_rows = np.zeros(max(capo, 1), np.int32)
        self.kc, self.vc = ffi.new("float *[]", cap), ffi.new("float *[]", cap)
        s = self.s
        s.pos, s.out_rows = be._p("int32_t *", self.pos), be._p("int32_t *", self.out_rows)
        s.kc, s.vc = self.kc, self.vc
        self.cap_rows, self.cap_out = cap, capo

    # ---- run ----------------------------------------------------------------------------------------
    def run(self, step) -> np.ndarray:
        be, gr = self.be, self.graph
        M, R = step.M, len(step.out_rows)
        self._reserve(M, R)
        s = self.s
        s.M, s.R, s.kv_heads, s.head_dim = M, R, gr.kv_heads, gr.head_dim
        self.pos[:M] = step.pos
        self.out_rows[:R] = step.out_rows
        T = int(step.pos.max()) + 1             # a graph without a KV cache: positions are only checked
        if gr.kv_layers:
            T = None
            for r0, n in step.runs():
                c = step.caches[r0]
                if T is not None and c.T != T:
                    raise ValueError("the caches of one step must have one context length")
                T = c.T
                kp, vp = be._p("float *", c.k), be._p("float *", c.v)
                for i in range(r0, r0 + n):
                    self.kc[i], self.vc[i] = kp, vp
        s.T = T
        ob = gr.bufs[gr.output]
        out = np.empty((M if ob.rows == "tokens" else R, ob.cols), np.float32)
        self.bufs[self.out_index].base, self.bufs[self.out_index].ld = be._p("float *", out), ob.cols
        env = {n: self.arrays[n][:M] if gr.bufs[n].rows == "tokens" else self.arrays[n][:R] for n in self.py_bufs}
        env[gr.output] = out
        for seg in self.segments:
            if seg[0] == "c":
                _check(be._lib.ab_graph_run(be._live_pool, be._isa_code, self.g, s, seg[1], seg[2]), "graph")
            else:
                run_op(be, gr, seg[1], env, step)
        return out

    def close(self) -> None:
        self.keep.clear()
        self.arrays.clear()
