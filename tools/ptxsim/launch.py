"""Module (parse once, decode once per entry) and kernel launch: the CTA scheduler.

Execution model.  CTAs of the grid run one after another.  Inside a CTA every thread has a PC; the
scheduler always executes the instruction at the lowest PC among threads that are neither exited
nor waiting at a barrier, for all threads at that PC at once (all warps together, in lockstep).
That is the "thread groups by PC, lowest PC first" reconvergence scheme: after a divergent branch
the group with the lower PC runs until it reaches the PC where the other group waits, and the two
merge there.  For the structured control flow compilers and our hand-written kernels produce
(if/else with forward branches, loops with a backward branch, early exit) the first meeting point
is the immediate post-dominator, so warps reconverge where the hardware's reconvergence stack would
put them.  When all live threads are at one PC the scheduler switches to a fast path with a scalar
PC.  A loop with per-thread trip counts keeps the threads that are still looping at the lower PC,
so they run first and the finished ones wait after the loop.

bar.sync 0: a thread reaching it waits; when no thread can run, the barrier releases if every live
thread of the CTA waits at a barrier (exited threads count as arrived) and each warp's waiting
lanes are at the same bar.sync; otherwise it is a SanitizerError (divergence at a barrier).  The
release advances the shared-memory epoch that the race detector uses.
"""
from __future__ import annotations

import numpy as np

from .decode import BAR, BRA, EXIT, NORMAL, SPECIALS, decode_entry
from .errors import SanitizerError, SimError
from .machine import GlobalMemory
from .parser import UINT, parse
from .sanitizer import SharedMemory


class CTAState:
    """Everything an instruction handler may touch (attributes used by ops_* modules)."""

    def __init__(self, prog, nregs_types, nthreads, block, grid, mem, param, shared_size, sanitize,
                 filename):
        self.prog, self.mem, self.param, self.filename = prog, mem, param, filename
        self.nthreads, self.block, self.grid = nthreads, block, grid
        self.R = [np.zeros(nthreads, bool if t.kind == "pred" else UINT[t.bits]) for t in nregs_types]
        tids = np.arange(nthreads)
        bx, by, _ = block
        self.tid3 = (tids % bx, (tids // bx) % by, tids // (bx * by))
        self.lane = (tids % 32).astype(np.int64)
        self.warp = (tids // 32).astype(np.int64)
        self.nwarps = (nthreads + 31) // 32
        for k, arr in enumerate(self.tid3):
            self.R[k][:] = arr
            self.R[3 + k][:] = block[k]
            self.R[9 + k][:] = grid[k]
        self.R[12][:] = self.lane
        self.R[13][:] = self.warp
        self.shared_size, self.sanitize = shared_size, sanitize
        self.cur = None
        self.ctaid = (0, 0, 0)

    def new_cta(self, ctaid):
        self.ctaid = ctaid
        for k in range(3):
            self.R[6 + k][:] = ctaid[k]
        self.shared = SharedMemory(self.shared_size, self.sanitize)
        self.cp_pending = []
        self.cp_committed = np.zeros(self.nthreads, np.int64)

    def fmt_tid(self, tid: int) -> str:
        return f"tid=({self.tid3[0][tid]},{self.tid3[1][tid]},{self.tid3[2][tid]})"

    def sanitizer_error(self, msg, tid, addr=None, shared=False) -> SanitizerError:
        where = f"{self.filename}:{self.cur.line}" if self.cur else self.filename
        at = "" if addr is None else f", {'shared' if shared else 'global'} address {addr:#x}"
        text = self.cur.text if self.cur else ""
        return SanitizerError(f"{where}: {msg}: thread ctaid={self.ctaid} {self.fmt_tid(tid)}{at} "
                              f"in `{text}`")


def _pack_params(entry, args, filename) -> np.ndarray:
    if len(args) != len(entry.params):
        raise SimError(f"{filename}: {entry.name} takes {len(entry.params)} arguments "
                       f"({', '.join(n for n, _ in entry.params)}), got {len(args)}")
    buf = bytearray()
    for (name, t), v in zip(entry.params, args):
        al = t.bits // 8
        buf += b"\0" * (-len(buf) % al)
        if t.kind == "f":
            if not isinstance(v, (int, float, np.floating, np.integer)):
                raise SimError(f"argument {name} (.{t.name}) must be a number, got {type(v).__name__}")
            buf += np.array([v], t.np).tobytes()
        else:
            if isinstance(v, (float, np.floating)) or not isinstance(v, (int, np.integer)):
                raise SimError(f"argument {name} (.{t.name}) must be an integer, got {v!r}")
            v = int(v)
            lo = -(1 << (t.bits - 1)) if t.kind == "s" else 0
            hi = (1 << t.bits) - 1 if t.kind != "s" else (1 << (t.bits - 1)) - 1
            if not lo <= v <= hi:
                raise SimError(f"argument {name} = {v} does not fit .{t.name}")
            buf += (v & ((1 << t.bits) - 1)).to_bytes(al, "little")
    return np.frombuffer(bytes(buf) + b"\0" * 8, np.uint8).copy()


class Module:
    def __init__(self, ptx_text: str, filename: str = "<ptx>"):
        self.filename = filename
        self.parsed = parse(ptx_text, filename)
        self._decoded = {}
        # decoded lazily, on first launch: one entry using PTX the interpreter does not implement must
        # not make the file's other kernels unusable (check_decode() decodes all of them up front)

    def check_decode(self) -> dict[str, str]:
        """{entry: error} for every entry that does not decode (empty when all do)."""
        bad = {}
        for name in self.parsed.entries:
            try:
                self._program(name)
            except SimError as e:
                bad[name] = str(e)
        return bad

    @property
    def entries(self):
        return list(self.parsed.entries)

    def _program(self, name):
        if name not in self._decoded:
            if name not in self.parsed.entries:
                raise SimError(f"{self.filename}: no entry named {name!r} "
                               f"(have {', '.join(self.parsed.entries)})")
            ent = self.parsed.entries[name]
            layout, off, dyn_align = {}, 0, 16
            for v in self.parsed.shared + ent.shared:
                if v.name in layout:
                    raise SimError(f"{self.filename}:{v.line}: shared variable {v.name} declared twice")
                if v.size is None:
                    dyn_align = max(dyn_align, v.align)
                    continue
                off = -(-off // v.align) * v.align
                layout[v.name] = off
                off += v.size
            static = off
            dyn_off = -(-static // dyn_align) * dyn_align
            for v in self.parsed.shared + ent.shared:
                if v.size is None:
                    layout[v.name] = dyn_off
            prog, dec = decode_entry(self.filename, ent, layout)
            self._decoded[name] = (prog, dec, static, dyn_off)
        return self._decoded[name]

    def launch(self, name, grid=(1, 1, 1), block=(1, 1, 1), args=(), smem=0, mem=None,
               sanitize=True, max_steps=20_000_000):
        prog, dec, static, dyn_off = self._program(name)
        ent = self.parsed.entries[name]
        grid = tuple(int(x) for x in (tuple(grid) + (1, 1, 1))[:3])
        block = tuple(int(x) for x in (tuple(block) + (1, 1, 1))[:3])
        if min(grid) < 1 or min(block) < 1:
            raise SimError(f"launch of {name}: grid {grid} and block {block} must be positive")
        if grid[0] > 2**31 - 1 or grid[1] > 65535 or grid[2] > 65535:
            # the interpreter could run it, a GPU refuses it: fail here as the device would
            raise SimError(f"launch of {name}: grid {grid} exceeds the hardware limits "
                           f"(x <= 2^31-1, y and z <= 65535)")
        nthreads = block[0] * block[1] * block[2]
        if nthreads > 1024 or block[2] > 64:
            raise SimError(f"launch of {name}: block {block} exceeds 1024 threads / z <= 64")
        if ent.reqntid and tuple((ent.reqntid + (1, 1))[:3]) != block:
            raise SimError(f"launch of {name}: .reqntid {ent.reqntid} but block {block}")
        if mem is None:
            mem = GlobalMemory()
        if smem < 0:
            raise SimError("dynamic shared memory size must be >= 0")
        shared_size = (dyn_off + int(smem)) if smem else static
        if shared_size > 227 * 1024:
            raise SimError(f"launch of {name}: {shared_size} bytes of shared memory exceed 227 KiB")
        param = _pack_params(ent, list(args), self.filename)
        st = CTAState(prog, dec.reg_types, nthreads, block, grid, mem, param, shared_size, sanitize,
                      self.filename)
        steps = 0
        for z in range(grid[2]):
            for y in range(grid[1]):
                for x in range(grid[0]):
                    st.new_cta((x, y, z))
                    steps += _run_cta(st, prog, max_steps - steps)
        return steps


def _run_cta(st: CTAState, prog, budget) -> int:
    n = st.nthreads
    exited = np.zeros(n, bool)
    waiting = np.zeros(n, bool)
    pc = np.zeros(n, np.int64)
    live = np.arange(n)
    uniform, upc = True, 0
    steps = 0
    BIG = len(prog) + 1
    R = st.R
    while True:
        steps += 1
        if steps > budget:
            raise SimError(f"{st.filename}: step limit exceeded (endless loop?) at line "
                           f"{prog[upc if uniform else 0].line}")
        if uniform:
            cur = upc
            idx = live
        else:
            runnable = ~(exited | waiting)
            if not runnable.any():
                if not waiting.any():
                    break
                _release(st, prog, pc, waiting, exited)
                uniform, live, upc = _try_uniform(pc, exited, waiting)
                continue
            rp = np.where(runnable, pc, BIG)
            cur = int(rp.min())
            idx = np.flatnonzero(rp == cur)
        ins = prog[cur]
        st.cur = ins
        if ins.guard is not None:
            gv = R[ins.guard][idx]
            if ins.neg:
                gv = ~gv
            sel = idx[gv]
        else:
            gv = None
            sel = idx
        kind = ins.kind
        if kind == NORMAL:
            if sel.size:
                ins.fn(st, sel)
            if uniform:
                upc += 1
            else:
                pc[idx] += 1
            continue
        if kind == BRA:
            if uniform:
                if sel.size == idx.size:
                    upc = ins.target
                    continue
                if sel.size == 0:
                    upc += 1
                    continue
                pc[live] = upc
                uniform = False
            pc[idx] = cur + 1
            pc[sel] = ins.target
        elif kind == EXIT:
            if uniform:
                if sel.size == idx.size:
                    break
                if sel.size == 0:
                    upc += 1
                    continue
                pc[live] = upc
                uniform = False
            exited[sel] = True
            pc[idx] = cur + 1
        else:                                   # BAR
            if uniform:                         # every live thread arrived at once
                st.shared.epoch += 1
                upc += 1
                continue
            waiting[idx] = True
        uniform, live, upc = _try_uniform(pc, exited, waiting)
    return steps


def _try_uniform(pc, exited, waiting):
    if waiting.any():
        return False, None, 0
    live = np.flatnonzero(~exited)
    if live.size == 0:
        return False, None, 0
    p = pc[live]
    if (p == p[0]).all():
        return True, live, int(p[0])
    return False, None, 0


def _release(st, prog, pc, waiting, exited):
    w = np.flatnonzero(waiting)
    warps = st.warp[w]
    p = pc[w]
    key = np.unique(warps * (len(prog) + 1) + p)
    if np.unique(warps).size != key.size:
        for wp in np.unique(warps):
            ps = np.unique(p[warps == wp])
            if ps.size > 1:
                st.cur = prog[int(ps[1])]
                tid = int(w[(warps == wp) & (p == ps[1])][0])
                raise st.sanitizer_error(
                    f"divergence at a barrier: warp {int(wp)} waits at bar.sync on lines "
                    f"{prog[int(ps[0])].line} and {prog[int(ps[1])].line}", tid)
    pc[w] += 1
    waiting[:] = False
    st.shared.epoch += 1
