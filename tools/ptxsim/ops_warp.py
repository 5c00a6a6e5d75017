"""Warp-synchronous instructions: shfl.sync, vote.sync, mma.sync (b1 m16n8k256 / m16n8k128, AND or XOR+popc).

Convergence rule (strict): every lane named in membermask must be executing this very instruction
together with the caller (same PC, not exited, guard predicate true), and the caller must be in its
own membermask; a shfl whose computed source lane is not executing is an error too.  mma.sync
.aligned needs all 32 lanes.  Violations are SanitizerErrors.

mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc fragment layout (PTX ISA, "Matrix
fragments for mma.m16n8k256"), with g = laneid >> 2 (groupID), t = laneid & 3 (thread in group):
  A (16 x 256 bits, row-major), four .b32 registers, 32 consecutive k per register:
      a0: row g,   k = 32t + [0, 32)          a1: row g+8, k = 32t + [0, 32)
      a2: row g,   k = 128 + 32t + [0, 32)    a3: row g+8, k = 128 + 32t + [0, 32)
  B (256 x 8 bits, column-major), two .b32 registers:
      b0: column g, k = 32t + [0, 32)         b1: column g, k = 128 + 32t + [0, 32)
  C, D (16 x 8 s32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
  D[m, n] = C[m, n] + popc(A[m, :] & B[:, n])      (.and.popc; .xor.popc: A[m, :] ^ B[:, n]).
m16n8k128 is the first half of that: a0, a1 (k = 32t + [0, 32)), b0, the same C and D.
We take bit j of a register as k offset j (LSB first); since A and B use the same convention and the
result only sums over k, the bit order inside a register cannot change any result.
"""
from __future__ import annotations

import numpy as np

from .decode import op
from .parser import TYPES

B32, U32, S32, PRED = TYPES["b32"], TYPES["u32"], TYPES["s32"], TYPES["pred"]


def _active_masks(st, idx):
    """Per-warp bitmask of the lanes executing this instruction."""
    lane, warp = st.lane[idx], st.warp[idx]
    act = np.bincount(warp, weights=(np.uint64(1) << lane.astype(np.uint64)).astype(np.float64),
                      minlength=st.nwarps).astype(np.uint64).astype(np.uint32)
    return lane, warp, act


def _check(st, idx, mask, what):
    lane, warp, act = _active_masks(st, idx)
    own = (mask >> lane.astype(np.uint32)) & 1
    if not own.all():
        k = int(np.argmin(own))
        raise st.sanitizer_error(f"{what}: executing lane {int(lane[k])} is not in membermask "
                                 f"{int(mask[k]):#010x}", int(idx[k]))
    missing = mask & ~act[warp]
    if missing.any():
        k = int(np.argmax(missing != 0))
        raise st.sanitizer_error(
            f"{what}: lanes {int(missing[k]):#010x} of membermask {int(mask[k]):#010x} are not converged "
            f"here (diverged, exited, predicated off or absent)", int(idx[k]))
    return lane, warp, act


@op("shfl")
def dec_shfl(d, s):
    fl, (T,) = d.mods(s, {"sync", "up", "down", "bfly", "idx"}, 1, {"b32"})
    if "sync" not in fl:
        raise d.err(s, "only shfl.sync is supported")
    mode = d.one_of(s, fl, ["up", "down", "bfly", "idx"], required=True)
    dst, a, b, c, mm = d.nops(s, 5)
    if dst[0] == "pair":
        wd, wp = d.writer(s, dst[1], T), d.writer(s, dst[2], PRED)
    else:
        wd, wp = d.writer(s, dst, T), None
    ra, rb, rc, rm = d.reader(s, a, T), d.reader(s, b, U32), d.reader(s, c, U32), d.reader(s, mm, U32)

    def run(st, idx):
        mask = rm(st, idx)
        lane, warp, act = _check(st, idx, mask, "shfl.sync")
        ln = lane.astype(np.int64)
        bv = (rb(st, idx) & 0x1F).astype(np.int64)
        cv = rc(st, idx).astype(np.int64)
        seg = (cv >> 8) & 0x1F
        cl = cv & 0x1F
        max_lane = (ln & seg) | (cl & ~seg)
        min_lane = ln & seg
        if mode == "up":
            j = ln - bv
            pv = j >= max_lane
        elif mode == "down":
            j = ln + bv
            pv = j <= max_lane
        elif mode == "bfly":
            j = ln ^ bv
            pv = j <= max_lane
        else:
            j = min_lane | (bv & ~seg)
            pv = j <= max_lane
        j = np.where(pv, j, ln)
        src_ok = ((act[warp] >> j.astype(np.uint32)) & 1).astype(bool) & \
                 ((mask >> j.astype(np.uint32)) & 1).astype(bool)
        if not src_ok.all():
            k = int(np.argmin(src_ok))
            raise st.sanitizer_error(f"shfl.sync reads lane {int(j[k])}, which is not executing it",
                                     int(idx[k]))
        src = warp.astype(np.int64) * 32 + j
        wd(st, idx, ra(st, src))
        if wp is not None:
            wp(st, idx, pv)
    return run


@op("vote")
def dec_vote(d, s):
    fl, types = d.mods(s, {"sync", "ballot", "any", "all", "uni"}, 1, {"b32", "pred"})
    if "sync" not in fl:
        raise d.err(s, "only vote.sync is supported")
    mode = d.one_of(s, fl, ["ballot", "any", "all", "uni"], required=True)
    if (mode == "ballot") != (types[0].name == "b32"):
        raise d.err(s, "vote.sync.ballot.b32 or vote.sync.{any,all,uni}.pred")
    dst, a, mm = d.nops(s, 3)
    ra, rm = d.reader(s, a, PRED), d.reader(s, mm, U32)
    w = d.writer(s, dst, types[0])

    def run(st, idx):
        mask = rm(st, idx)
        lane, warp, _ = _check(st, idx, mask, "vote.sync")
        p = ra(st, idx)
        bits = np.where(p, np.uint64(1) << lane.astype(np.uint64), np.uint64(0)).astype(np.float64)
        ballot = np.bincount(warp, weights=bits, minlength=st.nwarps).astype(np.uint64).astype(np.uint32)
        bal = ballot[warp] & mask
        if mode == "ballot":
            w(st, idx, bal)
        elif mode == "any":
            w(st, idx, bal != 0)
        elif mode == "all":
            w(st, idx, bal == mask)
        else:
            w(st, idx, (bal == 0) | (bal == mask))
    return run


_MMA_SHAPES = {"m16n8k256": 2, "m16n8k128": 1}       # shape -> 128-bit k halves per fragment
_MMA_OPS = {"and": np.bitwise_and, "xor": np.bitwise_xor}


@op("mma")
def dec_mma(d, s):
    m = s.mods
    ok = (len(m) == 11 and m[:2] == ["sync", "aligned"] and m[2] in _MMA_SHAPES and m[3:9] ==
          ["row", "col", "s32", "b1", "b1", "s32"] and m[9] in _MMA_OPS and m[10] == "popc")
    if not ok:
        raise d.err(s, "only mma.sync.aligned.{m16n8k256,m16n8k128}.row.col.s32.b1.b1.s32.{and,xor}.popc "
                    "is supported")
    halves, bop = _MMA_SHAPES[m[2]], _MMA_OPS[m[9]]
    dd, aa, bb, cc = d.nops(s, 4)
    wd = [d.writer(s, o, S32) for o in d.vec(s, dd, 4)]
    ra = [d.reader(s, o, B32) for o in d.vec(s, aa, 2 * halves)]
    rb = [d.reader(s, o, B32) for o in d.vec(s, bb, halves)]
    rc = [d.reader(s, o, S32) for o in d.vec(s, cc, 4)]
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3

    def run(st, idx):
        _, warp, act = _active_masks(st, idx)
        full = act[warp] == 0xFFFFFFFF
        if not full.all():
            k = int(np.argmin(full))
            raise st.sanitizer_error(f"mma.sync.aligned needs all 32 lanes converged; lanes "
                                     f"{int(act[warp[k]]):#010x} execute it", int(idx[k]))
        # idx is sorted, so each active warp occupies 32 consecutive entries in lane order
        nw = idx.size // 32
        A = [r(st, idx).reshape(nw, 32) for r in ra]
        Bv = [r(st, idx).reshape(nw, 32) for r in rb]
        C = [r(st, idx).reshape(nw, 32) for r in rc]
        Aw = np.zeros((nw, 16, 4 * halves), np.uint32)      # A[m, kword]
        Bw = np.zeros((nw, 8, 4 * halves), np.uint32)       # B[n, kword]
        for h in range(halves):
            Aw[:, g, t + 4 * h], Aw[:, g + 8, t + 4 * h] = A[2 * h], A[2 * h + 1]
            Bw[:, g, t + 4 * h] = Bv[h]
        Cm = np.zeros((nw, 16, 8), np.int64)
        Cm[:, g, 2 * t], Cm[:, g, 2 * t + 1], Cm[:, g + 8, 2 * t], Cm[:, g + 8, 2 * t + 1] = C
        P = np.bitwise_count(bop(Aw[:, :, None, :], Bw[:, None, :, :])).sum(axis=3, dtype=np.int64)
        D = (Cm + P).astype(np.int32)              # s32 accumulation wraps like the hardware
        outs = (D[:, g, 2 * t], D[:, g, 2 * t + 1], D[:, g + 8, 2 * t], D[:, g + 8, 2 * t + 1])
        for w, v in zip(wd, outs):
            w(st, idx, v.reshape(-1))
    return run
