"""ptxsim integer/bit instructions against per-element Python references written from the PTX ISA
definitions (independent of the interpreter's vectorised NumPy code)."""
from pathlib import Path

import numpy as np
import pytest

from tools.ptxsim import GlobalMemory, Module

DATA = Path(__file__).parent / "data" / "ptxsim"
M32 = 0xFFFFFFFF


def s32(x):
    x &= M32
    return x - (1 << 32) if x >> 31 else x


def bfe(a, pos, ln, signed, width=32):
    pos, ln = pos & 0xFF, ln & 0xFF
    msb = width - 1
    sbit = (a >> min(pos + ln - 1, msb)) & 1 if (signed and ln) else 0
    d = 0
    for i in range(width):
        bit = (a >> (pos + i)) & 1 if (i < ln and pos + i <= msb) else sbit
        d |= bit << i
    return 0 if ln == 0 else d


def bfi(f, b, pos, ln):
    pos, ln = pos & 0xFF, ln & 0xFF
    d = b
    for i in range(ln):
        if pos + i > 31:
            break
        d = (d & ~(1 << (pos + i))) | (((f >> i) & 1) << (pos + i))
    return d & M32


def prmt(a, b, c):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    d = 0
    for i in range(4):
        nib = (c >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        d |= byte << (8 * i)
    return d


def lop3(a, b, c, lut):
    d = 0
    for i in range(32):
        idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        d |= ((lut >> idx) & 1) << i
    return d


def tdiv(a, b):
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def ref_ops(a, b, c):
    sa, sb = s32(a), s32(b)
    r = [
        bin(a).count("1"),
        32 - a.bit_length(),
        int(f"{a:032b}"[::-1], 2),
        bfe(a, b, c, False),
        bfe(a, b, c, True),
        bfi(a, b, c, c >> 8),
        prmt(a, b, c),
        (a << b) & M32 if b < 32 else 0,
        a >> b if b < 32 else 0,
        (sa >> min(b, 31)) & M32,
        (a * b) >> 32,
        ((sa * sb) >> 32) & M32,
        tdiv(sa, sb) & M32,
        (sa - tdiv(sa, sb) * sb) & M32,
        lop3(a, b, c, 0x96), lop3(a, b, c, 0xE8), lop3(a, b, c, 0x80), lop3(a, b, c, 0xCA),
        lop3(a, b, c, 0x01), lop3(a, b, c, 0xFE),
        (a * b + c) & M32,
        min(sa, sb) & M32,
        max(a, b),
        min(max(sa, 0), 255),
        s32(a & 0xFFFF if not a & 0x8000 else (a & 0xFFFF) - 0x10000) & M32,
        2 * int(sa < sb and a > c) + int(not sa < sb),
        a // b,
        a % b,
        ((sa * sb) >> 16) & M32,
        ((~(a ^ b) & c) | 5) & M32,
        abs(-sa) & M32 if sa != -(1 << 31) else 0x80000000,
        bfe(a | (c << 32), b, c, False, 64) & M32,
    ]
    return r


def test_lop3_truth_tables_by_hand():
    # ta=0xF0, tb=0xCC, tc=0xAA: lop3 of these constants reproduces immLut itself
    for lut in (0x96, 0xE8, 0x80, 0xCA, 0x01, 0xFE, 0x3C):
        assert lop3(0xF0, 0xCC, 0xAA, lut) & 0xFF == lut


def test_intops_against_isa_reference():
    rng = np.random.default_rng(7)
    n = 200
    a = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    b = rng.integers(1, 41, n).astype(np.uint32)              # shift/bfe positions incl. >= 32
    c = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    c[: n // 2] = rng.integers(0, 48, n // 2) | (rng.integers(0, 40, n // 2) << 8)
    # hand-picked corner cases
    a[:6] = [0, 0xFFFFFFFF, 0x80000000, 1, 0x7FFFFFFF, 0x12345678]
    b[:6] = [1, 31, 32, 33, 7, 0xFFFFFFFF]
    c[:6] = [0x3210, 0x7654, 0x0000, 0xBA98, 0x8888, 0x4321]
    b[b == 0] = 1
    mem = GlobalMemory()
    pa, pb, pc = mem.alloc_from(a), mem.alloc_from(b), mem.alloc_from(c)
    nops = len(ref_ops(1, 1, 1))
    out = mem.alloc(nops * n * 4)
    mod = Module((DATA / "intops.ptx").read_text(), "intops.ptx")
    mod.launch("intops", grid=(2, 1, 1), block=(128, 1, 1), args=[out, pa, pb, pc, n], mem=mem)
    got = mem.read(out, np.uint32, nops * n).reshape(nops, n)
    for i in range(n):
        exp = ref_ops(int(a[i]), int(b[i]), int(c[i]))
        for k in range(nops):
            assert int(got[k, i]) == exp[k], (k, hex(a[i]), hex(b[i]), hex(c[i]), hex(got[k, i]), hex(exp[k]))


@pytest.mark.parametrize("a,pos,ln,signed,exp", [
    (0xF0, 4, 4, False, 0xF), (0xF0, 4, 4, True, 0xFFFFFFFF), (0x70, 4, 4, True, 7),
    (0x80000000, 31, 8, True, 0xFFFFFFFF), (0x80000000, 40, 8, True, 0xFFFFFFFF),
    (0x80000000, 40, 8, False, 0), (0xABCD, 0, 0, True, 0),
])
def test_bfe_by_hand(a, pos, ln, signed, exp):
    assert bfe(a, pos, ln, signed) == exp


@pytest.mark.parametrize("file,marker", [("gemv.ptx", "@%p1 bra A16_DONE;"), ("gemv.ptx", "@%p1 bra Q_DONE;"),
                                         ("bgemm_b1.ptx", "// ---- single write of the output tile ----")])
def test_output_index_of_the_gemms_is_64_bit(file, marker):
    """y[m, n] at m*N + n: with a long prefill and a large vocabulary M*N passes 2^32 (32768 x 128256), so
    the output epilogue must not form m*N in 32 bits (%r2 holds N). The interpreter cannot show the wrap
    (it would need 16 GiB), so this reads the PTX: no 32-bit multiply by N from the marker to the store."""
    import re
    text = (Path(__file__).resolve().parents[1] / "ptx" / file).read_text()
    assert "ld.param.u32 %r2, [N];" in text
    tail = text[text.index(marker):]
    tail = tail[:tail.index("\n}")]
    bad = re.findall(r"(?:mad|mul)\.lo\.u32 [^;]*%r2\b[^;]*;", tail)
    assert not bad, f"{file}: 32-bit m*N in the output epilogue: {bad}"
    assert re.search(r"mul\.wide\.u32 %rd\d+, %r\d+, %r2;", tail)          # m * N formed in 64 bits
