"""Matrix preprocessing for the CPU table-lookup kernels: the canonical planes (p, N, Kp/32) uint32 ->
tiles (Nt, p, Kp/8, 64) uint8, and its exact inverse.

One byte of a canonical row holds 8 consecutive lanes (byte c = lanes 8c .. 8c+7, little-endian words),
its low nibble indexing the table of lanes 8c..8c+3 and its high nibble that of 8c+4..8c+7. The kernel
loads 64 bytes = the same byte c of 64 rows, and its byte shuffles + unpack/madd produce int16 sums in a
lane order where byte position pos = 16*L + 8*h + j (L = 128-bit lane, h = 0 low / 1 high unpack half)
ends up as row 32*h + 8*L + j. Storing row ROW_OF_POS[pos] at position pos makes the results come out in
natural row order on AVX-512 (and in 16-row runs on AVX2). Rows are padded to a multiple of 64 with
zero bytes; scales and offsets are tiled the same way (Nt, Kp/G, 64) so one vector load covers a tile.
"""
from __future__ import annotations

import struct

import numpy as np

TILE = 64
_pos = np.arange(TILE)
ROW_OF_POS = ((_pos >> 3) & 1) * 32 + (_pos >> 4) * 8 + (_pos & 7)


def preprocess(planes: np.ndarray) -> np.ndarray:
    """uint32 (p, N, W) canonical planes -> uint8 (ceil(N/64), p, 4*W, 64) kernel tiles."""
    if planes.dtype != np.uint32 or planes.ndim != 3:
        raise ValueError(f"planes must be uint32 (p, N, W), got {planes.dtype} {planes.shape}")
    p, N, W = planes.shape
    Nt, C = -(-N // TILE), 4 * W
    b = np.ascontiguousarray(planes, dtype="<u4").view(np.uint8).reshape(p, N, C)
    pad = np.zeros((p, Nt * TILE, C), np.uint8)
    pad[:, :N] = b
    tiled = pad.reshape(p, Nt, TILE, C)[:, :, ROW_OF_POS, :]        # (p, Nt, pos, C)
    return np.ascontiguousarray(tiled.transpose(1, 0, 3, 2))         # (Nt, p, C, pos)


def unpreprocess(wl: np.ndarray, N: int) -> np.ndarray:
    """Inverse of preprocess: uint8 (Nt, p, C, 64) -> uint32 (p, N, C/4)."""
    Nt, p, C, t = wl.shape
    if wl.dtype != np.uint8 or t != TILE or C % 4 or not (Nt - 1) * TILE < N <= Nt * TILE:
        raise ValueError(f"not a preprocessed tile array for N={N}: {wl.dtype} {wl.shape}")
    pad = np.empty((p, Nt, TILE, C), np.uint8)
    pad[:, :, ROW_OF_POS, :] = wl.transpose(1, 0, 3, 2)
    rows = np.ascontiguousarray(pad.reshape(p, Nt * TILE, C)[:, :N])
    return rows.view("<u4").astype(np.uint32).reshape(p, N, C // 4)


def tile_rows(a: np.ndarray) -> np.ndarray:
    """(N, ng) per-row group values (float32, or the float16 a / z of f16_params) -> (ceil(N/64), ng, 64)
    of the same dtype, padding rows zero."""
    N, ng = a.shape
    Nt = -(-N // TILE)
    pad = np.zeros((Nt * TILE, ng), a.dtype)
    pad[:N] = a
    return np.ascontiguousarray(pad.reshape(Nt, TILE, ng).transpose(0, 2, 1))


def untile_rows(t: np.ndarray, N: int) -> np.ndarray:
    """Inverse of tile_rows."""
    Nt, ng, tl = t.shape
    return np.ascontiguousarray(t.transpose(0, 2, 1).reshape(Nt * tl, ng)[:N])



def container_bits(p: int) -> int:
    """Bits per code in the byte-code tiles: 2, 4 or 8 (the smallest that holds p bits, at least 2)."""
    if not 1 <= p <= 8:
        raise ValueError(f"byte codes hold 1..8 bits, got {p}")
    return 2 if p <= 2 else (4 if p <= 4 else 8)


def _spread_table(lanes: int, cw: int) -> np.ndarray:
    """For a run of `lanes` plane bits (8 or 16, one index value), where each bit lands in the byte-code
    word: lane k = 4*u + e goes to byte e, bit cw*u. uint32 (8-lane runs at cw 4, 16 at cw 2) or uint64
    (8 lanes at cw 8, one byte each)."""
    idx = np.arange(1 << lanes, dtype=np.uint64)
    out = np.zeros(1 << lanes, np.uint64)
    for k in range(lanes):
        pos = 8 * k if cw == 8 else 8 * (k % 4) + cw * (k // 4)
        out |= ((idx >> np.uint64(k)) & np.uint64(1)) << np.uint64(pos)
    return out if cw == 8 else out.astype(np.uint32)


_SPREAD: dict[int, np.ndarray] = {}


def codes_tiles(planes: np.ndarray, chunk_tiles: int | None = None) -> np.ndarray:
    """uint32 (p, N, W) canonical planes -> uint8 (ceil(N/64), Q, 64, 4) packed codes for kernels_int8.c,
    with cw = container_bits(p) bits per code, per = 8 // cw codes per byte, Q = 32*W / (4*per):
    bits [cw*u, cw*u + cw) of [t, j, r, e] hold the code of row 64t + r at lane 4*(per*j + u) + e
    (code = planes read MSB first). Padding rows are zero.

    One table lookup per plane byte (per 16 lanes at cw 2) spreads its bits to where they go in the
    byte codes, shifted by the plane's weight: at first use this replaced a per-bit unpacking that was
    the largest part of loading the default model (1.3 of 3 s). Built chunk_tiles tiles at a time (default:
    about 2 MB of codes), as kq_codes_tiles is: done whole, the lookups' sums and two copies of the codes
    were the peak of loading a model with a large plain output projection (Gemma 3's 262144 x 640 at 8
    bits: 1.06 GB for a 270M model)."""
    if planes.dtype != np.uint32 or planes.ndim != 3:
        raise ValueError(f"planes must be uint32 (p, N, W), got {planes.dtype} {planes.shape}")
    p, N, W = planes.shape
    cw = container_bits(p)
    per = 8 // cw
    Nt, Q = -(-N // TILE), 8 * W // per
    if cw not in _SPREAD:
        _SPREAD[cw] = _spread_table(16 if cw == 2 else 8, cw)
    table = _SPREAD[cw]
    unit = "<u2" if cw == 2 else "u1"                   # plane bits per lookup: 16 lanes or 8
    out = np.empty((Nt, Q, TILE, 4), np.uint8)
    chunk_tiles = chunk_tiles or max(1, (2 << 20) // (TILE * 32 * max(W, 1)))
    for t0 in range(0, Nt, chunk_tiles):
        t1 = min(Nt, t0 + chunk_tiles)
        r0, r1 = t0 * TILE, min(N, t1 * TILE)
        acc = np.zeros((r1 - r0, Q if cw != 8 else Q // 2), table.dtype)
        for r in range(p):
            runs = np.ascontiguousarray(planes[r, r0:r1], dtype="<u4").view(unit)
            acc |= table[runs] << table.dtype.type(p - 1 - r)
        blk = np.zeros(((t1 - t0) * TILE, Q, 4), np.uint8)
        blk[:r1 - r0] = acc.astype(acc.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(r1 - r0, Q, 4)
        out[t0:t1] = blk.reshape(t1 - t0, TILE, Q, 4).transpose(0, 2, 1, 3)
    return out


def uncodes_tiles(ct: np.ndarray, N: int, p: int) -> np.ndarray:
    """Inverse of codes_tiles: uint8 (Nt, Q, 64, 4) -> uint32 (p, N, W)."""
    cw = container_bits(p)
    per = 8 // cw
    Nt, Q, t, four = ct.shape
    if ct.dtype != np.uint8 or t != TILE or four != 4 or (Q * per) % 8 or not (Nt - 1) * TILE < N <= Nt * TILE:
        raise ValueError(f"not a byte-code tile array for N={N}, p={p}: {ct.dtype} {ct.shape}")
    rows = ct.transpose(0, 2, 1, 3).reshape(Nt * TILE, Q, 1, 4)[:N]
    shifts = (cw * np.arange(per, dtype=np.uint8)).reshape(1, 1, per, 1)
    codes = ((rows >> shifts) & np.uint8((1 << cw) - 1)).reshape(N, Q * per * 4)
    out = np.empty((p, N, Q * per // 8), np.uint32)
    for r in range(p):
        bits = (codes >> np.uint8(p - 1 - r)) & np.uint8(1)
        out[r] = np.packbits(bits, axis=1, bitorder="little").view("<u4").astype(np.uint32)
    return out


# ---- two-level weights (loader/kquant.py): codes in parts of 1, 2, 4 or 8 bits, parameters in a blob ----

KQ_FLAG = 1 << 30           # ab_internal.h AB_F16_KQ
KQ_MAGIC = 0x3151424B
KQ_HI = 32                  # ab_internal.h AB_KQ_HI: 6-bit sc and m as low nibbles + 2 high bits each
# bits of each code part, low part first: no code of 3, 5, 6 or 7 bits sits in a wider container (a
# nested 1-bit weight keeps a 2-bit one: single parts run on the plain tile loops, kernels_int8.c)
KQ_PARTS = {1: (2,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
_KQ_HEADER = struct.Struct("<4if3i4q10i")       # ab_kq in ab_internal.h (104 bytes)
_KQ_HEAD = 128


def _codes_of_planes(planes: np.ndarray) -> np.ndarray:
    p, N, W = planes.shape
    codes = np.zeros((-(-N // TILE) * TILE, 32 * W), np.uint8)
    for r in range(p):
        b = np.ascontiguousarray(planes[r], dtype="<u4").view(np.uint8)
        codes[:N] |= np.unpackbits(b, axis=1, bitorder="little") << np.uint8(p - 1 - r)
    return codes


def _container(codes: np.ndarray, cw: int) -> np.ndarray:
    """(Nt*64, Kp) values < 2^cw -> (Nt, Kp/(4*per), 64, 4) with per = 8/cw values per byte, as codes_tiles."""
    per = 8 // cw
    R, Kp = codes.shape
    q = codes.reshape(R // TILE, TILE, Kp // (4 * per), per, 4)
    packed = np.zeros((R // TILE, TILE, Kp // (4 * per), 4), np.uint8)
    for u in range(per):
        packed |= q[:, :, :, u, :] << np.uint8(cw * u)
    return packed.transpose(0, 2, 1, 3)


def _row_blocks(planes) -> list[np.ndarray]:
    """planes: one uint32 (p, N, W) array, or a list of them stacked along N (products that share an input)."""
    blocks = list(planes) if isinstance(planes, (list, tuple)) else [planes]
    if not blocks or any(b.ndim != 3 or b.dtype != np.uint32 or b.shape[0] != blocks[0].shape[0]
                         or b.shape[2] != blocks[0].shape[2] for b in blocks):
        raise ValueError("planes must be uint32 (p, N, W) arrays that agree in p and W")
    return blocks


def _take_rows(blocks: list[np.ndarray], lo: int, hi: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(rows [lo, hi) of the blocks stacked along N, the source views they came from: one contiguous
    view per plane, for a caller that reads a mapped file to let their pages go once they are read)."""
    out, views, start = [], [], 0
    for b in blocks:
        n = b.shape[1]
        a, z = max(lo, start), min(hi, start + n)
        if a < z:
            out.append(b[:, a - start:z - start])
            views += [b[r, a - start:z - start] for r in range(b.shape[0])]
        start += n
    return (out[0] if len(out) == 1 else np.concatenate(out, axis=1)), views


def kq_codes_tiles(planes, chunk_tiles: int | None = None, release=None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """uint32 (p, N, W) planes (or a list of such blocks stacked along N) -> (uint8 (Nt, Qtot, 64, 4) code
    parts, [(cw, shift, qoff)] per part): part r holds bits [shift, shift + cw) of each code in containers
    of cw bits (codes_tiles' layout), its chunks from qoff on within each tile. Built chunk_tiles tiles at a
    time (default: about 2 MB of codes, whatever the width: 64 tiles of an 11008-wide down projection
    were 45 MB per temporary, the peak of loading), so that temporaries stay a few MB instead of several
    times the codes, and fused weights are never copied whole; release (optional) is called with the
    source rows of each chunk once they are read (see _take_rows)."""
    blocks = _row_blocks(planes)
    p, _, W = blocks[0].shape
    N = sum(b.shape[1] for b in blocks)
    Kp, Nt = 32 * W, -(-N // TILE)
    parts, shift, qoff = [], 0, 0
    for cw in KQ_PARTS[p]:
        parts.append((cw, shift, qoff))
        shift += cw
        qoff += Kp // (4 * (8 // cw))
    out = np.empty((Nt, qoff, TILE, 4), np.uint8)
    chunk_tiles = chunk_tiles or max(1, (2 << 20) // (TILE * Kp))
    for t0 in range(0, Nt, chunk_tiles):
        t1 = min(Nt, t0 + chunk_tiles)
        rows, views = _take_rows(blocks, t0 * TILE, min(N, t1 * TILE))
        codes = _codes_of_planes(rows)
        if release is not None:
            release(views)
        for cw, sh, qo in parts:
            out[t0:t1, qo:qo + Kp // (4 * (8 // cw))] = _container((codes >> np.uint8(sh)) & np.uint8((1 << cw) - 1), cw)
    return out, parts


def kq_uncodes_tiles(ct: np.ndarray, N: int, p: int, Kp: int) -> np.ndarray:
    """Inverse of kq_codes_tiles: uint8 (Nt, Qtot, 64, 4) -> uint32 (p, N, Kp/32)."""
    Nt = ct.shape[0]
    codes = np.zeros((Nt * TILE, Kp), np.uint8)
    qoff = shift = 0
    for cw in KQ_PARTS[p]:
        per = 8 // cw
        q = Kp // (4 * per)
        part = ct[:, qoff:qoff + q].transpose(0, 2, 1, 3).reshape(Nt * TILE, q, 1, 4)
        sh = (cw * np.arange(per, dtype=np.uint8)).reshape(1, 1, per, 1)
        codes |= ((part >> sh) & np.uint8((1 << cw) - 1)).reshape(Nt * TILE, Kp) << np.uint8(shift)
        qoff += q
        shift += cw
    codes = codes[:N]
    out = np.empty((p, N, Kp // 32), np.uint32)
    for r in range(p):
        bits = (codes >> np.uint8(p - 1 - r)) & np.uint8(1)
        out[r] = np.packbits(bits, axis=1, bitorder="little").view("<u4").astype(np.uint32)
    return out


def kq_blob(sub, N: int, Kp: int, parts: list[tuple[int, int, int]], qtot: int) -> np.ndarray:
    """The ab_kq header and its tiled arrays (d, dmin float16 [Nt][Kp/S][64]; sc, m 8-bit [Nt][Kp/G][64])
    in one uint8 array: what the kernels read as wsc when f16 = KQ_FLAG."""
    # 6-bit sc and m (Q4_K, Q5_K) in 12 bits, as the source holds them (ab_internal.h AB_KQ_HI)
    # (loader/kquant.py gives them as int8 sc, uint8 m; the form needs 0 <= sc, m < 64)
    hi = (sub.sc is not None and sub.m is not None and not sub.nib and sub.sc.dtype == np.int8
          and int(sub.sc.min(initial=0)) >= 0 and int(sub.sc.max(initial=0)) < 64 and int(sub.m.max(initial=0)) < 64)
    flags = ((1 if sub.sc is not None else 0) | (2 if sub.dmin is not None else 0)
             | (4 if sub.m is not None and not hi else 0) | (8 if sub.nib or hi else 0)
             | (16 if sub.sc is not None and sub.sc.dtype == np.int8 and not hi else 0) | (KQ_HI if hi else 0))
    tiles = {"d": tile_rows(sub.d)}
    for f in ("dmin", "sc", "m"):
        if getattr(sub, f) is not None:
            tiles[f] = tile_rows(getattr(sub, f))
    if hi:
        sc, m = sub.sc.view(np.uint8), sub.m
        tiles["sc"] = tile_rows((sc & 15) | (m & 15) << 4)
        h = tile_rows((sc >> 4) | (m >> 4) << 2)                            # (Nt, ng, 64), values < 16
        tiles["m"] = np.ascontiguousarray(h[..., :TILE // 2] | h[..., TILE // 2:] << 4)
    offs, pos = {}, _KQ_HEAD
    for f, a in tiles.items():
        offs[f] = pos
        pos += -(-a.nbytes // 64) * 64
    blob = np.zeros(pos, np.uint8)
    for f, a in tiles.items():
        blob[offs[f]:offs[f] + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    cw = [c for c, _s, _q in parts] + [0] * (3 - len(parts))
    sh = [s for _c, s, _q in parts] + [0] * (3 - len(parts))
    qo = [q for _c, _s, q in parts] + [0] * (3 - len(parts))
    head = _KQ_HEADER.pack(KQ_MAGIC, sub.G, sub.S, flags, float(sub.c0), Kp // sub.G, Kp // sub.S, len(parts),
                           offs["d"], offs.get("dmin", 0), offs.get("sc", 0), offs.get("m", 0), qtot, *cw, *sh, *qo)
    blob[:len(head)] = np.frombuffer(head, np.uint8)
    return blob


def kq_unblob(blob: np.ndarray, N: int):
    """Inverse of kq_blob's parameters: the SubScales (loader/kquant.py) its tiled arrays hold."""
    from loader.kquant import SubScales
    (magic, G, S, flags, c0, ng, nsb, _np, off_d, off_dmin, off_sc, off_m, *_rest) = \
        _KQ_HEADER.unpack(blob[:_KQ_HEADER.size].tobytes())
    if magic != KQ_MAGIC:
        raise ValueError("not a two-level parameter blob")
    Nt = -(-N // TILE)

    def field(off, dtype, n):
        size = Nt * n * TILE * np.dtype(dtype).itemsize
        return untile_rows(blob[off:off + size].view(dtype).reshape(Nt, n, TILE), N)
    sc_type = np.int8 if flags & 16 else np.uint8
    d, dmin = field(off_d, np.float16, nsb), field(off_dmin, np.float16, nsb) if flags & 2 else None
    if flags & KQ_HI:
        nib = field(off_sc, np.uint8, ng)
        hp = blob[off_m:off_m + Nt * ng * TILE // 2].reshape(Nt, ng, TILE // 2)
        h = untile_rows(np.concatenate([hp & 15, hp >> 4], axis=-1), N)
        return SubScales(d, ((nib & 15) | (h & 3) << 4).view(np.int8), dmin, (nib >> 4) | (h >> 2) << 4,
                         float(c0), G, S, False)
    return SubScales(d, field(off_sc, sc_type, ng) if flags & 1 else None, dmin,
                     field(off_m, np.uint8, ng) if flags & 4 else None, float(c0), G, S, bool(flags & 8))


class BlobSub:
    """The two-level parameters of a prepared weight, read back from its blob (kq_unblob) when a rare path
    asks for them (the float32 A16 check, the popcount kernel): the handle keeps no second copy of them
    (for weights stacked along N that copy was a concatenation, 67 MB of an 8-layer 7B-shaped Q5_0 model).
    G, S, c0 and nib are plain attributes; anything else is the SubScales' own."""

    def __init__(self, blob: np.ndarray, N: int, G: int, S: int, c0: float, nib: bool):
        self._blob, self._N = blob, N
        self.G, self.S, self.c0, self.nib = G, S, c0, nib

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(kq_unblob(self._blob, self._N), name)


def code_sums(planes: np.ndarray, lanes: int) -> np.ndarray:
    """int32 (N, Kp / lanes): the sum of the codes of each run of `lanes` lanes of each row."""
    p, N, W = planes.shape
    codes = _codes_of_planes(planes)[:N].astype(np.int32)
    return codes.reshape(N, -1, lanes).sum(-1).astype(np.int32)
