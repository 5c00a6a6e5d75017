"""Decoding: raw statements -> instruction objects with pre-resolved operand handlers.

Registers live in a list `st.R` of NumPy arrays, one per register, of shape (threads in CTA,),
stored as raw bits (uint16/32/64, bool for predicates).  An operand handler built here reads the
register for the active thread ids `idx` and reinterprets the bits as the instruction type, so the
per-instruction work at run time is a gather, a NumPy op and a scatter.

Every op module registers `decoder(d, stmt) -> fn(st, idx)` in OPS; an opcode or modifier it does
not accept is a SimError naming the instruction and its line, raised here at decode time.
"""
from __future__ import annotations

import numpy as np

from .errors import SimError
from .parser import TYPES, UINT, PType, Stmt

OPS: dict = {}
SHARED_GENERIC = 0x7F00_0000_0000      # generic-address window of shared memory (cvta.shared)

SPECIALS = ["%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x", "%ctaid.y",
            "%ctaid.z", "%nctaid.x", "%nctaid.y", "%nctaid.z", "%laneid", "%warpid"]

NORMAL, BRA, EXIT, BAR = 0, 1, 2, 3


def op(*names):
    def reg(f):
        for n in names:
            OPS[n] = f
        return f
    return reg


class Instr:
    __slots__ = ("line", "text", "kind", "fn", "target", "guard", "neg")

    def __init__(self, line, text, kind, fn=None, target=None, guard=None, neg=False):
        self.line, self.text, self.kind, self.fn = line, text, kind, fn
        self.target, self.guard, self.neg = target, guard, neg


class Decoder:
    def __init__(self, filename: str, entry, shared_layout: dict, labels: dict):
        self.filename = filename
        self.entry = entry
        self.regs: dict[str, tuple[int, PType]] = {}
        self.reg_types: list[PType] = []
        for s in SPECIALS:
            self._add_reg(s, TYPES["u32"])
        for name, t in entry.regs:
            if name in self.regs:
                raise SimError(f"{filename}:{entry.line}: register {name} declared twice")
            self._add_reg(name, t)
        self.shared = shared_layout            # name -> offset in the CTA's shared window
        self.labels = labels
        self.params = {}
        off = 0
        for name, t in entry.params:
            a = t.bits // 8
            off = -(-off // a) * a
            self.params[name] = (off, t)
            off += a
        self.param_size = off

    def _add_reg(self, name, t):
        self.regs[name] = (len(self.reg_types), t)
        self.reg_types.append(t)

    # ---------------------------------------------------------------------------- errors/mods
    def err(self, s: Stmt, msg: str) -> SimError:
        return SimError(f"{self.filename}:{s.line}: {msg} in `{s.text}`")

    def mods(self, s: Stmt, flags: set, ntypes: int, types: set | None = None):
        """Split s.mods into (present flags, [types]); unknown modifiers are errors."""
        fl, ty = set(), []
        for m in s.mods:
            if m in TYPES and (types is None or m in types):
                ty.append(TYPES[m])
            elif m in flags:
                if m in fl:
                    raise self.err(s, f"repeated modifier .{m}")
                fl.add(m)
            else:
                raise self.err(s, f"unsupported modifier .{m} for {s.opcode}")
        if len(ty) != ntypes:
            raise self.err(s, f"{s.opcode} needs {ntypes} type modifier(s), got {len(ty)}")
        return fl, ty

    def nops(self, s: Stmt, n: int):
        if len(s.operands) != n:
            raise self.err(s, f"{s.opcode} takes {n} operands, got {len(s.operands)}")
        return s.operands

    def one_of(self, s: Stmt, fl: set, choices, required=False, default=None):
        got = [c for c in choices if c in fl]
        if len(got) > 1:
            raise self.err(s, f"conflicting modifiers {got}")
        if required and not got:
            raise self.err(s, f"{s.opcode} needs one of {['.' + c for c in choices]}")
        return got[0] if got else default

    # -------------------------------------------------------------------------------- operands
    def reg(self, s: Stmt, o) -> tuple[int, PType]:
        if o[0] not in ("reg", "name") or o[1] not in self.regs:
            raise self.err(s, f"unknown register {o[1] if len(o) > 1 else o!r}")
        return self.regs[o[1]]

    def reader(self, s: Stmt, o, T: PType, wide: bool = False):
        """fn(st, idx) -> array of T.np; `wide` lets a wider register be read truncated."""
        kind = o[0]
        if kind == "not":
            if T.kind != "pred":
                raise self.err(s, "'!' only applies to predicates")
            f = self.reader(s, o[1], T)
            return lambda st, idx: ~f(st, idx)
        if kind in ("imm", "fimm"):
            return self._imm(s, o, T)
        if kind == "name" and o[1] not in self.regs:
            if o[1] in self.shared and T.kind in "bu" and T.bits in (32, 64):
                v = T.np.type(self.shared[o[1]])
                return lambda st, idx: np.full(idx.size, v)
            raise self.err(s, f"unknown operand {o[1]}")
        if kind not in ("reg", "name"):
            raise self.err(s, f"unexpected operand form {kind}")
        i, RT = self.reg(s, o)
        if (T.kind == "pred") != (RT.kind == "pred"):
            raise self.err(s, f"register {o[1]} (.{RT.name}) used as .{T.name}")
        if T.kind == "pred":
            return lambda st, idx: st.R[i][idx]
        if RT.bits == T.bits:
            if T.np == UINT[T.bits]:
                return lambda st, idx: st.R[i][idx]
            dt = T.np
            return lambda st, idx: st.R[i][idx].view(dt)
        if RT.bits > T.bits and wide:
            u, dt = UINT[T.bits], T.np
            return lambda st, idx: st.R[i][idx].astype(u).view(dt)
        raise self.err(s, f"register {o[1]} (.{RT.name}) has the wrong size for .{T.name}")

    def _imm(self, s, o, T):
        if T.kind == "pred":
            if o[0] != "imm" or o[1] not in (0, 1):
                raise self.err(s, "predicate immediate must be 0 or 1")
            v = bool(o[1])
        elif T.kind == "f":
            if o[0] == "fimm" and o[2] is not None and o[3] == T.bits:
                v = np.array([o[2]], UINT[T.bits]).view(T.np)[0]
            else:
                v = T.np.type(o[1])
        else:
            if o[0] != "imm":
                raise self.err(s, f"float immediate for integer type .{T.name}")
            v = np.array([o[1] & ((1 << T.bits) - 1)], UINT[T.bits]).view(T.np)[0]
        return lambda st, idx: np.full(idx.size, v)

    def writer(self, s: Stmt, o, T: PType, wide: bool = False):
        """fn(st, idx, values); `wide` extends into a wider register (sign for .s types)."""
        if o[0] == "name" and o[1] == "_":
            return lambda st, idx, v: None
        if o[0] not in ("reg", "name"):
            raise self.err(s, "destination must be a register")
        i, RT = self.reg(s, o)
        if i < len(SPECIALS):
            raise self.err(s, f"cannot write special register {o[1]}")
        if (T.kind == "pred") != (RT.kind == "pred"):
            raise self.err(s, f"register {o[1]} (.{RT.name}) written as .{T.name}")
        if T.kind == "pred":
            def wp(st, idx, v):
                st.R[i][idx] = v
            return wp
        dt, u = T.np, UINT[RT.bits]
        if RT.bits == T.bits:
            def w(st, idx, v):
                st.R[i][idx] = v.astype(dt, copy=False).view(u)
            return w
        if RT.bits > T.bits and wide:
            if T.kind == "s":
                def ws(st, idx, v):
                    st.R[i][idx] = v.astype(dt, copy=False).astype(np.int64).astype(u)
                return ws
            tu = UINT[T.bits]

            def wu(st, idx, v):
                st.R[i][idx] = v.astype(dt, copy=False).view(tu).astype(u)
            return wu
        raise self.err(s, f"register {o[1]} (.{RT.name}) has the wrong size for .{T.name}")

    def vec(self, s: Stmt, o, n: int):
        if o[0] != "vec" or len(o[1]) != n:
            raise self.err(s, f"expected a vector of {n} registers")
        return o[1]

    def address(self, s: Stmt, o, space: str):
        """fn(st, idx) -> int64 addresses (shared: offsets in the CTA's shared window)."""
        if o[0] != "addr":
            raise self.err(s, "expected an address operand [..]")
        base, off = o[1], o[2]
        if base is None:
            return lambda st, idx: np.full(idx.size, off, np.int64)
        if base in self.regs:
            i, RT = self.regs[base]
            if RT.kind == "pred" or RT.bits not in (32, 64):
                raise self.err(s, f"address register {base} must be 32 or 64 bits")
            if off:
                return lambda st, idx: st.R[i][idx].astype(np.int64) + off
            return lambda st, idx: st.R[i][idx].astype(np.int64)
        if space == "shared" and base in self.shared:
            v = self.shared[base] + off
            return lambda st, idx: np.full(idx.size, v, np.int64)
        raise self.err(s, f"unknown address base {base} for .{space}")

    def target(self, s: Stmt, o) -> int:
        if o[0] not in ("name", "reg") or o[1] not in self.labels:
            raise self.err(s, f"unknown branch target {o[1] if len(o) > 1 else o!r}")
        return self.labels[o[1]]


def decode_entry(filename: str, entry, shared_layout: dict):
    """-> (list[Instr], Decoder)."""
    from . import ops_float, ops_int, ops_mem, ops_warp  # noqa: F401  (register their OPS)

    labels, pc = {}, 0
    for item in entry.body:
        if isinstance(item, tuple):
            if item[1] in labels:
                raise SimError(f"{filename}:{item[2]}: duplicate label {item[1]}")
            labels[item[1]] = pc
        else:
            pc += 1
    d = Decoder(filename, entry, shared_layout, labels)
    prog = []
    for s in entry.body:
        if isinstance(s, tuple):
            continue
        guard, neg = None, False
        if s.guard:
            gi, gt = d.reg(s, ("reg", s.guard[0]))
            if gt.kind != "pred":
                raise d.err(s, f"guard {s.guard[0]} is not a predicate")
            guard, neg = gi, s.guard[1]
        if s.opcode == "bra":
            if set(s.mods) - {"uni"}:
                raise d.err(s, f"unsupported modifier for bra: {s.mods}")
            prog.append(Instr(s.line, s.text, BRA, target=d.target(s, d.nops(s, 1)[0]), guard=guard, neg=neg))
        elif s.opcode in ("ret", "exit"):
            if s.mods or s.operands:
                raise d.err(s, f"unsupported form of {s.opcode}")
            prog.append(Instr(s.line, s.text, EXIT, guard=guard, neg=neg))
        elif s.opcode == "bar":
            if s.mods not in (["sync"], ["sync", "aligned"]) or guard is not None:
                raise d.err(s, "only unpredicated `bar.sync 0` is supported")
            o = d.nops(s, 1)[0]
            if o != ("imm", 0):
                raise d.err(s, "only barrier 0 with all threads (`bar.sync 0`) is supported")
            prog.append(Instr(s.line, s.text, BAR))
        elif s.opcode in OPS:
            prog.append(Instr(s.line, s.text, NORMAL, OPS[s.opcode](d, s), guard=guard, neg=neg))
        else:
            raise d.err(s, f"unsupported instruction {s.opcode!r}")
    # falling off the end of the body behaves like ret
    prog.append(Instr(entry.line, "<end of entry>", EXIT))
    return prog, d
