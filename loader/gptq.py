"""Error-compensating rounding (GPTQ, Frantar et al. 2022) for bipolar weights with group parameters.

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns one at a time and moves
each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the
layer's squared output error on calibration inputs, H = X^T X. The output error on inputs like the
calibration ones is then what is minimised, not the weight error.

Why here: the W4A16 embedder (MiniLM, 384 wide) lost too much by rounding (a short sentence fell to
cosine 0.904 against the float embedding); with GPTQ on rotated inputs (loader/rotation.py) and a
calibration set that includes short texts every sentence of the test set stays above 0.98.

Group parameters: when the rounding reaches the first column of a group, that group's scale and offset
are chosen by the ordinary round-to-nearest rule with its clipping search (loader/bipolar.py) on the
columns as they stand then, i.e. after the compensation of the earlier groups.
"""
from __future__ import annotations

import numpy as np

from loader.bipolar import QuantTensor, codes_of, quantize_weights, values_of

DAMP = 0.01             # added to the diagonal, as a fraction of its mean (keeps H invertible)


def gptq_quantize(w: np.ndarray, H: np.ndarray, bits: int, group: int, *, asymmetric: bool = True,
                  clip_search: bool = True) -> QuantTensor:
    """w (N, K) float, H (K, K) = sum of x x^T over calibration inputs x of this linear. K % group == 0."""
    W = np.array(w, np.float64, copy=True)
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian shape {H.shape} does not match {K} input columns")
    if K % group:
        raise ValueError(f"GPTQ needs K ({K}) to be a multiple of the group ({group})")
    H = np.array(H, np.float64, copy=True)
    dead = np.diag(H) == 0                      # inputs never seen: any value rounds, none compensates
    H[dead, dead] = 1.0
    H[np.diag_indices(K)] += DAMP * np.mean(np.diag(H))
    # upper Cholesky factor of H^-1: row j holds how column j's error spreads over the later columns
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros((N, K), np.uint8)
    S, O = np.zeros((N, K // group)), np.zeros((N, K // group))
    for g0 in range(0, K, group):
        qt = quantize_weights(W[:, g0:g0 + group], bits, group, asymmetric=asymmetric, clip_search=clip_search)
        s = qt.scales[:, 0].astype(np.float64)
        o = qt.offsets[:, 0].astype(np.float64) if asymmetric else np.zeros(N)
        S[:, g0 // group], O[:, g0 // group] = s, o
        safe = np.where(s > 0, s, 1.0)          # an all-zero group has scale 0: every code gives 0
        g1 = g0 + group
        E = np.empty((N, group))
        for j in range(g0, g1):
            c = codes_of(W[:, j] - o, safe, bits)
            q = s * values_of(c, bits) + o
            codes[:, j] = c
            E[:, j - g0] = err = (W[:, j] - q) / U[j, j]
            W[:, j + 1:g1] -= np.outer(err, U[j, j + 1:g1])
        # the later groups take the whole group's errors in one product (GPTQ's lazy batch update: the
        # same sums, one matrix product instead of `group` rank-1 passes over every later column)
        W[:, g1:] -= E @ U[g0:g1, g1:]
    return QuantTensor(codes, S.astype(np.float32), O.astype(np.float32) if asymmetric else None, bits, group, K)
