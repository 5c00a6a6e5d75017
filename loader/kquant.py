"""GGUF blocks whose (sub-)blocks are affine maps of unsigned codes, read into the two-level form of the
bipolar format (docs/DESIGN.md "Two-level group parameters").

Every type below stores, per sub-block of G lanes, w = a*q - a*zq - b with an unsigned p-bit code q,
a = d*sc and b = dmin*m (d, dmin float16 per super-block of S lanes; sc, m small integers per sub-block).
With the bipolar value v = 2q - (2^p - 1) that is s*v + o with

    s = a/2,   o = c0*a - b,   c0 = (2^p - 1)/2 - zq

so the codes are the source's own and only (d, sc, dmin, m, c0) are kept: the source's bytes, not
float32 per group (Q4_K would read 6.0 instead of 4.5 bits per weight; only ~8% of real Q4_K
sub-scales d*sc are float16 numbers).

    type    p  G   S    a            b            zq    c0
    Q5_0    5  32  32   d            -            16    -0.5
    Q5_1    5  32  32   d            -m (dmin=-m) 0     15.5
    Q4_K    4  32  256  d*sc (6 bit) dmin*m       0     7.5
    Q5_K    5  32  256  d*sc         dmin*m       0     15.5
    Q6_K    6  16  256  d*sc (int8)  -            32    -0.5
    Q3_K    3  16  256  d*(sc-32)    -            4     -0.5
    Q2_K    2  16  256  d*sc (4 bit) dmin*m       0     1.5
    IQ4_XS  8  32  256  d*(ls-32)    -            128   -0.5   code = kvalue + 128 (kvalues are int8)
    IQ4_NL  8  32  32   d            -            128   -0.5

The layouts were read from the ggml block definitions and are checked bitwise against
gguf.quants.dequantize (tests/test_kquant.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loader.errors import FormatError

# IQ4_NL / IQ4_XS codebook (integers, so a code of 8 bits holds each value exactly)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)

# byte offsets of each block's float16 fields (d, and dmin or m): where a writer of random blocks puts them
F16_FIELDS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,),
              "Q2_K": (80, 82), "IQ4_XS": (0,), "IQ4_NL": (0,)}
# typical |sub-scale| of random blocks (uniform bytes): to size d so that weights have a chosen spread
TYPICAL_SC = {"Q4_K": 32, "Q5_K": 32, "Q6_K": 64, "Q3_K": 16, "Q2_K": 8, "IQ4_XS": 16}

# type -> (source bits p, sub-block G, super-block S, bytes per super-block, c0)
KQ_TYPES = {
    "Q5_0": (5, 32, 32, 22, -0.5), "Q5_1": (5, 32, 32, 24, 15.5),
    "Q4_K": (4, 32, 256, 144, 7.5), "Q5_K": (5, 32, 256, 176, 15.5), "Q6_K": (6, 16, 256, 210, -0.5),
    "Q3_K": (3, 16, 256, 110, -0.5), "Q2_K": (2, 16, 256, 84, 1.5),
    "IQ4_XS": (8, 32, 256, 136, -0.5), "IQ4_NL": (8, 32, 32, 18, -0.5),
}


def sub_layout(ggml_type: str) -> list[tuple[str, str, int]]:
    """(SubScales field, safetensors dtype, lanes per entry) of what `decode` gives for a type, in the
    packed file's order: what a streaming writer plans before it reads the tensor (loader/pack.py)."""
    p, G, S, _n, _c0 = KQ_TYPES[ggml_type]
    out = [("d", "F16", S)]
    if S != G:
        out.append(("sc", "U8" if ggml_type == "Q2_K" else "I8", G))
    if ggml_type in ("Q5_1", "Q4_K", "Q5_K", "Q2_K"):
        out.append(("dmin", "F16", S))
    if ggml_type in ("Q4_K", "Q5_K"):
        out.append(("m", "U8", G))
    return out


@dataclass
class SubScales:
    """Two-level group parameters of one linear (N rows, Kp lanes): s = d*sc/2 and o = c0*d*sc - dmin*m
    per sub-block of G lanes, d and dmin float16 per super-block of S lanes (S a multiple of G).
    sc None means 1 (one level: S = G); m None means 1 (b = dmin); dmin None means b = 0. nib: sc holds
    sc | m << 4 (Q2_K's 4-bit pairs in one byte, so the parameters stay at the source's 2.625 bpw)."""
    d: np.ndarray                    # float16 (N, Kp // S)
    sc: np.ndarray | None            # int8 (N, Kp // G), or uint8 sc | m << 4 when nib
    dmin: np.ndarray | None          # float16 (N, Kp // S)
    m: np.ndarray | None             # uint8 (N, Kp // G)
    c0: float
    G: int
    S: int
    nib: bool = False

    def __post_init__(self):
        N, nsb = self.d.shape
        if self.d.dtype != np.float16 or (self.dmin is not None and (self.dmin.dtype != np.float16
                                                                     or self.dmin.shape != self.d.shape)):
            raise FormatError(f"sub-scale d / dmin must be float16 {self.d.shape}")
        if self.G not in (16, 32) or self.S % self.G or self.S % 32:
            raise FormatError(f"sub-block {self.G} / super-block {self.S} not supported (16 or 32 in a multiple of 32)")
        ng = nsb * self.S // self.G
        for name, a in (("sc", self.sc), ("m", self.m)):
            if a is not None and (a.shape != (N, ng) or a.dtype not in (np.int8, np.uint8)):
                raise FormatError(f"sub-scale {name} must be 8-bit ({N}, {ng}), got {a.dtype} {a.shape}")
        if self.nib and (self.sc is None or self.m is not None or self.sc.dtype != np.uint8):
            raise FormatError("nibble sub-scales hold sc | m << 4 in a uint8 sc and no m")

    def ints(self) -> tuple[np.ndarray, np.ndarray]:
        """(sc, m) as int32 (N, Kp // G) per sub-block (1 where absent)."""
        N, ng = self.d.shape[0], self.d.shape[1] * self.S // self.G
        if self.nib:
            return (self.sc & 15).astype(np.int32), (self.sc >> 4).astype(np.int32)
        sc = np.ones((N, ng), np.int32) if self.sc is None else self.sc.astype(np.int32)
        m = np.ones((N, ng), np.int32) if self.m is None else self.m.astype(np.int32)
        return sc, m

    def affine64(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact float64 (a, b) per sub-block: w = a*q - a*zq - b, i.e. s = a/2, o = c0*a - b."""
        r = self.S // self.G
        sc, m = self.ints()
        a = np.repeat(self.d.astype(np.float64), r, axis=1) * sc
        b = (np.zeros_like(a) if self.dmin is None
             else np.repeat(self.dmin.astype(np.float64), r, axis=1) * m)
        return a, b

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 (s, o) per sub-block as the kernels rebuild them (s exact; o one rounding)."""
        a, b = self.affine64()
        return (a / 2).astype(np.float32), (self.c0 * a - b).astype(np.float32)

    def scaled(self, j: int) -> "SubScales":
        """The parameters of the nested weight with j planes dropped: s * 2^j (d * 2^j, exact in float16
        unless it overflows), o unchanged (c0 / 2^j)."""
        d = (self.d.astype(np.float32) * np.float32(1 << j)).astype(np.float16)
        if not np.isfinite(d).all():
            raise FormatError(f"nested weight: sub-scale d * 2^{j} overflows float16")
        return SubScales(d, self.sc, self.dmin, self.m, self.c0 / (1 << j), self.G, self.S, self.nib)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.d, self.sc, self.dmin, self.m) if a is not None)

    def take(self, ids, take=None) -> "SubScales":
        """The parameters of rows `ids` (an index array or slice); take(a, ids): how to gather them (e.g.
        loader.packed.FileMap.take, which reads a mapped file's rows without mapping them)."""
        f = lambda a: None if a is None else (a[ids] if take is None else take(a, ids))
        return SubScales(f(self.d), f(self.sc), f(self.dmin), f(self.m), self.c0, self.G, self.S, self.nib)


def subscales_agree(subs: list[SubScales]) -> bool:
    """Whether two-level parameters can be stacked along N: same G, S, c0, fields present and dtypes."""
    a = subs[0]
    key = lambda s: (s.G, s.S, s.c0, s.nib, s.sc is None, s.dmin is None, s.m is None)
    return not any(key(s) != key(a) or (s.sc is not None and s.sc.dtype != a.sc.dtype) for s in subs)


def concat_subscales(subs: list[SubScales]) -> SubScales | None:
    """Stack along N when the forms agree (subscales_agree), else None."""
    if not subscales_agree(subs):
        return None
    a = subs[0]
    cat = lambda f: None if getattr(a, f) is None else np.concatenate([getattr(s, f) for s in subs], axis=0)
    return SubScales(cat("d"), cat("sc"), cat("dmin"), cat("m"), a.c0, a.G, a.S, a.nib)


# ---- block decoders: raw bytes (N, K/S * bytes) -> codes (N, K) uint8 and the parameters ---------

def _f16(b: np.ndarray, lo: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., lo:lo + 2]).view("<f2")[..., 0].astype(np.float16)


def _bits(b: np.ndarray, n: int) -> np.ndarray:
    """bytes (..., nb) -> bit j of byte i at [..., 8*i + j]... returned as (..., nb, 8) uint8."""
    return (b[..., :, None] >> np.arange(n, dtype=np.uint8)) & 1


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins. Sub-blocks 0-3 keep theirs in the
    low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 have their low 4 bits in the nibbles
    of bytes 8-11 and their top 2 bits in the top bits of bytes 0-3 / 4-7."""
    lo, hi, tail = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (tail & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc.astype(np.uint8), m.astype(np.uint8)


def decode(raw: np.ndarray, ggml_type: str, N: int, K: int) -> tuple[np.ndarray, SubScales]:
    """Raw GGUF tensor bytes (N rows) -> (codes (N, K) uint8 in [0, 2^p), SubScales) of the table above."""
    if ggml_type not in KQ_TYPES:
        raise FormatError(f"no two-level import for ggml type {ggml_type}")
    p, G, S, nbytes, c0 = KQ_TYPES[ggml_type]
    if K % S:
        raise FormatError(f"{ggml_type} tensor with K={K} is not a multiple of its block of {S}")
    nb = K // S
    b = np.asarray(raw, np.uint8).reshape(N, nb, nbytes)
    sc = m = dmin = None
    nib = False
    if ggml_type in ("Q5_0", "Q5_1"):
        d = _f16(b, 0)
        if ggml_type == "Q5_1":
            dmin = (-_f16(b, 2).astype(np.float32)).astype(np.float16)    # b = -m: negation is exact
        o = 2 if ggml_type == "Q5_0" else 4
        qh = _bits(b[..., o:o + 4], 8).reshape(N, nb, 32)               # bit j of the little-endian u32
        qs = b[..., o + 4:o + 20]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1) | (qh << 4)
    elif ggml_type in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, m = _k_scales(b[..., 4:16])
        sc = sc.astype(np.int8)                      # 0..63
        if ggml_type == "Q4_K":
            qs = b[..., 16:144].reshape(N, nb, 4, 32)
            q = np.stack([qs & 15, qs >> 4], axis=3)                    # (N, nb, 4 chunks, 2, 32)
        else:
            qh = _bits(b[..., 16:48], 8)                                # (N, nb, 32 lanes, 8 sub-blocks)
            qs = b[..., 48:176].reshape(N, nb, 4, 32)
            q = np.stack([qs & 15, qs >> 4], axis=3)
            q = q | (qh.transpose(0, 1, 3, 2).reshape(N, nb, 4, 2, 32) << 4)
    elif ggml_type == "Q6_K":
        ql = b[..., 0:128].reshape(N, nb, 2, 64)
        qh = b[..., 128:192].reshape(N, nb, 2, 32)
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(N, nb * 16)
        d = _f16(b, 208)
        low = np.concatenate([ql & 15, ql >> 4], axis=-1).reshape(N, nb, 2, 4, 32)
        high = (qh[:, :, :, None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        q = low | (high << 4)
    elif ggml_type == "Q3_K":
        hm = b[..., 0:32]
        qs = b[..., 32:96].reshape(N, nb, 2, 1, 32)
        s = b[..., 96:108]
        d = _f16(b, 108)
        low4 = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], axis=-1)              # sub-blocks 0..15
        top2 = (s[..., 8:12][..., None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3   # (.., 4, 4)
        sc = ((low4 | (top2.reshape(N, nb, 16) << 4)).astype(np.int16) - 32).astype(np.int8)
        low = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3                      # (N, nb, 2, 4, 32)
        high = _bits(hm, 8).transpose(0, 1, 3, 2).reshape(N, nb, 2, 4, 32)                 # bit 4n+j of byte l
        q = low | (high << 2)
    elif ggml_type == "Q2_K":
        sc = np.ascontiguousarray(b[..., 0:16]).reshape(N, nb * 16)                       # sc | m << 4
        nib = True
        qs = b[..., 16:80].reshape(N, nb, 2, 1, 32)
        d, dmin = _f16(b, 80), _f16(b, 82)
        q = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    elif ggml_type == "IQ4_XS":
        d = _f16(b, 0)
        sh = np.ascontiguousarray(b[..., 2:4]).view("<u2")[..., 0]
        sl = b[..., 4:8]
        low = np.stack([sl & 15, sl >> 4], axis=-1).reshape(N, nb, 8)
        high = (sh[..., None] >> (2 * np.arange(8, dtype=np.uint16))) & 3
        sc = ((low | (high.astype(np.uint8) << 4)).astype(np.int16) - 32).astype(np.int8).reshape(N, nb * 8)
        qs = b[..., 8:136].reshape(N, nb, 8, 16)
        q = (IQ4_VALUES[np.concatenate([qs & 15, qs >> 4], axis=-1)] + 128).astype(np.uint8)
    else:   # IQ4_NL
        d = _f16(b, 0)
        qs = b[..., 2:18]
        q = (IQ4_VALUES[np.concatenate([qs & 15, qs >> 4], axis=-1)] + 128).astype(np.uint8)
    codes = np.ascontiguousarray(np.asarray(q, np.uint8).reshape(N, K))
    d = np.ascontiguousarray(d.reshape(N, nb))
    dmin = None if dmin is None else np.ascontiguousarray(dmin.reshape(N, nb))
    if sc is not None:
        sc = np.ascontiguousarray(sc.reshape(N, K // G))
    if m is not None:
        m = np.ascontiguousarray(m.reshape(N, K // G))
    if S == G:
        sc = None                                  # one level: a = d
    return codes, SubScales(d, sc, dmin, m, c0, G, S, nib)
