"""ptxsim warp-synchronous instructions: shfl.sync modes (incl. out-of-range lanes and the
predicate), vote.sync, and mma.sync m16n8k256 b1 with the PTX ISA fragment layout."""
import time
from pathlib import Path

import numpy as np
import pytest

from tools.ptxsim import GlobalMemory, Module

DATA = Path(__file__).parent / "data" / "ptxsim"
MOD = None


def mod():
    global MOD
    if MOD is None:
        MOD = Module((DATA / "warp.ptx").read_text(), "warp.ptx")
    return MOD


def shfl_ref(mode, lane, b, c):
    """PTX ISA pseudo-code of shfl.sync for one lane -> (source lane, predicate)."""
    bval, cval, seg = b & 31, c & 31, (c >> 8) & 31
    max_lane = (lane & seg) | (cval & ~seg)
    min_lane = lane & seg
    if mode == "up":
        j = lane - bval
        p = j >= max_lane
    elif mode == "down":
        j = lane + bval
        p = j <= max_lane
    elif mode == "bfly":
        j = lane ^ bval
        p = j <= max_lane
    else:
        j = min_lane | (bval & ~seg)
        p = j <= max_lane
    return (j if p else lane), p


@pytest.mark.parametrize("b,c", [(1, 0x1F), (1, 0), (3, 0x1F), (5, 0x181F), (17, 0x1F), (2, 0x0F), (31, 0x1F)])
def test_shfl_modes(b, c):
    n = 64
    mem = GlobalMemory()
    out = mem.alloc(4 * n * 8)
    mod().launch("shfl_test", block=(n, 1, 1), args=[out, b, c], mem=mem)
    got = mem.read(out, np.uint32, 4 * n * 2).reshape(4, n, 2)
    for m, mode in enumerate(["up", "down", "bfly", "idx"]):
        for t in range(n):
            j, p = shfl_ref(mode, t % 32, b, c)
            assert got[m, t].tolist() == [10 * ((t // 32) * 32 + j) + 1, int(p)], (mode, t, b, c)


def test_shfl_hand_values():
    mem = GlobalMemory()
    out = mem.alloc(4 * 32 * 8)
    mod().launch("shfl_test", block=(32, 1, 1), args=[out, 1, 0x1F], mem=mem)
    got = mem.read(out, np.uint32, 4 * 32 * 2).reshape(4, 32, 2)
    # down by 1: lane 31 has no source in range -> its own value, predicate false
    assert got[1, 30].tolist() == [311, 1] and got[1, 31].tolist() == [311, 0]
    # bfly 1: lane 4 <-> 5 ; idx 1 with c = 0x1f: everyone reads lane 1
    assert got[2, 4].tolist() == [51, 1] and got[3, 17].tolist() == [11, 1]
    # up by 1 with c = 0x1f: maxLane = 31, j = lane - 1 >= 31 only fails -> own value
    assert got[0, 5].tolist() == [51, 0]


def test_vote():
    n = 64
    x = np.zeros(n, np.uint32)
    x[[0, 3, 31]] = 1
    x[32:] = 1
    mem = GlobalMemory()
    out = mem.alloc(n * 16)
    mod().launch("vote_test", block=(n, 1, 1), args=[out, mem.alloc_from(x)], mem=mem)
    got = mem.read(out, np.uint32, n * 4).reshape(n, 4)
    assert (got[:32, 0] == (1 | 8 | (1 << 31))).all() and (got[32:, 0] == 0xFFFFFFFF).all()
    assert (got[:, 1] == 1).all()
    assert (got[:32, 2] == 0).all() and (got[32:, 2] == 1).all()
    assert (got[:, 3] == 1).all()


# ------------------------------------------------------------------------------------------ mma
def frag_a(A):
    """A: (16, 256) bits -> (32 lanes, 4) u32 per the ISA table (g = lane >> 2, t = lane & 3)."""
    out = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r, (row, k0) in enumerate([(g, 32 * t), (g + 8, 32 * t), (g, 128 + 32 * t), (g + 8, 128 + 32 * t)]):
            out[lane, r] = sum(int(A[row, k0 + j]) << j for j in range(32))
    return out


def frag_b(B):
    """B: (256, 8) bits -> (32, 2) u32."""
    out = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r, k0 in enumerate([32 * t, 128 + 32 * t]):
            out[lane, r] = sum(int(B[k0 + j, g]) << j for j in range(32))
    return out


def frag_c(C):
    out = np.zeros((32, 4), np.int32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out[lane] = [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    return out


def unfrag_c(F):
    C = np.zeros((16, 8), np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = F[lane]
    return C


def run_mma(As, Bs, Cs, iters=1, module=None):
    nw = len(As)
    mem = GlobalMemory()
    af = mem.alloc_from(np.stack([frag_a(a) for a in As]))
    bf = mem.alloc_from(np.stack([frag_b(b) for b in Bs]))
    cf = mem.alloc_from(np.stack([frag_c(c) for c in Cs]))
    out = mem.alloc(nw * 32 * 16)
    t0 = time.perf_counter()
    (module or mod()).launch("mma_test", block=(32 * nw, 1, 1), args=[out, af, bf, cf, iters], mem=mem)
    dt = time.perf_counter() - t0
    F = mem.read(out, np.int32, nw * 128).reshape(nw, 32, 4)
    return [unfrag_c(F[w]) for w in range(nw)], dt


@pytest.mark.parametrize("m,k,n", [(0, 0, 0), (5, 37, 3), (12, 200, 7), (15, 255, 0), (8, 128, 6), (3, 127, 1)])
def test_mma_single_bit_lands_at_m_n(m, k, n):
    A = np.zeros((16, 256), np.uint8)
    B = np.zeros((256, 8), np.uint8)
    A[m, k] = 1
    B[k, n] = 1
    D, _ = run_mma([A], [B], [np.zeros((16, 8), np.int64)])
    exp = np.zeros((16, 8), np.int64)
    exp[m, n] = 1
    assert np.array_equal(D[0], exp)
    # a bit of B at a different k contributes nothing
    B2 = np.zeros((256, 8), np.uint8)
    B2[(k + 1) % 256, n] = 1
    D2, _ = run_mma([A], [B2], [np.zeros((16, 8), np.int64)])
    assert not D2[0].any()


def test_mma_random_against_popcount_matmul():
    rng = np.random.default_rng(11)
    nw = 4
    As = [rng.integers(0, 2, (16, 256), np.uint8) for _ in range(nw)]
    Bs = [rng.integers(0, 2, (256, 8), np.uint8) for _ in range(nw)]
    Cs = [rng.integers(-1000, 1000, (16, 8)) for _ in range(nw)]
    D, _ = run_mma(As, Bs, Cs, iters=3)
    for w in range(nw):
        ref = Cs[w] + 3 * (As[w].astype(np.int64) @ Bs[w].astype(np.int64))
        assert np.array_equal(D[w], ref)


def test_mma_loop_speed():
    """128-thread CTA, 256 iterations of a 4-instruction loop with one mma.sync each."""
    rng = np.random.default_rng(1)
    As = [rng.integers(0, 2, (16, 256), np.uint8) for _ in range(4)]
    Bs = [rng.integers(0, 2, (256, 8), np.uint8) for _ in range(4)]
    Cs = [np.zeros((16, 8), np.int64)] * 4
    D, dt = run_mma(As, Bs, Cs, iters=256)
    assert np.array_equal(D[0], 256 * (As[0].astype(np.int64) @ Bs[0]))
    print(f"\nmma loop: 128 threads, 256 mma.sync (~1040 dynamic instructions) in {dt * 1e3:.1f} ms")
    assert dt < 2.0


MMA_AND = ("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%r8, %r9, %r10, %r11}, "
           "{%r2, %r3, %r4, %r5}, {%r6, %r7}, {%r8, %r9, %r10, %r11};")


def mma_variant(shape, bop):
    """warp.ptx with its mma replaced by another shape / bit op (k128 reads only a0, a1 and b0)."""
    a, b = ("{%r2, %r3, %r4, %r5}", "{%r6, %r7}") if shape == "m16n8k256" else ("{%r2, %r3}", "{%r6}")
    line = (f"mma.sync.aligned.{shape}.row.col.s32.b1.b1.s32.{bop}.popc {{%r8, %r9, %r10, %r11}}, "
            f"{a}, {b}, {{%r8, %r9, %r10, %r11}};")
    text = (DATA / "warp.ptx").read_text()
    assert MMA_AND in text
    return Module(text.replace(MMA_AND, line), f"warp-{shape}-{bop}.ptx")


@pytest.mark.parametrize("shape,bop", [("m16n8k256", "xor"), ("m16n8k128", "xor"), ("m16n8k128", "and")])
def test_mma_xor_and_k128_against_bit_matmul(shape, bop):
    """D = C + iters * sum_k op(A[m, k], B[k, n]) over the first K = 256 or 128 bits."""
    rng = np.random.default_rng(23)
    K = 256 if shape == "m16n8k256" else 128
    As = [rng.integers(0, 2, (16, 256), np.uint8) for _ in range(2)]
    Bs = [rng.integers(0, 2, (256, 8), np.uint8) for _ in range(2)]
    Cs = [rng.integers(-1000, 1000, (16, 8)) for _ in range(2)]
    D, _ = run_mma(As, Bs, Cs, iters=2, module=mma_variant(shape, bop))
    for A, B, C, got in zip(As, Bs, Cs, D):
        a, b = A[:, :K].astype(np.int64), B[:K].astype(np.int64)
        pair = a[:, :, None] ^ b[None, :, :] if bop == "xor" else a[:, :, None] & b[None, :, :]
        assert np.array_equal(got, C + 2 * pair.sum(axis=1))
