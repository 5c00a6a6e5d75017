"""ptxsim float arithmetic and cvt rounding against exact rational references (fractions.Fraction),
i.e. computed from the IEEE/PTX definitions, not from the interpreter's NumPy code."""
import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from tools.ptxsim import GlobalMemory, Module

DATA = Path(__file__).parent / "data" / "ptxsim"


def fround(v: Fraction, mode: str, dt=np.float32):
    """Correctly rounded value of the exact rational v in the given mode."""
    if v == 0:
        return dt(0.0)
    f = dt(float(v))
    inf = dt(np.inf)
    cands = {f, np.nextafter(f, -inf), np.nextafter(f, inf)}
    cands = [c for c in cands if np.isfinite(c)]
    below = max((c for c in cands if Fraction(float(c)) <= v), key=float)
    above = min((c for c in cands if Fraction(float(c)) >= v), key=float)
    if below == above:
        return below
    if mode == "rz":
        return below if v > 0 else above
    if mode == "rm":
        return below
    if mode == "rp":
        return above
    lo, hi = v - Fraction(float(below)), Fraction(float(above)) - v
    if lo != hi:
        return below if lo < hi else above
    bits = np.array([below], dt).view(np.uint32 if dt == np.float32 else np.uint16)[0]
    return below if bits % 2 == 0 else above


def bits(x, dt=np.float32):
    return int(np.array([x], dt).view(np.uint32 if dt == np.float32 else np.uint16)[0])


def to_int(x, fn, lo, hi):
    if math.isnan(x):
        return 0
    if math.isinf(x):
        return hi if x > 0 else lo
    return min(max(fn(x), lo), hi)


def sqrt_rn(x: float):
    c = np.float32(math.sqrt(x))
    for cand in (np.nextafter(c, np.float32(0)), c, np.nextafter(c, np.float32(np.inf))):
        lo = (Fraction(float(np.nextafter(cand, np.float32(0)))) + Fraction(float(cand))) / 2
        hi = (Fraction(float(np.nextafter(cand, np.float32(np.inf)))) + Fraction(float(cand))) / 2
        if lo * lo <= Fraction(x) <= hi * hi:
            return cand
    raise AssertionError


def ref_row(k, x, y, z, n):
    """Expected 32-bit result of op k, or None where the reference does not apply."""
    X, Y, Z = float(x), float(y), float(z)
    fin = all(map(math.isfinite, (X, Y, Z)))
    S32 = (-(1 << 31), (1 << 31) - 1)
    if k == 0 or k == 21:
        return to_int(X, round, *S32) & 0xFFFFFFFF
    if k == 1 or k == 5:
        return to_int(X, math.trunc, *S32) & 0xFFFFFFFF
    if k == 2:
        return to_int(X, math.floor, *S32) & 0xFFFFFFFF
    if k == 3:
        return to_int(X, math.ceil, *S32) & 0xFFFFFFFF
    if k == 4:
        return to_int(X, round, 0, (1 << 32) - 1)
    sn = n - (1 << 32) if n >> 31 else n
    if 6 <= k <= 9:
        return bits(fround(Fraction(sn), ["rn", "rz", "rm", "rp"][k - 6]))
    if k == 27:
        return bits(fround(Fraction(n), "rn"))
    if k == 24:
        return bits(x) ^ 0x80000000
    if k == 25:
        return int(not (X <= Y))
    if k == 26:
        return int(X != Y and not math.isnan(X) and not math.isnan(Y))
    if k == 22:
        if math.isnan(X) or math.isnan(Y):
            return bits(y if math.isnan(X) else x)
        return bits(np.float32(min(X, Y)))
    if not fin:
        return None
    Fx, Fy, Fz = Fraction(X), Fraction(Y), Fraction(Z)
    table = {10: (Fx * Fy + Fz, "rn"), 11: (Fx * Fy + Fz, "rz"), 12: (Fx + Fy, "rz"),
             13: (Fx * Fy, "rz"), 16: (Fx + Fy, "rn"), 17: (Fx * Fy, "rn")}
    if k in table:
        v, mode = table[k]
        if abs(v) > Fraction(3.4e38):
            return None
        if v == 0:     # exact zero: its sign follows IEEE rules, which Python floats implement
            return bits(np.float32({10: X * Y + Z, 11: X * Y + Z, 12: X + Y, 16: X + Y}.get(k, X * Y)))
        return bits(fround(v, mode))
    if k == 18:
        if Y == 0 or abs(Fx / Fy) > Fraction(3.4e38):
            return None
        return bits(np.float32(X / Y)) if X == 0 else bits(fround(Fx / Fy, "rn"))
    if k == 19:
        return 0 if X == 0 else bits(sqrt_rn(abs(X)))
    if k in (14, 15):
        if X == 0:
            h = np.float16(X)
        elif abs(X) >= 65520:
            h = np.float16(np.inf if X > 0 else -np.inf)
        elif abs(X) > 65504:                   # below the overflow threshold: largest finite
            h = np.float16(math.copysign(65504.0, X))
        else:
            h = fround(Fx, "rn", np.float16)
        return bits(h, np.float16) if k == 14 else bits(np.float32(h))
    if k == 20:
        v = (X * Y + Z) / 3.0                  # Python floats are IEEE doubles, .rn each
        if v == 0:
            return bits(np.float32(v))
        return None if abs(v) > 3.4e38 else bits(fround(Fraction(v), "rn"))
    if k == 23:
        v = fround(Fx + Fy, "rn")
        return bits(np.float32(min(max(float(v), 0.0), 1.0)))
    raise AssertionError(k)


def test_fltops_against_exact_reference():
    specials = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999998, -3.7, 3.7, 1e10, -1e10, np.nan, np.inf,
                -np.inf, 0.0, -0.0, 65519.0, 65520.0, 1 + 2 ** -12, 4294967295.5, -2147483648.0]
    rng = np.random.default_rng(3)
    n = 160
    x = np.concatenate([np.array(specials, np.float32),
                        (rng.standard_normal(n - len(specials)) * 10 ** rng.uniform(-3, 6, n - len(specials)))])
    x = x.astype(np.float32)
    y = (rng.standard_normal(n) * 100).astype(np.float32)
    z = (rng.standard_normal(n) * 100).astype(np.float32)
    y[:len(specials)] = np.float32(1.25)
    # fma double-rounding trap: x*y = 1 + 2^-11 + 2^-24 exactly (an f32 midpoint), z = 2^-80
    x[18], y[18], z[18] = 1 + 2 ** -12, 1 + 2 ** -12, 2.0 ** -80
    y[19], z[19] = np.nan, 1.0
    ks = rng.integers(-(1 << 31), 1 << 31, n, dtype=np.int64)
    ks[:8] = [16777217, 16777219, -16777217, (1 << 31) - 1, -(1 << 31), 33554435, 0, 16777216 + 3]
    ku = ks.astype(np.uint32)
    mem = GlobalMemory()
    ptrs = [mem.alloc_from(a) for a in (x, y, z, ku)]
    nrows = 28
    out = mem.alloc(nrows * n * 4)
    mod = Module((DATA / "fltops.ptx").read_text(), "fltops.ptx")
    mod.launch("fltops", grid=(1, 1, 1), block=(n, 1, 1), args=[out] + ptrs + [n], mem=mem)
    got = mem.read(out, np.uint32, nrows * n).reshape(nrows, n)
    checked = 0
    for i in range(n):
        for k in range(nrows):
            exp = ref_row(k, x[i], y[i], z[i], int(ku[i]))
            if exp is None:
                continue
            checked += 1
            assert int(got[k, i]) == exp, (k, i, x[i], y[i], z[i], int(ku[i]), hex(got[k, i]), hex(exp))
    assert checked > 0.8 * n * nrows
    # the double-rounding trap must round up, away from the f64-rounded tie
    assert got[10, 18] == bits(np.float32(1 + 2 ** -11 + 2 ** -23))


def test_cvt_ties_by_hand():
    # spot values straight from the definitions, independent of the reference helper
    mem = GlobalMemory()
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    n = x.size
    ptrs = [mem.alloc_from(x), mem.alloc_from(x), mem.alloc_from(x), mem.alloc_from(np.zeros(n, np.uint32))]
    out = mem.alloc(28 * n * 4)
    Module((DATA / "fltops.ptx").read_text(), "fltops.ptx").launch(
        "fltops", block=(n, 1, 1), args=[out] + ptrs + [n], mem=mem)
    got = mem.read(out, np.int32, 28 * n).reshape(28, n)
    assert got[0].tolist() == [0, 2, 2, 0, -2, -2]        # rni: ties to even
    assert got[1].tolist() == [0, 1, 2, 0, -1, -2]        # rzi
    assert got[2].tolist() == [0, 1, 2, -1, -2, -3]       # rmi
    assert got[3].tolist() == [1, 2, 3, 0, -1, -2]        # rpi
    assert got[4].tolist() == [0, 2, 2, 0, 0, 0]          # rni to u32 clamps negatives to 0
