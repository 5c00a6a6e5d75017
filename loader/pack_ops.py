"""One tensor at a time, fast: the packer's steps in C (loader/pack_native.c) with NumPy references.

Profiled on the default model (2 cores): NumPy's bit-plane packing took 7.3 of the 9.7 s of a W4A16 first
use, and the clipping search plus the float64 Hadamard butterfly 56 of the 74 s at W8A8 with one scale per
token; a 7B file would take an hour. The C loops compute the same values (bitwise: tests/test_pack_ops.py
compares them with loader.bipolar and loader.rotation), read GGUF Q4_0 / Q4_1 / Q8_0 blocks straight from
the mapped file, and work through a tensor in chunks of rows, so that the float64 copy of a 7B linear
(360 MB for w_gate) never exists at once. Where the C module cannot be built every function here falls
back to the NumPy reference (the same result, slower).
"""
from __future__ import annotations

import mmap
import os

import numpy as np

from loader import native
from loader.bipolar import LANES, PackedLinear, pack_planes, padded_k, quantize_weights
from loader.rotation import check_block, hadamard_blocks

NATIVE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}       # ggml type ids pack_native.c reads itself
SOURCE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
CHUNK_BYTES = 32 << 20                                  # float64 rows handled per C call


def threads() -> int:
    """Threads for the C loops: ANYBIT_THREADS, else every core (the bench pins it to compare peers)."""
    env = os.environ.get("ANYBIT_THREADS")
    return max(1, int(env)) if env and env.isdigit() else (os.cpu_count() or 1)


def _ptr(ffi, ctype: str, a: np.ndarray | None):
    return ffi.NULL if a is None else ffi.cast(ctype, a.ctypes.data)


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"{what}: out of memory")
    if rc:
        raise ValueError(f"{what}: invalid arguments (status {rc})")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (N, Kp) uint8 -> planes (bits, N, Kp/32) uint32, as loader.bipolar.pack_planes."""
    L = native.lib()
    codes = np.ascontiguousarray(codes, np.uint8)
    N, Kp = codes.shape
    if L is None or Kp % LANES or not 1 <= bits <= 8:
        return pack_planes(codes, bits)
    ffi, lib = L
    out = np.empty((bits, N, Kp // LANES), np.uint32)
    _check(lib.abl_pack_codes(_ptr(ffi, "uint8_t *", codes), N, Kp, bits, _ptr(ffi, "uint32_t *", out),
                              threads()), "pack_codes")
    return out


def can_read_raw(t) -> bool:
    """Whether the C loops read this source tensor's blocks themselves."""
    return (native.lib() is not None and getattr(t, "raw", None) is not None and t.ggml_type in NATIVE_TYPES
            and len(t.shape) == 2 and t.shape[1] % 32 == 0)


def exact_from_raw(t, bits: int) -> PackedLinear:
    """The exact import of a Q4_0 / Q4_1 / Q8_0 tensor at `bits` (G = 32) straight from its mapped blocks:
    loader.pack.exact_import followed by the plane packing, in one pass. Needs can_read_raw(t)."""
    ffi, lib = native.lib()
    N, K = t.shape
    raw = np.ascontiguousarray(t.raw())
    planes = np.empty((bits, N, K // LANES), np.uint32)
    s = np.empty((N, K // 32), np.float32)
    o = np.empty((N, K // 32), np.float32)
    _check(lib.abl_exact(_ptr(ffi, "uint8_t *", raw), NATIVE_TYPES[t.ggml_type], N, K, bits,
                         _ptr(ffi, "uint32_t *", planes), _ptr(ffi, "float *", s), _ptr(ffi, "float *", o),
                         threads()), f"exact import of {t.name}")
    return PackedLinear(planes, s, o, bits, 32, K, N)


def _row_source(t):
    """A function (r0, r1, out) filling float64 rows r0..r1 of the source tensor into out."""
    if can_read_raw(t):
        ffi, lib = native.lib()
        raw = t.raw()
        K = t.shape[1]

        def rows(r0, r1, out):
            part = np.ascontiguousarray(raw[r0:r1])
            _check(lib.abl_dequant(_ptr(ffi, "uint8_t *", part), NATIVE_TYPES[t.ggml_type], r1 - r0, K,
                                   _ptr(ffi, "double *", out), threads()), f"dequantizing {t.name}")
        return rows
    w = t.load()                                         # float32 (N, K): half the float64 copy

    def rows(r0, r1, out):
        out[...] = w[r0:r1]
    return rows


def quantize_source(t, bits: int, group: int, *, asymmetric: bool, clip: bool,
                    rotate: int = 0) -> tuple[PackedLinear, float]:
    """Round source tensor t (rotated by `rotate`-lane Hadamard blocks first when nonzero) to `bits` with
    groups of `group`: loader.bipolar.quantize_weights on hadamard_blocks(w) and the plane packing.
    -> (packed linear, relative error ||deq - w|| / ||w|| in float64)."""
    N, K = t.shape
    L = native.lib()
    if L is None:
        w = t.load().astype(np.float64)
        if rotate:
            w = hadamard_blocks(w, rotate)
        q = quantize_weights(w, bits, group, asymmetric=asymmetric, clip_search=clip)
        err = float(np.linalg.norm(q.dequantize() - w) / max(np.linalg.norm(w), 1e-30))
        return PackedLinear.from_quant(q, None, rotate), err
    ffi, lib = L
    if rotate:
        check_block(rotate, K)
    Kp = padded_k(K, group)
    ng = Kp // group
    planes = np.empty((bits, N, Kp // LANES), np.uint32)
    s = np.empty((N, ng), np.float32)
    o = np.empty((N, ng), np.float32) if asymmetric else None
    ratios = np.linspace(1.0, 0.5, 11) if clip else np.array([1.0])
    rows = _row_source(t)
    step = max(1, CHUNK_BYTES // (8 * K))
    buf = np.empty((min(step, N), K), np.float64)
    sq = np.empty((min(step, N), 2), np.float64)          # per row: squared error, squared norm
    err2 = ref2 = 0.0
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        x = buf[:r1 - r0]
        rows(r0, r1, x)
        if rotate:
            _check(lib.abl_hadamard(_ptr(ffi, "double *", x), r1 - r0, K, rotate, threads()), "rotation")
        _check(lib.abl_quantize(_ptr(ffi, "double *", x), r1 - r0, K, bits, group, int(asymmetric),
                                _ptr(ffi, "double *", ratios), len(ratios), _ptr(ffi, "uint32_t *", planes), N,
                                r0, _ptr(ffi, "float *", s[r0:r1]),
                                _ptr(ffi, "float *", None if o is None else o[r0:r1]),
                                _ptr(ffi, "double *", sq), threads()), f"quantizing {t.name}")
        err2 += float(sq[:r1 - r0, 0].sum())
        ref2 += float(sq[:r1 - r0, 1].sum())
    return PackedLinear(planes, s, o, bits, group, K, N, None, rotate), float(np.sqrt(err2) / max(np.sqrt(ref2), 1e-30))


def release(t) -> None:
    """Let the OS take back the resident pages of source tensor t's mapped bytes once it is packed: they
    are clean file pages (a later read faults them back in), and without this a 7B GGUF read through its
    map stays resident, 3.8 GB above the packed model, for the whole packing."""
    raw = getattr(t, "raw", None)
    if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    a = raw()
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is None or a.nbytes == 0:
        return
    start = a.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    if start < 0 or start + a.nbytes > len(base):
        return
    lo = start - start % mmap.PAGESIZE
    base.madvise(mmap.MADV_DONTNEED, lo, start + a.nbytes - lo)
