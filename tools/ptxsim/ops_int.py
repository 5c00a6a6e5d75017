"""Integer, bit, comparison and move instructions (PTX ISA semantics, wrap-around arithmetic).

Shifts clamp the amount: shl/shr by >= width give 0 (shr.s gives the sign fill).  bfe/bfi follow
the ISA pseudo-code (position and length taken from the low 8 bits; fields running past the msb are
cut; bfe.s replicates the sign bit of the field).  Division by zero is reported as an error.
"""
from __future__ import annotations

import numpy as np

from .decode import op
from .errors import SimError
from .parser import TYPES, UINT

INT = {"u16", "u32", "u64", "s16", "s32", "s64"}
BITS = {"b16", "b32", "b64"}
U32 = TYPES["u32"]
_BREV8 = np.array([int(f"{i:08b}"[::-1], 2) for i in range(256)], np.uint8)


def _float(d, s):
    from . import ops_float
    return ops_float.decode_float(d, s)


def _is_float(s):
    return any(m in ("f32", "f64", "f16") for m in s.mods)


def _binop(d, s, T, f, wide_dst=None, ntypes=None):
    dst, a, b = d.nops(s, 3)
    ra, rb = d.reader(s, a, T), d.reader(s, b, T)
    w = d.writer(s, dst, wide_dst or T)

    def run(st, idx):
        w(st, idx, f(ra(st, idx), rb(st, idx)))
    return run


def _wide(T):
    return TYPES[T.kind + str(T.bits * 2)]


def _mulhi(T):
    if T.bits <= 32:
        W = _wide(T).np

        def f(a, b):
            return ((a.astype(W) * b.astype(W)) >> T.bits).astype(T.np)
        return f
    mask = (1 << 64) - 1

    def f64(a, b):   # exact 128-bit product through Python integers (rare instruction)
        r = [(int(x) * int(y)) >> 64 for x, y in zip(a.tolist(), b.tolist())]
        return np.array([v & mask for v in r], np.uint64).view(T.np)
    return f64


@op("add", "sub", "mul", "min", "max")
def dec_arith(d, s):
    if _is_float(s):
        return _float(d, s)
    name = s.opcode
    if name == "mul":
        fl, (T,) = d.mods(s, {"lo", "hi", "wide"}, 1, INT)
        mode = d.one_of(s, fl, ["lo", "hi", "wide"], required=True)
        if mode == "lo":
            return _binop(d, s, T, lambda a, b: a * b)
        if mode == "hi":
            return _binop(d, s, T, _mulhi(T))
        if T.bits == 64:
            raise d.err(s, "mul.wide needs a 16/32-bit type")
        W = _wide(T)
        return _binop(d, s, T, lambda a, b: a.astype(W.np) * b.astype(W.np), wide_dst=W)
    fl, (T,) = d.mods(s, set(), 1, INT)
    f = {"add": np.add, "sub": np.subtract, "min": np.minimum, "max": np.maximum}[name]
    return _binop(d, s, T, f)


@op("mad")
def dec_mad(d, s):
    if _is_float(s):
        return _float(d, s)
    fl, (T,) = d.mods(s, {"lo", "hi", "wide"}, 1, INT)
    mode = d.one_of(s, fl, ["lo", "hi", "wide"], required=True)
    dst, a, b, c = d.nops(s, 4)
    ra, rb = d.reader(s, a, T), d.reader(s, b, T)
    CT = _wide(T) if mode == "wide" else T
    rc, w = d.reader(s, c, CT), d.writer(s, dst, CT)
    if mode == "lo":
        f = lambda x, y: x * y                      # noqa: E731
    elif mode == "hi":
        f = _mulhi(T)
    else:
        if T.bits == 64:
            raise d.err(s, "mad.wide needs a 16/32-bit type")
        f = lambda x, y: x.astype(CT.np) * y.astype(CT.np)  # noqa: E731

    def run(st, idx):
        w(st, idx, f(ra(st, idx), rb(st, idx)) + rc(st, idx))
    return run


@op("div", "rem")
def dec_divrem(d, s):
    if _is_float(s):
        return _float(d, s)
    fl, (T,) = d.mods(s, set(), 1, {"u32", "s32", "u64", "s64"})
    is_div = s.opcode == "div"

    def f(a, b):
        if (b == 0).any():
            raise SimError(f"integer division by zero in `{s.text}` (line {s.line})")
        if T.kind == "u":
            return a // b if is_div else a % b
        a64, b64 = a.astype(np.int64), b.astype(np.int64)
        q = np.abs(a64) // np.abs(b64)            # C semantics: truncate toward zero
        q = np.where((a64 < 0) != (b64 < 0), -q, q)
        r = q if is_div else a64 - q * b64
        return r.astype(T.np)
    return _binop(d, s, T, f)


@op("neg", "abs", "not", "popc", "clz", "brev")
def dec_unary(d, s):
    if s.opcode in ("neg", "abs") and _is_float(s):
        return _float(d, s)
    name = s.opcode
    allowed = {"neg": {"s16", "s32", "s64"}, "abs": {"s16", "s32", "s64"},
               "not": BITS | {"pred"}, "popc": {"b32", "b64"}, "clz": {"b32", "b64"},
               "brev": {"b32", "b64"}}[name]
    fl, (T,) = d.mods(s, set(), 1, allowed)
    dst, a = d.nops(s, 2)
    ra = d.reader(s, a, T)
    RT = U32 if name in ("popc", "clz") else T
    w = d.writer(s, dst, RT)
    if name == "neg":
        f = np.negative
    elif name == "abs":
        f = np.abs
    elif name == "not":
        f = np.logical_not if T.kind == "pred" else np.invert
    elif name == "popc":
        def f(x):
            return np.bitwise_count(x).astype(np.uint32)
    elif name == "clz":
        nb = T.bits

        def f(x):
            x = x.astype(np.uint64)
            n = np.zeros(x.shape, np.uint32)
            for sh in (32, 16, 8, 4, 2, 1):
                if sh >= nb:
                    continue
                top = x >> np.uint64(nb - sh) == 0
                n += np.where(top, sh, 0).astype(np.uint32)
                x = np.where(top, x << np.uint64(sh), x) & np.uint64((1 << nb) - 1)
            n += (x == 0).astype(np.uint32)   # x == 0: all nb bits are leading zeros
            return n
    else:
        def f(x):
            b = x.view(np.uint8).reshape(-1, T.bits // 8)
            return _BREV8[b[:, ::-1]].copy().view(T.np).reshape(-1)

    def run(st, idx):
        w(st, idx, f(ra(st, idx)))
    return run


@op("and", "or", "xor")
def dec_logic(d, s):
    fl, (T,) = d.mods(s, set(), 1, BITS | {"pred"})
    f = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}[s.opcode]
    return _binop(d, s, T, f)


@op("shl", "shr")
def dec_shift(d, s):
    types = BITS if s.opcode == "shl" else BITS | INT
    fl, (T,) = d.mods(s, set(), 1, types)
    dst, a, b = d.nops(s, 3)
    ra, rb, w = d.reader(s, a, T), d.reader(s, b, U32), d.writer(s, dst, T)
    nb = T.bits
    if s.opcode == "shl":
        def f(x, n):
            r = x << np.minimum(n, nb - 1).astype(T.np)
            return np.where(n >= nb, T.np.type(0), r)
    elif T.kind == "s":
        def f(x, n):
            return x >> np.minimum(n, nb - 1).astype(T.np)   # arithmetic: sign fill
    else:
        def f(x, n):
            r = x >> np.minimum(n, nb - 1).astype(T.np)
            return np.where(n >= nb, T.np.type(0), r)

    def run(st, idx):
        w(st, idx, f(ra(st, idx), rb(st, idx)))
    return run


def _mask(e):
    """(1 << e) - 1 as uint64 for e in [0, 64]."""
    e = e.astype(np.uint64)
    return np.where(e >= 64, np.uint64(0xFFFFFFFFFFFFFFFF),
                    (np.uint64(1) << np.minimum(e, 63)) - np.uint64(1))


@op("bfe")
def dec_bfe(d, s):
    fl, (T,) = d.mods(s, set(), 1, {"u32", "s32", "u64", "s64"})
    dst, a, b, c = d.nops(s, 4)
    ra, rb, rc, w = d.reader(s, a, T), d.reader(s, b, U32), d.reader(s, c, U32), d.writer(s, dst, T)
    nb, U = T.bits, UINT[T.bits]
    full = _mask(np.array([nb]))[0]

    def run(st, idx):
        x = ra(st, idx).view(U).astype(np.uint64)
        pos = (rb(st, idx) & 0xFF).astype(np.int64)
        ln = (rc(st, idx) & 0xFF).astype(np.int64)
        e = np.clip(np.minimum(ln, nb - pos), 0, nb)
        field = np.where(pos >= nb, np.uint64(0), x >> np.minimum(pos, 63).astype(np.uint64)) & _mask(e)
        if T.kind == "s":
            sb = np.clip(pos + ln - 1, 0, nb - 1).astype(np.uint64)
            sbit = (x >> sb) & np.uint64(1)
            field = np.where(sbit == 1, field | (full & ~_mask(e)), field)
        field = np.where(ln == 0, np.uint64(0), field)
        w(st, idx, field.astype(U).view(T.np))
    return run


@op("bfi")
def dec_bfi(d, s):
    fl, (T,) = d.mods(s, set(), 1, {"b32", "b64"})
    dst, f_, b, c, l_ = d.nops(s, 5)
    rf, rb = d.reader(s, f_, T), d.reader(s, b, T)
    rc, rl, w = d.reader(s, c, U32), d.reader(s, l_, U32), d.writer(s, dst, T)
    nb = T.bits

    def run(st, idx):
        fv = rf(st, idx).astype(np.uint64)
        bv = rb(st, idx).astype(np.uint64)
        pos = (rc(st, idx) & 0xFF).astype(np.int64)
        ln = (rl(st, idx) & 0xFF).astype(np.int64)
        n = np.where(pos >= nb, 0, np.clip(np.minimum(ln, nb - pos), 0, nb))
        sh = np.minimum(pos, 63).astype(np.uint64)
        m = _mask(n) << sh
        r = (bv & ~m) | ((fv << sh) & m)
        w(st, idx, r.astype(T.np))
    return run


@op("lop3")
def dec_lop3(d, s):
    fl, (T,) = d.mods(s, set(), 1, {"b32"})
    dst, a, b, c, lut = d.nops(s, 5)
    if lut[0] != "imm" or not 0 <= lut[1] <= 255:
        raise d.err(s, "lop3 immLut must be an immediate in [0, 255]")
    L = lut[1]
    ra, rb, rc, w = d.reader(s, a, T), d.reader(s, b, T), d.reader(s, c, T), d.writer(s, dst, T)

    def run(st, idx):
        x, y, z = ra(st, idx), rb(st, idx), rc(st, idx)
        nx, ny, nz = ~x, ~y, ~z
        r = np.zeros(x.shape, np.uint32)
        for i in range(8):          # minterm i selects (a, b, c) bits (i>>2&1, i>>1&1, i&1)
            if L >> i & 1:
                r |= (x if i & 4 else nx) & (y if i & 2 else ny) & (z if i & 1 else nz)
        w(st, idx, r)
    return run


@op("prmt")
def dec_prmt(d, s):
    fl, (T,) = d.mods(s, set(), 1, {"b32"})    # any mode modifier (.f4e ...) is rejected
    dst, a, b, c = d.nops(s, 4)
    ra, rb, rc, w = d.reader(s, a, T), d.reader(s, b, T), d.reader(s, c, T), d.writer(s, dst, T)

    def run(st, idx):
        src = np.stack([ra(st, idx), rb(st, idx)], axis=1).view(np.uint8)   # (n, 8): a0..a3 b0..b3
        sel = rc(st, idx)
        out = np.zeros((idx.size, 4), np.uint8)
        rows = np.arange(idx.size)
        for i in range(4):
            nib = (sel >> (4 * i)) & 0xF
            byte = src[rows, (nib & 7).astype(np.intp)]
            sign = (nib & 8) != 0
            out[:, i] = np.where(sign, np.where(byte & 0x80, 0xFF, 0), byte)
        w(st, idx, out.view(np.uint32).reshape(-1))
    return run


_CMP = {
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal,
}


@op("setp")
def dec_setp(d, s):
    cmps = set(_CMP) | {"equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan"}
    fl, (T,) = d.mods(s, cmps | {"and", "or", "xor", "ftz"}, 1,
                      INT | BITS | {"f32", "f64"})
    cmp = d.one_of(s, fl, sorted(cmps), required=True)
    bop = d.one_of(s, fl, ["and", "or", "xor"])
    if T.kind == "f" and cmp in ("lo", "ls", "hi", "hs"):
        raise d.err(s, f"setp.{cmp} is for integers")
    if T.kind != "f" and cmp in ("equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan"):
        raise d.err(s, f"setp.{cmp} is for floats")
    if T.kind == "b" and cmp not in ("eq", "ne"):
        raise d.err(s, f"setp.{cmp} needs a signed/unsigned type, not .{T.name}")
    if "ftz" in fl and T.name != "f32":
        raise d.err(s, ".ftz applies to f32 only")
    ops = s.operands
    if len(ops) not in (3, 4) or (bop is None) != (len(ops) == 3):
        raise d.err(s, "setp takes p[|q], a, b and, with .and/.or/.xor, a predicate c")
    P = TYPES["pred"]
    if ops[0][0] == "pair":
        wp, wq = d.writer(s, ops[0][1], P), d.writer(s, ops[0][2], P)
    else:
        wp, wq = d.writer(s, ops[0], P), None
    ra, rb = d.reader(s, ops[1], T), d.reader(s, ops[2], T)
    rc = d.reader(s, ops[3], P) if bop else None
    ftz = "ftz" in fl
    if cmp in _CMP:
        base = _CMP[cmp]
        f = base                                     # ordered: NaN compares false (ne too)
        if T.kind == "f" and cmp == "ne":
            def f(x, y):
                return (x != y) & ~np.isnan(x) & ~np.isnan(y)
    elif cmp == "num":
        def f(x, y):
            return ~np.isnan(x) & ~np.isnan(y)
    elif cmp == "nan":
        def f(x, y):
            return np.isnan(x) | np.isnan(y)
    else:
        base = _CMP[cmp[:2]]

        def f(x, y):
            return base(x, y) | np.isnan(x) | np.isnan(y)
    comb = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}.get(bop)

    def run(st, idx):
        x, y = ra(st, idx), rb(st, idx)
        if ftz:
            from .ops_float import flush
            x, y = flush(x), flush(y)
        with np.errstate(invalid="ignore"):
            r = f(x, y)
        if comb is not None:
            cv = rc(st, idx)
            wp(st, idx, comb(r, cv))
            if wq:
                wq(st, idx, comb(~r, cv))
        else:
            wp(st, idx, r)
            if wq:
                wq(st, idx, ~r)
    return run


@op("selp")
def dec_selp(d, s):
    fl, (T,) = d.mods(s, set(), 1, INT | BITS | {"f32", "f64"})
    dst, a, b, c = d.nops(s, 4)
    ra, rb, rc, w = d.reader(s, a, T), d.reader(s, b, T), d.reader(s, c, TYPES["pred"]), d.writer(s, dst, T)

    def run(st, idx):
        w(st, idx, np.where(rc(st, idx), ra(st, idx), rb(st, idx)))
    return run


@op("mov")
def dec_mov(d, s):
    fl, (T,) = d.mods(s, set(), 1, INT | BITS | {"f32", "f64", "pred"})
    dst, a = d.nops(s, 2)
    if a[0] == "vec" or dst[0] == "vec":            # pack / unpack: mov.b64 d, {lo, hi}
        vec = a if a[0] == "vec" else dst
        n = len(vec[1])
        if T.kind != "b" or n not in (2, 4) or T.bits // n < 8:
            raise d.err(s, "mov pack/unpack needs .b32/.b64 and 2 or 4 parts")
        PT = TYPES[f"b{T.bits // n}"]
        if a[0] == "vec":
            parts = [d.reader(s, x, PT) for x in vec[1]]
            w = d.writer(s, dst, T)

            def run(st, idx):
                w(st, idx, np.stack([p(st, idx) for p in parts], axis=1).reshape(-1).view(T.np))
            return run
        r = d.reader(s, a, T)
        ws = [d.writer(s, x, PT) for x in vec[1]]

        def run_u(st, idx):
            v = r(st, idx).view(PT.np).reshape(-1, n)
            for k, wk in enumerate(ws):
                wk(st, idx, np.ascontiguousarray(v[:, k]))
        return run_u
    ra, w = d.reader(s, a, T), d.writer(s, dst, T)

    def run(st, idx):
        w(st, idx, ra(st, idx))
    return run

