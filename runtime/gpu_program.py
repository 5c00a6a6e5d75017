"""GpuBackend.compile: an engine/graph.py graph with every activation on the device; decode steps as CUDA
graphs.

The op-by-op interpreter drives GpuBackend with host arrays: each op uploads its inputs and downloads its
result. A GpuProgram maps each op record to the same kernel call on device arrays (so its outputs are
bitwise the interpreter's on this backend): a step uploads the embedded rows and positions and downloads
the output rows, nothing else. Compiling also
- fuses a linear followed by the add of its output into a residual (x = x + x W^T in the product's
  output store, bitwise the separate add),
- computes each buffer value's last reader, so a prefill frees every intermediate after its last use,
- refuses what has no kernel here (float weights, biases, smoothing, per-head norms, partial or scaled
  RoPE, attention options, GeGLU, scale, softcap): engine/decoder.py then interprets the graph instead.

A decode step (one row, one sequence) is captured once as a CUDA graph and replayed: one launch call
instead of several per op. Replays rely on three things:
- memory: the step's intermediates come from an Arena, a bump allocator over chunks of pool memory reset
  at the start of every step, so each buffer has the address it was captured with and no pool call (or
  event record) happens during capture;
- inputs: the token's row and position are written into fixed device buffers before each replay;
- the cache: attention is given n_ctx = the cache length and stops at each query's position (causal),
  so one graph serves every position. A graph is bound to one cache's arrays and re-captured for another.
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


def _unsupported(op, W) -> str | None:
    """Why this op has no device kernel here, or None."""
    k, p = op.kind, op.p
    if k == "linear":
        lin = W[op.weights[0]]
        if getattr(lin, "h", None) is None:
            return "float weights"
        if len(op.weights) > 1 or lin.h.lin.smooth is not None:
            return "a bias or smoothing"
    elif k == "rmsnorm" and p["group"]:
        return "a per-head norm"
    elif k == "rope" and (op.weights or p["n_rot"] != p["head_dim"]):
        return "partial rotary or frequency factors"
    elif k == "attention" and (p["scale"] is not None or p["window"] or p["softcap"]):
        return "attention options"
    elif k == "act_mul" and p["act"] != "silu":
        return p["act"]
    elif k not in ("embed", "rmsnorm", "linear", "rope", "kv_store", "attention", "act_mul", "add", "take_rows"):
        return k
    return None


class GpuProgram:
    def __init__(self, be, graph):
        self.be, self.graph = be, graph
        W = graph.weights
        for op in graph.ops:
            why = _unsupported(op, W)
            if why:
                raise NotImplementedError(f"the device program has no kernel for {op.kind} with {why}")
        self._owned: list = []
        self.dev_w = {}
        for op in graph.ops:
            if op.kind == "rmsnorm":
                name = op.weights[0]
                if name not in self.dev_w:
                    self.dev_w[name] = be.upload(np.ascontiguousarray(W[name], np.float32))
                    self._owned.append(self.dev_w[name])
        self.plan = self._plan(graph.ops)
        self.tables: dict = {}
        self.table_n = 0
        self.arena = Arena(be.dev)
        self.graph_exec = self.graph_key = self.step_out = None
        d = graph.bufs[graph.ops[0].out.buf].cols
        self.x_in, self.pos_in = be.dev.empty((1, d)), be.dev.empty((1,), np.int32)
        self._owned += [self.x_in, self.pos_in]

    # ---- compile ----------------------------------------------------------------------------------
    @staticmethod
    def _plan(ops) -> list:
        """[(op, fused add or None, names whose value dies after this entry)]."""
        entries, i = [], 0
        while i < len(ops):
            op, nxt = ops[i], ops[i + 1] if i + 1 < len(ops) else None
            fuse = None
            if (op.kind == "linear" and nxt is not None and nxt.kind == "add" and nxt.ins[1] == op.out
                    and nxt.ins[0] == nxt.out and nxt.out.buf != op.out.buf):
                fuse = nxt
                i += 1
            entries.append([op, fuse, []])
            i += 1
        # liveness: a buffer's value dies at its last read before the next write (or the end)
        last: dict = {}
        for j, (op, fuse, _) in enumerate(entries):
            reads = [r.buf for r in op.ins] + ([fuse.ins[0].buf] if fuse else [])
            writes = [fuse.out.buf if fuse else op.out.buf] if op.kind != "kv_store" else []
            for b in reads:
                last[b] = j
            for b in writes:     # the old value dies at its last read (or here, closed by the write)
                if last.get(b) is not None and last[b] != j:
                    entries[last[b]][2].append(b)
                last[b] = None
        for b, j in last.items():
            if j is not None:
                entries[j][2].append(b)
        return [tuple(e) for e in entries]

    # ---- one step on device arrays --------------------------------------------------------------------
    def _view(self, env, r, temps):
        a = env[r.buf]
        if r.col == 0 and r.n == a.shape[1]:
            return a
        c = self.be.columns(a, r.col, r.n)
        temps.append(c)
        return c

    def _linear(self, lin, x, residual=None):
        be = self.be
        xr = be.hadamard(x, lin.rotate) if lin.rotate else x      # W R stored (loader/rotation.py): R x
        y = be.linear(lin.h, xr, abits=lin.abits, agroup=lin.agroup, residual=residual)
        if xr is not x:
            xr.close()
        return y

    def forward_device(self, x, pos, M: int, n_ctx: int, cache, out_row):
        """x (M, d) device rows (the output of embed), pos (M,) device positions; out_row: the row whose
        output is returned, or None for every row. Returns the output device array."""
        be, W, gr = self.be, self.graph.weights, self.graph
        env, owner = {}, {}         # buffer -> its current device array, and the array owning its memory

        def drop(name):
            a = owner.pop(name, None)
            env.pop(name, None)
            if a is not None and a is not self.x_in:
                a.close()

        def put(name, a, own=None):     # a new value of a buffer: the old one was consumed by this op
            drop(name)
            env[name], owner[name] = a, (a if own is None else own)

        for op, fuse, dead in self.plan:
            k, p, temps = op.kind, op.p, []
            ins = [self._view(env, r, temps) for r in op.ins] if k not in ("embed", "rope") else []
            if k == "embed":
                put(op.out.buf, x)
            elif k == "rmsnorm":
                put(op.out.buf, be.rmsnorm(ins[0], self.dev_w[op.weights[0]], p["eps"]))
            elif k == "linear":
                if fuse is not None:
                    put(fuse.out.buf, self._linear(W[op.weights[0]], ins[0], residual=env[fuse.ins[0].buf]))
                else:
                    put(op.out.buf, self._linear(W[op.weights[0]], ins[0]))
            elif k == "rope":           # out of place: a copy of the input columns, rotated in place
                r = op.ins[0]
                y = be.columns(env[r.buf], r.col, r.n)
                be.rope(be.reshape(y, (M, p["heads"], p["head_dim"])), pos, p["theta"], p["style"],
                        tables=self.tables[(p["theta"], p["head_dim"])])
                put(op.out.buf, y)
            elif k == "kv_store":
                li = p["cache"]
                be.kv_store(cache.k[li], ins[0], pos)
                be.kv_store(cache.v[li], ins[1], pos)
            elif k == "attention":
                H, hd = p["heads"], p["head_dim"]
                a = be.attention(be.reshape(ins[0], (M, H, hd)), cache.k[p["cache"]], cache.v[p["cache"]],
                                 n_ctx, pos)
                put(op.out.buf, be.reshape(a, (M, H * hd)), own=a)
            elif k == "act_mul":
                put(op.out.buf, be.swiglu(ins[0], ins[1]))
            elif k == "add":
                put(op.out.buf, be.add(ins[0], ins[1]))
            elif k == "take_rows":
                src = ins[0] if out_row is None else be.rows(ins[0], out_row, 1)
                put(op.out.buf, be.columns(src, 0, op.out.n))
            for t in temps:
                t.close()
            for name in dead:
                if name != gr.output:
                    drop(name)
        return env[gr.output]

    # ---- run ------------------------------------------------------------------------------------------
    def _ensure_tables(self, T: int) -> None:
        if T <= self.table_n:
            return
        self._drop_graph()          # captured launches hold the old tables' addresses
        for a in self.tables.values():
            for t in a:
                t.close()
        self.tables = {}
        for op in self.graph.ops:
            if op.kind == "rope":
                key = (op.p["theta"], op.p["head_dim"])
                if key not in self.tables:
                    self.tables[key] = self.be.rope_tables(key[0], key[1], T)
        self.table_n = T

    def run(self, step) -> np.ndarray:
        be = self.be
        runs = list(step.runs())
        if len(runs) != 1:
            raise ValueError("the device program runs one sequence per step")
        cache = step.caches[0]
        M, R = step.M, len(step.out_rows)
        rows = np.asarray(step.out_rows)
        if R == 1:
            out_row = int(rows[0])
        elif R == M and np.array_equal(rows, np.arange(M)):
            out_row = None
        else:
            raise ValueError("the device program returns one row or every row of a step")
        if np.any(np.diff(step.pos) != 1):
            raise ValueError("the device program needs consecutive positions")
        T = cache.k[0].shape[0]
        self._ensure_tables(T)
        x = np.ascontiguousarray(self.graph.weights[self.graph.ops[0].weights[0]].rows(step.ids), np.float32)
        if M == 1 and out_row == 0:
            return self._decode_step(x, int(step.pos[0]), cache, T)
        pos = be.upload(np.asarray(step.pos, np.int32))
        xd = be.upload(x)
        try:
            out = self.forward_device(xd, pos, M, int(step.pos[-1]) + 1, cache, out_row)
        finally:
            pos.close()
        res = be.download(out)
        out.close()
        return res

    def _decode_step(self, x, start, cache, T):
        be = self.be
        self.x_in.copy_from_host(x)
        self.pos_in.copy_from_host(np.array([start], np.int32))
        key = tuple(a.ptr for a in cache.k) + tuple(a.ptr for a in cache.v)
        if self.graph_exec is not None and self.graph_key == key:
            self.graph_exec.replay(be.dev.stream)
            return be.download(self.step_out)
        self._drop_graph()
        # first step on this cache: run it eagerly (filling the arena), then capture the same step
        self.arena.reset()
        be.arena = self.arena
        try:
            out = self.forward_device(self.x_in, self.pos_in, 1, T, cache, 0)
            result = be.download(out)
            self.arena.reset()
            self.arena.frozen = True
            state = {}
            self.graph_exec = be.capture_graph(
                lambda: state.setdefault("out", self.forward_device(self.x_in, self.pos_in, 1, T, cache, 0)))
            self.step_out, self.graph_key = state["out"], key
        finally:
            be.arena = None
            self.arena.frozen = False
        return result

    def _drop_graph(self) -> None:
        if self.graph_exec is not None:
            self.graph_exec.close()
        self.graph_exec = self.graph_key = self.step_out = None

    def close(self) -> None:
        self._drop_graph()
        self.arena.close()
        for a in self.tables.values():
            for t in a:
                t.close()
        self.tables = {}
        for a in self._owned:
            a.close()
        self._owned.clear()
