"""Shared-memory staging plans: layout, limits, bank conflicts, launch geometry (no GPU)."""
import itertools

import pytest

from runtime.staging import (ARCH_LIMITS, PlanError, acc_stride_words, frag_stride_words, plan_gemm,
                             plan_gemv)

KIB = 1024


def test_arch_limits_match_device_attributes():
    # cudaDevAttrMaxSharedMemoryPerBlockOptin / PerMultiprocessor as the devices report them
    optin = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
    per_sm = {"sm_80": 167936, "sm_86": 102400, "sm_89": 102400, "sm_90": 233472}
    for arch, lim in ARCH_LIMITS.items():
        assert lim.smem_per_block_optin == optin[arch] and lim.smem_per_sm == per_sm[arch]
        assert lim.smem_default == 49152 and lim.regs_per_sm == 65536 and lim.max_threads_per_block == 1024


def test_hand_computed_layout():
    p = plan_gemm(8, 64, 256, 1, 1, "sm_80", tile=(8, 32, 256), offsets=False)
    # stage: w 32 rows x 48 B, a 8 x 48, w_scales 2 x 128, a_scales 2 x 32, a_sums 2 x 32
    assert p.layout == {"w_planes.s0": 0, "a_planes.s0": 1536, "w_scales.s0": 1920, "a_scales.s0": 2176,
                        "a_sums.s0": 2240, "w_planes.s1": 2304, "a_planes.s1": 3840,
                        "w_scales.s1": 4224, "a_scales.s1": 4480, "a_sums.s1": 4544,
                        "psum": 4608, "out": 5760}
    assert p.buffer("psum").stride == 144 and p.smem_bytes == 6912 and not p.needs_opt_in
    assert p.block == (32, 1, 1) and p.grid() == (2, 1, 1) and p.mma_k == 128


CONFIGS = [
    (M, N, K, pb, qb, arch, mode)
    for arch in ARCH_LIMITS
    for (M, N, K) in [(1, 576, 576), (7, 1536, 576), (64, 576, 1536), (300, 4096, 4096), (2048, 11008, 4096)]
    for (pb, qb, mode) in [(1, 1, "quant"), (4, 8, "quant"), (8, 8, "quant"), (2, 16, "a16"), (4, 16, "a16")]
]


def _check_plan(p):
    lim = ARCH_LIMITS[p.arch]
    bufs = sorted(p.buffers, key=lambda b: b.offset)
    for a, b in zip(bufs, bufs[1:]):
        assert a.end <= b.offset, f"{a.name} overlaps {b.name}"
    for b in bufs:
        assert b.offset % 16 == 0 and b.stride % 4 == 0 and b.stride >= b.row_bytes
        if b.elem in ("b1", "f16"):
            assert b.stride % 16 == 0          # rows are filled with 16-byte cp.async
    assert p.smem_bytes >= bufs[-1].end and p.smem_bytes <= lim.smem_per_block_optin
    assert p.needs_opt_in == (p.smem_bytes > 48 * KIB)
    assert p.threads <= 1024 and p.threads % 32 == 0
    gx, gy, gz = p.grid()
    assert gx * p.BN >= p.N and gy * p.BM >= p.M and gz == p.split_k
    assert p.BK % 256 == 0 and p.Kp % 32 == 0 and p.Kp >= p.K
    # one stage holds p planes x BN rows and q planes x BM rows of BK bits
    w = p.buffer("w_planes.s0")
    assert (w.rows, w.row_bytes) == (p.p * p.BN, p.BK // 8)
    if p.mode == "quant":
        a = p.buffer("a_planes.s0")
        assert (a.rows, a.row_bytes) == (p.q * p.BM, p.BK // 8)
    else:
        a = p.buffer("a_half.s0")
        assert (a.rows, a.row_bytes) == (p.BM, p.BK * 2)
    assert p.blocks_per_sm >= 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_plans_fit_and_do_not_overlap(cfg):
    M, N, K, pb, qb, arch, mode = cfg
    _check_plan(plan_gemm(M, N, K, pb, qb, arch, mode))
    if M <= 8:
        _check_plan(plan_gemv(N, K, pb, qb, arch, mode, M=M))


def banks(buf, accesses):
    """Bank of each (row, word) access of one warp, from the buffer's offset and stride."""
    return [((buf.offset + r * buf.stride + 4 * w) // 4) % 32 for r, w in accesses]


# b1 m16n8k256/k128 A and B fragments and the f16 B fragment: lane = 4*row + word, +4 words for the
# second register; accumulator fragment c0/c1 (rows are tokens 2t / 2t+1, words are outputs g).
FRAG = [[(lane // 4, lane % 4 + h) for lane in range(32)] for h in (0, 4)]
ACC = [[(2 * (lane % 4) + h, lane // 4) for lane in range(32)] for h in (0, 1)]
ROW = [[(r, lane) for lane in range(32)] for r in (0, 3)]


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=lambda c: "-".join(map(str, c)))
def test_no_bank_conflicts(cfg):
    M, N, K, pb, qb, arch, mode = cfg
    p = plan_gemm(M, N, K, pb, qb, arch, mode)
    for b in p.buffers:
        pats = {"b1": FRAG, "f16": FRAG}.get(b.elem, [])
        if b.name in ("psum", "out"):
            pats = ACC + (ROW if b.row_bytes >= 128 else [])
        elif b.row_bytes >= 128:
            pats = pats + [[(0, lane) for lane in range(32)]]
        for pat in pats:
            bk = banks(b, pat)
            assert len(set(bk)) == 32, f"{b.name}: conflicting banks {sorted(bk)}"


def test_bank_check_catches_unpadded_strides():
    # the same fragment pattern over an unpadded 256-bit row (8 words) hits 16 banks twice each
    from runtime.staging import SmemBuffer
    unpadded = SmemBuffer("x", 0, 64, 32, 32, "b1")
    assert len(set(banks(unpadded, FRAG[0]))) == 16
    acc_unpadded = SmemBuffer("y", 0, 8, 256, 256, "s32")
    assert len(set(banks(acc_unpadded, ACC[0]))) < 32


def test_stride_rules():
    for w in range(1, 200):
        s = frag_stride_words(w)
        assert s >= w and s % 8 == 4 and s - w < 8
        a = acc_stride_words(w)
        assert a >= w and a % 16 == 4 and a - w < 16


def test_over_limit_is_refused_with_amount():
    tile = (32, 128, 512)
    big = plan_gemm(256, 4096, 4096, 4, 4, "sm_90", tile=tile)   # fits sm_90's 227 KiB
    over = big.smem_bytes - ARCH_LIMITS["sm_86"].smem_per_block_optin
    assert over > 0
    with pytest.raises(PlanError, match=f"sm_86 per-block opt-in limit 101376 B by {over} B"):
        plan_gemm(256, 4096, 4096, 4, 4, "sm_86", tile=tile)


def test_default_plans_shrink_to_fit_small_arch():
    p90 = plan_gemm(512, 4096, 4096, 8, 8, "sm_90")
    p86 = plan_gemm(512, 4096, 4096, 8, 8, "sm_86")
    assert p86.smem_bytes <= 101376 < p90.smem_bytes or p86.smem_bytes <= p90.smem_bytes


def test_invalid_inputs():
    with pytest.raises(PlanError, match="multiples of 128"):
        plan_gemm(8, 64, 256, 4, 8, "sm_90", group=64)
    plan_gemm(8, 64, 256, 4, 16, "sm_90", "a16", group=64)       # weight-only takes any 32-multiple
    with pytest.raises(PlanError, match="unknown arch 'sm_75'"):
        plan_gemm(8, 64, 256, 4, 8, "sm_75")
    with pytest.raises(PlanError, match="int32 recovery overflows"):
        plan_gemm(8, 64, 65536, 8, 8, "sm_90", group=65536)
    with pytest.raises(PlanError, match="M=9"):
        plan_gemv(64, 256, 4, 8, "sm_90", M=9)
    with pytest.raises(PlanError, match="tile"):
        plan_gemm(8, 64, 256, 4, 8, "sm_90", tile=(8, 64, 100))
    with pytest.raises(PlanError, match="p must be 1..8"):
        plan_gemm(8, 64, 256, 9, 8, "sm_90")


def test_mma_k_follows_group():
    assert plan_gemm(8, 64, 1024, 4, 4, "sm_90", group=256).mma_k == 256
    assert plan_gemm(8, 64, 1024, 4, 4, "sm_90", group=128).mma_k == 128
    assert plan_gemm(8, 64, 1024, 4, 4, "sm_90", group=1024, agroup=1024).mma_k == 256  # per channel


def test_gemv_split_k_fills_the_gpu():
    for arch, lim in ARCH_LIMITS.items():
        p = plan_gemv(576, 1536, 4, 8, arch)
        gx, gy, gz = p.grid()
        units = p.k_tiles // max(1, p.group // p.BK)
        assert gx * gy * gz >= lim.sm_count or gz == units
        assert p.workspace_bytes == (0 if gz == 1 else gz * p.M * p.N * 4)
    wide = plan_gemv(49152, 576, 8, 8, "sm_90", group=576)
    assert wide.split_k == 1 and wide.grid()[0] * wide.BN >= 49152
    per_channel = plan_gemv(576, 4096, 4, 8, "sm_90", group=4096)
    assert per_channel.split_k > 1


def test_grid_for_other_shapes():
    p = plan_gemm(100, 1000, 512, 4, 4, "sm_80")
    assert p.grid(1, 1) == (1, 1, 1)
    assert p.grid(100, 1000) == (-(-1000 // p.BN), -(-100 // p.BM), 1)


@pytest.mark.parametrize("arch, mode", list(itertools.product(ARCH_LIMITS, ["quant", "a16"])))
def test_describe_mentions_geometry(arch, mode):
    p = plan_gemm(16, 256, 512, 2, 4 if mode == "quant" else 16, arch, mode)
    d = p.describe()
    assert arch in d and f"smem {p.smem_bytes} B" in d and str(p.block) in d


@pytest.mark.parametrize("arch", list(ARCH_LIMITS))
def test_bgemm_b1_plan_matches_its_ptx_and_loads_without_bank_conflicts(arch):
    """plan_bgemm_b1 describes ptx/bgemm_b1.ptx: its header's launch and dynamic shared memory, stage
    layout [q activation planes][p weight planes], and the swizzle makes each m16n8k256 fragment load
    of a warp (8 rows x 4 words, at any 16-row offset) hit 32 distinct banks."""
    from runtime.staging import plan_bgemm_b1
    for pb, qb in itertools.product(range(1, 9), range(1, 9)):
        pl = plan_bgemm_b1(300, 72, 1000, pb, qb, arch, group=128)
        assert pl.smem_bytes == 2 * (2048 * qb + 1024 * pb)        # the PTX header's formula
        assert pl.block == (128, 1, 1) and pl.grid() == (3, 5, 1)   # ceil(72/32), ceil(300/64)
        a, w, a1 = pl.buffer("a_planes.s0"), pl.buffer("w_planes.s0"), pl.buffer("a_planes.s1")
        assert (a.offset, w.offset, a1.offset) == (0, 2048 * qb, 2048 * qb + 1024 * pb)
        bufs = sorted(pl.buffers, key=lambda b: b.offset)
        assert all(x.end <= y.offset for x, y in zip(bufs, bufs[1:]))
    pl = plan_bgemm_b1(64, 32, 256, 8, 8, arch)
    for b in pl.buffers:
        for base in (0, 16, 48):
            for h in (0, 4):
                bk = [(b.word_address(base + lane // 4, lane % 4 + h) // 4) % 32 for lane in range(32)]
                assert len(set(bk)) == 32, (b.name, base, h, sorted(bk))
    from runtime.staging import SmemBuffer
    plain = SmemBuffer("x", 0, 64, 32, 32, "b1")                      # without the swizzle: conflicts
    assert len({(plain.word_address(lane // 4, lane % 4) // 4) % 32 for lane in range(32)}) == 16


def test_bgemm_b1_plan_refuses_groups_the_kernel_cannot_take():
    from runtime.staging import plan_bgemm_b1
    with pytest.raises(PlanError, match="multiples of 128"):
        plan_bgemm_b1(64, 32, 1024, 4, 4, "sm_80", group=32)
