"""abits "q8": activations rounded to llama.cpp's 8-bit grid before each linear, in NumPy.

llama.cpp's CPU dot products do not multiply float activations: each linear's input row is first
quantized to 8 bits in the block type its weight pairs with (the weight type's vec_dot_type in ggml-cpu),
and the product is exact integer sums times the two scales. So running a GGUF file at its own weights
with exact (A16) activations differs from llama.cpp by llama.cpp's own rounding (mean KL 5e-3 on the
Gemma 3 270M Q4_K_M file). abits "q8" reproduces that rounding, per linear, in one of two rules:

- block 32, "Q8_0" (weights Q4_0, Q5_0, Q8_0, IQ4_NL; also Q4_1 and Q5_1, see below): per 32 lanes
  amax = max |x|, the scale d = float16(amax / 127) (rounded to nearest even), and
  q = round-half-even(x * (127 / amax)) in float32 (0 when amax is 0). The value is d * q. This is the x86
  AVX rule; llama.cpp's scalar reference divides by d and rounds half away from zero instead, which it
  runs only on machines without AVX.
- block 256, "Q8_K" (the K-quants Q2_K..Q6_K and IQ4_XS): per 256 lanes the signed element of largest
  |x| (the first such), iscale = -127 / max, q = min(127, round-half-even(iscale * x)), d = 1 / iscale in
  float32 (negative when max > 0: d * q has x's sign). The value is d * q.

Q4_1 / Q5_1 weights pair with Q8_1, the same grid as Q8_0 plus a block sum float16(d32 * sum q) that
only their offset term reads; here the offset term sees the exact sum of d * q (a relative difference of
at most 2^-11 in that term). Lanes past K count as zeros; a block that ends past K is cut there.

A block whose d is 0 (amax below float16's range for Q8_0, 127 / max overflowing for Q8_K) is all zeros
(llama.cpp's q there comes from an infinite multiplier, but its values d * q are 0 too).

This module is the readable definition: the NumPy backend runs it, and the C kernels (kernels_q8.c) give
the same d * q bit for bit (tests/test_act_q8.py).
"""
from __future__ import annotations

import numpy as np

BLOCKS = (32, 256)          # the two rules, named by their block
# ggml-cpu's vec_dot_type per weight type: Q8_K for these, Q8_0 (or Q8_1, the same grid) for the others
Q8_K_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                        "IQ1_S", "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"})


def block_for_type(ggml_type: str | None) -> int:
    """The q8 block of a weight imported from `ggml_type`: 256 where llama.cpp pairs it with Q8_K, else 32
    (Q8_0 / Q8_1 pairs, and weights without a GGUF quantized source: float tensors and other formats,
    which llama.cpp itself would multiply in float; 32 is the finer, closer choice)."""
    return 256 if ggml_type in Q8_K_TYPES else 32


def check_q8_block(block) -> int:
    """The rounding block of abits "q8" (a linear's agroup): 32 or 256; None means 32."""
    if block is None:
        return 32
    if isinstance(block, bool) or block not in BLOCKS:
        raise ValueError(f"abits 'q8' rounds in blocks of 32 (Q8_0) or 256 (Q8_K) lanes, got agroup {block!r}")
    return int(block)


def q8_round(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 -> (q int32 (M, nb * block), d float32 (M, nb)), nb = ceil(K / block); the rounded
    activations are d[:, b] * q[:, block b] (lanes past K are 0)."""
    if block not in BLOCKS:
        raise ValueError(f"the q8 activation block must be 32 (Q8_0) or 256 (Q8_K), got {block!r}")
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"activations must be (M, K), got shape {x.shape}")
    M, K = x.shape
    nb = -(-K // block)
    xb = np.zeros((M, nb * block), np.float32)
    xb[:, :K] = x
    xb = xb.reshape(M, nb, block)
    ax = np.abs(xb)
    amax = ax.max(-1)
    nz = amax > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if block == 32:
            d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
            inv = np.where(nz, np.float32(127) / np.where(nz, amax, 1), np.float32(0)).astype(np.float32)
            q = np.rint(xb * inv[..., None])
        else:
            first = np.take_along_axis(xb, ax.argmax(-1)[..., None], -1)[..., 0]     # argmax: first of ties
            iscale = np.where(nz, np.float32(-127) / np.where(nz, first, 1), np.float32(0)).astype(np.float32)
            q = np.minimum(np.rint(xb * iscale[..., None]), 127)
            d = np.where(nz, np.float32(1) / np.where(nz, iscale, 1), np.float32(0)).astype(np.float32)
        # d = 0 (amax below the float16 / float32 range of d): every value is 0, whatever q llama.cpp keeps
        q = np.where((d != 0)[..., None], q, 0)
    return q.astype(np.int32).reshape(M, nb * block), d.astype(np.float32)


def q8_values(x: np.ndarray, block: int) -> np.ndarray:
    """The rounded activations d * q as float64 (M, K): exact (d has 24 significant bits, q 8)."""
    x = np.asarray(x, np.float32)
    q, d = q8_round(x, block)
    M, K = x.shape
    v = q.reshape(M, d.shape[1], block).astype(np.float64) * d.astype(np.float64)[..., None]
    return v.reshape(M, -1)[:, :K]
