"""Shared-memory staging plans for the bit-plane recovery GEMM / GEMV (SPEC section 4).

A plan fixes, for one (M, N, K, p, q, arch, mode), everything a kernel needs to agree on with its
launcher: block tile (BM tokens x BN outputs x BK input lanes), pipeline stages, warp layout, split-K,
and the byte layout of dynamic shared memory. ptx/bgemm_b1.ptx, whose tile is fixed in its PTX, is
described by plan_bgemm_b1 (GpuBackend launches it from that plan). (Planners for a wider family of
tiles, stages and recovery buffers were removed with no kernel to use them; see git history.)

Conventions (both modes): the weight plane tile is the MMA A operand (16 output rows per instruction),
the activation tile the B operand (8 tokens per instruction):
- quant: `mma.sync.m16n8k{256|128}.row.col.s32.b1.b1.s32.and.popc` on p weight x q activation planes;
  k256 when the recovery block L = min(G, Ga) is a multiple of 256, else k128;
- a16: weight bits expanded to +-1 halves against an fp16 activation tile (m16n8k16).

Shared memory, per stage s (stages = 2: cp.async double buffer):
    w_planes.s   p*BN rows of BK bits        (row = one output's lanes of one plane)
    a_planes.s   q*BM rows of BK bits        (quant)   |  a_half.s  BM rows of BK halves (a16)
    w_scales.s   [group][BN] f32             w_offsets.s  [group][BN] f32 (asymmetric weights)
    a_scales.s   [group][BM] f32 (quant)     a_sums.s     [group][BM] (int32 U for quant, f32 sum x for a16)
then, once:
    psum         plane_split*BM rows of BN int32 (quant) / f32 (a16): warps that own different
                 plane pairs stage their shift-added partials (2^(p-1-r) * 2^(q-1-t) * D) here
    out          BM rows of BN f32: the recovered, scaled tile, stored to global row by row.

Bank-conflict padding (32 banks x 4 bytes). The b1/f16 fragment loads of one warp touch 8 rows x 4
consecutive words (lane = 4*row + word); rows whose stride is 4 (mod 8) words map those 32 words
onto 32 distinct banks. Accumulator fragments are stored at (token 2t(+1), output g) for g < 8,
t < 4; a row stride of 4 (mod 16) words keeps those 32 stores on distinct banks. Scale rows are read
by 32 consecutive lanes and need no padding. Every buffer starts on a 16-byte boundary (cp.async.16).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loader.bipolar import round_up
from runtime.driver import cdiv

KIB = 1024


class PlanError(ValueError):
    """The requested configuration cannot be planned (a limit is exceeded or an input is invalid)."""


@dataclass(frozen=True)
class ArchLimits:
    arch: str
    smem_per_sm: int
    smem_per_block_optin: int
    max_threads_per_sm: int
    sm_count: int                       # a typical part (A100 108, RTX 3090 82, 4090 128, H100 132)
    smem_default: int = 48 * KIB        # per block without cuFuncSetAttribute
    reserved_smem_per_block: int = 1 * KIB
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_block: int = 1024


ARCH_LIMITS = {
    "sm_80": ArchLimits("sm_80", 164 * KIB, 163 * KIB, 2048, 108),
    "sm_86": ArchLimits("sm_86", 100 * KIB, 99 * KIB, 1536, 82),
    "sm_89": ArchLimits("sm_89", 100 * KIB, 99 * KIB, 1536, 128),
    "sm_90": ArchLimits("sm_90", 228 * KIB, 227 * KIB, 2048, 132),
}


def arch_limits(arch: str) -> ArchLimits:
    try:
        return ARCH_LIMITS[arch]
    except KeyError:
        raise PlanError(f"unknown arch {arch!r}; known: {', '.join(ARCH_LIMITS)}") from None




@dataclass(frozen=True)
class SmemBuffer:
    name: str
    offset: int        # bytes from the start of dynamic shared memory
    rows: int
    row_bytes: int     # payload per row
    stride: int        # bytes between rows (payload + padding)
    elem: str          # "b1" | "f16" | "f32" | "s32"
    swizzle: bool = False   # instead of padding: a row's two 16-byte halves swap when (row >> 2) & 1

    @property
    def size(self) -> int:
        return self.rows * self.stride

    def word_address(self, row: int, word: int) -> int:
        """Byte address of 4-byte word `word` of row `row` (after the swizzle, if any)."""
        if self.swizzle:
            word ^= 4 * ((row >> 2) & 1)
        return self.offset + row * self.stride + 4 * word

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class StagingPlan:
    kind: str                 # "gemm" | "gemv"
    mode: str                 # "quant" | "a16"
    arch: str
    M: int
    N: int
    K: int
    Kp: int                   # K padded to the group size
    p: int
    q: int                    # activation bits (16 in a16 mode)
    group: int
    agroup: int
    BM: int
    BN: int
    BK: int
    mma_k: int                # lanes per MMA instruction (256/128 quant, 16 a16)
    stages: int
    warps_m: int
    warps_n: int
    plane_split: int          # warp groups sharing one output tile, each owning some plane pairs
    split_k: int
    buffers: tuple[SmemBuffer, ...]
    limits: ArchLimits = field(repr=False)

    # -- launch geometry --------------------------------------------------------------------------
    @property
    def warps(self) -> int:
        return self.warps_m * self.warps_n * self.plane_split

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.threads, 1, 1)

    def grid(self, M: int | None = None, N: int | None = None) -> tuple[int, int, int]:
        M = self.M if M is None else M
        N = self.N if N is None else N
        return (cdiv(N, self.BN), cdiv(M, self.BM), self.split_k)

    @property
    def smem_bytes(self) -> int:
        return round_up(max(b.end for b in self.buffers), 16)

    @property
    def layout(self) -> dict[str, int]:
        return {b.name: b.offset for b in self.buffers}

    def buffer(self, name: str) -> SmemBuffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(f"plan has no buffer {name!r} (has {', '.join(self.layout)})")

    @property
    def needs_opt_in(self) -> bool:
        return self.smem_bytes > self.limits.smem_default

    @property
    def k_tiles(self) -> int:
        return cdiv(self.Kp, self.BK)

    @property
    def workspace_bytes(self) -> int:
        """Global f32 scratch for split-K partial outputs (0 when split_k == 1)."""
        return 0 if self.split_k == 1 else self.split_k * self.M * self.N * 4

    @property
    def blocks_per_sm(self) -> int:
        lim = self.limits
        by_smem = lim.smem_per_sm // (self.smem_bytes + lim.reserved_smem_per_block)
        return max(0, min(by_smem, lim.max_threads_per_sm // self.threads, 32))

    def describe(self) -> str:
        return (f"{self.kind}/{self.mode} {self.arch} M={self.M} N={self.N} K={self.K} W{self.p}A{self.q} "
                f"tile {self.BM}x{self.BN}x{self.BK} mma k{self.mma_k} stages {self.stages} "
                f"warps {self.warps_m}x{self.warps_n}x{self.plane_split} split_k {self.split_k} "
                f"smem {self.smem_bytes} B{' (opt-in)' if self.needs_opt_in else ''} "
                f"grid {self.grid()} block {self.block}")


def _validate(M, N, K, p, q, mode, group, agroup):
    for nm, v in (("M", M), ("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{nm} must be a positive int, got {v!r}")
    if mode not in ("quant", "a16"):
        raise PlanError(f"mode must be 'quant' or 'a16', got {mode!r}")
    if not 1 <= p <= 8:
        raise PlanError(f"weight bits p must be 1..8, got {p}")
    if mode == "quant" and not 1 <= q <= 8:
        raise PlanError(f"activation bits q must be 1..8 in quant mode, got {q}")
    per_channel = group >= K
    Kp = round_up(K, 32) if per_channel else round_up(K, group)
    G = Kp if per_channel else group
    if G % 32:
        raise PlanError(f"group must be a multiple of 32 lanes, got {group}")
    Ga = G if agroup is None else (Kp if agroup >= K else agroup)
    if mode == "quant":
        if G % 128 and not per_channel:
            raise PlanError(f"quantized-activation GEMM needs weight groups that are multiples of 128 "
                            f"(b1 MMA covers 128/256 lanes); got G={G}")
        if Ga % 128 and Ga != Kp:
            raise PlanError(f"activation groups must be multiples of 128 or per token, got Ga={Ga}")
        if max(G, Ga) % min(G, Ga):
            raise PlanError(f"the smaller of G={G} and Ga={Ga} must divide the larger")
    return Kp, G, Ga


def plan_bgemm_b1(M: int, N: int, K: int, p: int, q: int, arch: str, *, group: int = 128,
                  agroup: int | None = None) -> StagingPlan:
    """The plan of ptx/bgemm_b1.ptx, whose tile is fixed in its PTX: 64 tokens x 32 outputs x 256 lanes,
    4 warps of 16 tokens each, two cp.async stages of [q activation planes: 64 rows x 32 B][p weight planes:
    32 rows x 32 B], rows swizzled (16-byte halves swapped when (row >> 2) & 1) instead of padded, and no
    shared-memory recovery buffers (each warp recovers its accumulators in registers). GpuBackend takes its
    launch geometry from here; refused with the reason where the arch or the groups do not allow it."""
    Kp, G, Ga = _validate(M, N, K, p, q, "quant", group, agroup)
    lim = arch_limits(arch)
    BM, BN, BK, stages = 64, 32, 256, 2
    a_bytes, w_bytes = q * BM * (BK // 8), p * BN * (BK // 8)
    bufs = []
    for st in range(stages):
        base = st * (a_bytes + w_bytes)
        bufs.append(SmemBuffer(f"a_planes.s{st}", base, q * BM, BK // 8, BK // 8, "b1", swizzle=True))
        bufs.append(SmemBuffer(f"w_planes.s{st}", base + a_bytes, p * BN, BK // 8, BK // 8, "b1", swizzle=True))
    plan = StagingPlan("gemm", "quant", arch, M, N, K, Kp, p, q, G, Ga, BM, BN, BK, 256, stages, 4, 1, 1, 1,
                       tuple(bufs), lim)
    if plan.smem_bytes > lim.smem_per_block_optin:
        raise PlanError(f"bgemm_b1 W{p}A{q} needs {plan.smem_bytes} bytes of shared memory, {arch} allows "
                        f"{lim.smem_per_block_optin}")
    return plan


