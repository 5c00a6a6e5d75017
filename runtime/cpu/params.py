"""Half-size group parameters for the byte-code kernels: which float32 scales and offsets are exactly
float16 a = 2s and z = o - r s (f16_params), and when z is not stored at all (derived_zero)."""
from __future__ import annotations

import numpy as np

def f16_params(scales: np.ndarray, offsets: np.ndarray | None, bits: int):
    """(a, z, r): float16 a = 2s and z = o - r*s (None when symmetric) with an odd r in 1..2^p - 1, or None
    when no r makes them exact.

    Why: decode is memory-bound and float32 s, o are 8 of every ~24 bytes read per 32 weights at W4. Every
    exact GGUF import has float16 d (and m), so a = d and, at r = 2^p - 1 (z = the weight of code 0),
    Q4_1: z = m, Q4_0: z = -8d, Q8_0: z = -128d. Imported at p > 4 the codes are shifted (a Q4_1 code c
    becomes c + 120 at p = 8) and z = o - 255 s = m - 120 d is usually not a float16, but the weight of
    the shifted code 120 is m again: r = 2^k - 1 (z = weight of code (2^p - 2^k)/2) covers those. The
    kernels rebuild s = 0.5f*a and o = z + r*s in float32 (ab_internal.h), so this accepts only parameters
    whose rebuilt values equal the stored float32 ones (bit for bit but for the sign of a zero offset),
    computed here with the same float32 operations; then f16 and f32 handles give identical outputs on
    every isa."""
    s = np.ascontiguousarray(scales, np.float32)
    P1 = (1 << int(bits)) - 1
    with np.errstate(over="ignore", invalid="ignore"):
        a64 = 2.0 * s.astype(np.float64)
        a = a64.astype(np.float16)
        if not np.array_equal(a.astype(np.float64), a64):
            return None
        s_rec = np.float32(0.5) * a.astype(np.float32)
        if not np.array_equal(s_rec.view(np.uint32), s.view(np.uint32)):
            return None
        if offsets is None:
            return a, None, P1
        o = np.ascontiguousarray(offsets, np.float32)
        for k in range(int(bits), 0, -1):        # r = P1 first (code 0), then the shifted imports
            r = (1 << k) - 1
            z64 = o.astype(np.float64) - r * s.astype(np.float64)
            z = z64.astype(np.float16)
            if not np.array_equal(z.astype(np.float64), z64):
                continue
            o_rec = z.astype(np.float32) + np.float32(r) * s_rec
            # by value: an all-zero Q4_0 group stores o = -0.0 and rebuilds +0.0, which changes y only
            # in the sign of an output that is exactly zero
            if np.array_equal(o_rec, o):
                return a, z, r
    return None


def derived_zero(a: np.ndarray, z: np.ndarray) -> int:
    """k > 0 when z = -k a exactly for every group with k a power of two (ab_internal.h AB_F16_ZK): a
    Q4_0 import has z = -8a, a Q8_0 one -128a. The kernels then rebuild z instead of reading it."""
    af, zf = a.astype(np.float32), z.astype(np.float32)
    for k in (8, 128, 1, 2, 4, 16, 32, 64, 256):
        if np.array_equal(zf, np.float32(-k) * af):
            return k
    return 0

