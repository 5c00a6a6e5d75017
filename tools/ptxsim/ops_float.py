"""Floating-point instructions and cvt.

Accuracy model (documented because it is a choice):
- f32 add/sub/mul/div/sqrt/rcp in round-to-nearest-even are NumPy float32 operations, which are
  IEEE correctly rounded, i.e. bit-exact with the GPU's .rn results.
- Directed roundings (.rz/.rm/.rp) and fma/mad are computed exactly: the f32 product is exact in
  float64 (24+24 bits < 53), the sum's rounding error is recovered exactly with TwoSum, and
  `round_f32` rounds value+error to f32 in the requested mode, correcting the one case where
  rounding the float64 sum first would double-round (a float64 sum sitting exactly on an f32
  midpoint).  So fma.rn.f32 is correctly rounded too.
- .approx instructions (div.approx, rcp.approx, sqrt.approx, rsqrt.approx, ex2.approx, lg2.approx)
  and div.full are computed correctly rounded from float64.  The GPU's approximations differ from
  these within the ulp bounds the PTX ISA documents (e.g. ex2.approx.f32: 2 ulp), so tests of
  kernels that use them must compare with a tolerance.
- .ftz flushes f32 subnormal inputs and results to sign-preserving zero; .sat clamps to [0, 1]
  with NaN -> 0.
- cvt float->int: rounding .rni/.rzi/.rmi/.rpi, result clamped to the destination range, NaN -> 0.
"""
from __future__ import annotations

import numpy as np

from .decode import op
from .parser import TYPES

F32, F64 = TYPES["f32"], TYPES["f64"]
_TINY = np.float32(np.finfo(np.float32).tiny)


def flush(x):
    if x.dtype != np.float32:
        return x
    return np.where(np.abs(x) < _TINY, np.copysign(np.float32(0), x), x).astype(np.float32)


def two_sum(a, b):
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, np.where(np.isfinite(s), err, 0.0)


def round_f32(s, err, mode):
    """Round the exact value s + err (float64 arrays; err None means 0) to float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = s.astype(np.float32)
        if mode == "rn" and err is None:
            return r
        r64 = r.astype(np.float64)
        dlt = s - r64
        if mode == "rn":
            cand = np.isfinite(r) & (err != 0) & (dlt != 0)
            if cand.any():
                other = np.nextafter(r, np.where(dlt > 0, np.float32(np.inf), np.float32(-np.inf)))
                mid = (r64 + other.astype(np.float64)) * 0.5 == s
                fix = cand & mid & ((err > 0) == (other > r))
                r = np.where(fix, other, r)
            return r
        e = err if err is not None else 0.0
        sign = np.sign(np.where(dlt != 0, dlt, e))          # sign of (exact - r)
        sign = np.where(np.isnan(s), 0, sign)
        if mode == "rz":
            step = ((r > 0) & (sign < 0)) | ((r < 0) & (sign > 0))
            return np.where(step, np.nextafter(r, np.float32(0)), r)
        if mode == "rm":
            return np.where(sign < 0, np.nextafter(r, np.float32(-np.inf)), r)
        return np.where(sign > 0, np.nextafter(r, np.float32(np.inf)), r)


def _sat(x):
    return np.where(np.isnan(x), x.dtype.type(0), np.clip(x, 0, 1)).astype(x.dtype)


_RND = ["rn", "rz", "rm", "rp"]


def _f32_binary(name, a, b, mode):
    if mode == "rn":
        with np.errstate(all="ignore"):
            return {"add": np.add, "sub": np.subtract, "mul": np.multiply}[name](a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if name == "mul":
        return round_f32(a64 * b64, None, mode)
    s, err = two_sum(a64, b64 if name == "add" else -b64)
    return round_f32(s, err, mode)


def fma_f32(a, b, c, mode):
    with np.errstate(all="ignore"):
        p = a.astype(np.float64) * b.astype(np.float64)
        s, err = two_sum(p, c.astype(np.float64))
        return round_f32(s, err, mode)


def decode_float(d, s):
    """add sub mul min max neg abs mad fma div on f32/f64."""
    name = s.opcode
    flags = {"ftz", "sat"} | set(_RND) | ({"approx", "full"} if name == "div" else set())
    fl, (T,) = d.mods(s, flags, 1, {"f32", "f64"})
    mode = d.one_of(s, fl, _RND + (["approx", "full"] if name == "div" else []))
    ftz, sat = "ftz" in fl, "sat" in fl
    if T.name == "f64" and (ftz or sat or mode not in (None, "rn")):
        raise d.err(s, "f64 supports only round-to-nearest without .ftz/.sat")
    if name in ("fma", "mad") and mode is None:
        raise d.err(s, f"{name}.f32 needs a rounding modifier (.rn/.rz/.rm/.rp)")
    if name in ("fma", "mad") and T.name == "f64":
        raise d.err(s, f"{name}.f64 is not implemented")
    if name == "div" and mode is None:
        raise d.err(s, "div.f32 needs .rn, .approx or .full")
    if name == "div" and mode in ("rz", "rm", "rp"):
        raise d.err(s, f"div.{mode} is not implemented")
    if name in ("min", "max", "neg", "abs") and mode is not None:
        raise d.err(s, f"{name} takes no rounding modifier")
    if name in ("min", "max", "neg", "abs") and sat:
        raise d.err(s, f"{name} takes no .sat")
    nin = {"neg": 1, "abs": 1, "fma": 3, "mad": 3}.get(name, 2)
    ops = d.nops(s, nin + 1)
    rs = [d.reader(s, o, T) for o in ops[1:]]
    w = d.writer(s, ops[0], T)
    mode = mode or "rn"

    if name in ("add", "sub", "mul"):
        if T.name == "f64":
            fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[name]
        else:
            def fn(a, b):
                return _f32_binary(name, a, b, mode)
    elif name in ("fma", "mad"):
        def fn(a, b, c):
            return fma_f32(a, b, c, mode)
    elif name == "div":
        fn = np.divide
    elif name == "min":
        fn = np.fmin              # PTX: a NaN operand yields the other operand
    elif name == "max":
        fn = np.fmax
    elif name == "neg":
        fn = np.negative
    else:
        fn = np.abs

    def run(st, idx):
        args = [r(st, idx) for r in rs]
        if ftz:
            args = [flush(x) for x in args]
        with np.errstate(all="ignore"):
            y = fn(*args)
        if ftz:
            y = flush(y)
        if sat:
            y = _sat(y)
        w(st, idx, y)
    return run


op("fma")(decode_float)


@op("rcp", "sqrt", "rsqrt", "ex2", "lg2")
def dec_special(d, s):
    name = s.opcode
    fl, (T,) = d.mods(s, {"rn", "approx", "ftz"}, 1, {"f32"})
    mode = d.one_of(s, fl, ["rn", "approx"], required=True)
    if name in ("rsqrt", "ex2", "lg2") and mode != "approx":
        raise d.err(s, f"{name} exists only as .approx")
    ftz = "ftz" in fl
    dst, a = d.nops(s, 2)
    ra, w = d.reader(s, a, T), d.writer(s, dst, T)
    f = {
        "rcp": lambda x: np.float32(1) / x,
        "sqrt": np.sqrt,
        "rsqrt": lambda x: (1.0 / np.sqrt(x.astype(np.float64))).astype(np.float32),
        "ex2": lambda x: np.exp2(x.astype(np.float64)).astype(np.float32),
        "lg2": lambda x: np.log2(x.astype(np.float64)).astype(np.float32),
    }[name]

    def run(st, idx):
        x = ra(st, idx)
        if ftz:
            x = flush(x)
        with np.errstate(all="ignore"):
            y = f(x).astype(np.float32)
        w(st, idx, flush(y) if ftz else y)
    return run


_IRND = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil}
_INTS = {f"{k}{b}" for k in "us" for b in (8, 16, 32, 64)}
_FLT = {"f16", "f32", "f64"}


def _int_range(T):
    return (0, (1 << T.bits) - 1) if T.kind == "u" else (-(1 << (T.bits - 1)), (1 << (T.bits - 1)) - 1)


def _float_to_int(x, T):
    lo, hi = _int_range(T)
    nan = np.isnan(x)
    x = np.where(nan, 0.0, x)
    big = x >= float(hi + 1)          # hi + 1 is a power of two: exact in float64
    small = x < float(lo)
    xs = np.where(big | small, 0.0, x)
    r = xs.astype(np.uint64 if T.kind == "u" and T.bits == 64 else np.int64)
    r = np.where(big, r.dtype.type(hi), np.where(small, r.dtype.type(lo), r))
    return r.astype(T.np)


def _int_to_f64_exact(a, A):
    """(s, err) with s + err == a exactly."""
    if A.bits <= 32:
        return a.astype(np.float64), None
    hi = (a >> np.array(32, a.dtype)).astype(np.float64) * 4294967296.0
    lo = (a & np.array(0xFFFFFFFF, a.dtype)).astype(np.float64)
    return two_sum(hi, lo)


@op("cvt")
def dec_cvt(d, s):
    fl, types = d.mods(s, set(_RND) | set(_IRND) | {"ftz", "sat"}, 2, _INTS | _FLT)
    D, A = types
    rnd = d.one_of(s, fl, _RND + list(_IRND))
    sat, ftz = "sat" in fl, "ftz" in fl
    dst, a = d.nops(s, 2)
    ra = d.reader(s, a, A, wide=A.kind != "f")
    w = d.writer(s, dst, D, wide=D.kind != "f")
    if ftz and F32 not in (A, D):
        raise d.err(s, ".ftz applies to f32 conversions only")

    if D.kind in "us" and A.kind in "us":
        if rnd:
            raise d.err(s, "integer-to-integer cvt takes no rounding modifier")
        lo, hi = _int_range(D)

        def f(x):
            if sat:
                if x.dtype == np.uint64:
                    x = np.minimum(x, np.uint64(hi)) if hi >= 0 else x
                    return x.astype(D.np)
                x = x.astype(np.int64)
                return np.clip(x, max(lo, -(1 << 63)), min(hi, (1 << 63) - 1)).astype(D.np)
            return x.astype(D.np)
    elif D.kind in "us":                      # float -> int
        if rnd not in _IRND:
            raise d.err(s, "float-to-integer cvt needs .rni/.rzi/.rmi/.rpi")
        g = _IRND[rnd]

        def f(x):
            if ftz:
                x = flush(x)
            return _float_to_int(g(x.astype(np.float64)), D)
    elif A.kind in "us":                      # int -> float
        if rnd not in _RND:
            raise d.err(s, "integer-to-float cvt needs .rn/.rz/.rm/.rp")
        if D.name == "f16":
            raise d.err(s, "integer-to-f16 cvt is not implemented")

        def f(x):
            sv, err = _int_to_f64_exact(x, A)
            if D.name == "f64":
                if rnd != "rn":
                    raise d.err(s, "directed rounding to f64 is not implemented")
                return sv
            return round_f32(sv, err, rnd)
    else:                                     # float -> float
        if D == A:
            if rnd not in _IRND:
                raise d.err(s, "same-type float cvt needs .rni/.rzi/.rmi/.rpi")
            g = _IRND[rnd]

            def f(x):
                return g(flush(x) if ftz else x).astype(D.np)
        elif D.bits > A.bits:
            if rnd is not None:
                raise d.err(s, "widening float cvt takes no rounding modifier")

            def f(x):
                return (flush(x) if ftz else x).astype(D.np)
        else:
            if rnd not in _RND:
                raise d.err(s, "narrowing float cvt needs .rn/.rz/.rm/.rp")
            if D.name == "f16" and rnd != "rn":
                raise d.err(s, f"cvt.{rnd}.f16 is not implemented")

            def f(x):
                if D.name == "f16":      # NumPy's float->half conversion is round-to-nearest-even
                    if A.name == "f64":
                        raise d.err(s, "cvt.f16.f64 is not implemented")
                    return x.astype(np.float16)
                y = round_f32(x.astype(np.float64), None, rnd)
                return flush(y) if ftz else y
    if sat and D.kind == "f":
        f0 = f

        def f(x):
            return _sat(f0(x))

    def run(st, idx):
        with np.errstate(all="ignore"):
            w(st, idx, f(ra(st, idx)))
    return run
