"""The GPU layout of packed weights (the load-time "matrix preprocessing" of SPEC.md section 2).

The canonical layout (docs/DESIGN.md) stores planes (p, N, Kp/32) uint32 with Kp a multiple of the
group size. The GPU kernels (ptx/gemv.ptx, ptx/bgemm_b1.ptx) read whole 256-lane steps (8 words, two
16-byte cp.async / ld.global.nc.v4 transfers per row and plane), so every row is padded with zero words
to Kw = round_up(Kp/32, 8) words: a 32-byte aligned row whose pad lanes have bit 0 in every plane (the
products then ignore them, as they ignore the canonical pad lanes). The word order inside a row is the
canonical one: the mma fragments and the shared-memory swizzle are applied by the kernels while staging,
so one device copy serves both the GEMV and the tensor-core GEMM.

Besides the planes the GEMM needs the weight code sums per 128-lane chunk (`chunk_code_sums`), used
by the popcount corrections of the AND form; they are derived data, recomputed from the planes.

`to_gpu_planes` and `from_gpu_planes` are inverses (tests/test_gpu_layout.py checks it on random input).
"""
from __future__ import annotations

import numpy as np

WORD_LANES = 32
STEP_WORDS = 8            # one m16n8k256 step = 256 lanes = 8 words
CHUNK_WORDS = 4           # code sums are kept per 128-lane chunk


def gpu_words(kp_or_words: int, *, words: bool = False) -> int:
    """Row length in words on the GPU for a canonical width of Kp lanes (or of that many words)."""
    w = int(kp_or_words) if words else -(-int(kp_or_words) // WORD_LANES)
    return -(-w // STEP_WORDS) * STEP_WORDS


def to_gpu_planes(planes: np.ndarray) -> np.ndarray:
    """canonical (p, N, W) uint32 -> GPU (p, N, Kw) uint32, Kw = round_up(W, 8), pad words 0."""
    planes = np.asarray(planes)
    if planes.dtype != np.uint32 or planes.ndim != 3:
        raise ValueError(f"planes must be uint32 (p, N, W), got {planes.dtype} {planes.shape}")
    p, n, w = planes.shape
    out = np.zeros((p, n, gpu_words(w, words=True)), np.uint32)
    out[:, :, :w] = planes
    return out


def from_gpu_planes(gpu: np.ndarray, words: int) -> np.ndarray:
    """Inverse of to_gpu_planes: GPU (p, N, Kw) -> canonical (p, N, words). Refuses to drop set bits."""
    gpu = np.asarray(gpu)
    if gpu.ndim != 3 or gpu.shape[2] < words or gpu.shape[2] % STEP_WORDS:
        raise ValueError(f"GPU planes {gpu.shape} cannot hold {words} words per row")
    if gpu[:, :, words:].any():
        raise ValueError("GPU planes have set bits in their pad words: not produced by to_gpu_planes")
    return np.ascontiguousarray(gpu[:, :, :words])


def chunk_code_sums(gpu_planes: np.ndarray) -> np.ndarray:
    """(N, Kw/4) uint32: sum over each 128-lane chunk of the p-bit codes (MSB plane first).

    Equal to sum_r 2^(p-1-r) popc(plane r) over the chunk, the PW term of docs/DESIGN.md's products.
    """
    p, n, kw = gpu_planes.shape
    if kw % CHUNK_WORDS:
        raise ValueError(f"row of {kw} words is not a whole number of 128-lane chunks")
    bits = np.unpackbits(np.ascontiguousarray(gpu_planes).view(np.uint8), axis=-1)   # popcount per byte
    pc = bits.reshape(p, n, kw * 4, 8).sum(-1, dtype=np.uint32)                     # (p, n, bytes)
    pc = pc.reshape(p, n, kw // CHUNK_WORDS, 16).sum(-1, dtype=np.uint64)             # per chunk
    weights = (1 << np.arange(p - 1, -1, -1)).astype(np.uint64)
    return np.tensordot(weights, pc, axes=(0, 0)).astype(np.uint32)


def group_table(a: np.ndarray | None, n: int, ng: int) -> np.ndarray | None:
    """Scales/offsets as contiguous float32 (N, ng), checking the shape."""
    if a is None:
        return None
    a = np.ascontiguousarray(a, np.float32)
    if a.shape != (n, ng):
        raise ValueError(f"group table has shape {a.shape}, expected {(n, ng)}")
    return a
