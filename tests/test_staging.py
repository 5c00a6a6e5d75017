"""Shared-memory staging plans: layout, limits, bank conflicts, launch geometry (no GPU)."""
import itertools

import pytest

from runtime.staging import ARCH_LIMITS, PlanError


def test_arch_limits_match_device_attributes():
    # cudaDevAttrMaxSharedMemoryPerBlockOptin / PerMultiprocessor as the devices report them
    optin = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
    per_sm = {"sm_80": 167936, "sm_86": 102400, "sm_89": 102400, "sm_90": 233472}
    for arch, lim in ARCH_LIMITS.items():
        assert lim.smem_per_block_optin == optin[arch] and lim.smem_per_sm == per_sm[arch]
        assert lim.smem_default == 49152 and lim.regs_per_sm == 65536 and lim.max_threads_per_block == 1024


# b1 m16n8k256/k128 A and B fragments and the f16 B fragment: lane = 4*row + word, +4 words for the
# second register; accumulator fragment c0/c1 (rows are tokens 2t / 2t+1, words are outputs g).


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
