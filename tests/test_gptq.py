"""GPTQ rounding (loader/gptq.py) against round-to-nearest, on the error it is meant to minimise."""
import numpy as np
import pytest

from loader.bipolar import quantize_weights, values_of
from loader.gptq import gptq_quantize


def _problem(seed, N=48, K=128):
    rng = np.random.default_rng(seed)
    # correlated inputs with a few loud channels: where compensating along H pays off
    X = rng.standard_normal((400, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)))
    X[:, :4] *= 8
    w = rng.standard_normal((N, K))
    return w, X


@pytest.mark.parametrize("bits,group,asym", [(4, 32, True), (3, 64, True), (2, 32, False), (8, 128, True)])
def test_gptq_beats_rounding_on_the_calibration_outputs(bits, group, asym):
    w, X = _problem(bits * 10 + group)
    q = gptq_quantize(w, X.T @ X, bits, group, asymmetric=asym)
    r = quantize_weights(w, bits, group, asymmetric=asym, clip_search=True)
    assert q.codes.shape == (48, 128) and q.codes.max() < 2 ** bits and q.scales.shape == (48, 128 // group)
    assert (q.offsets is None) == (not asym)
    err_g = np.linalg.norm(X @ (q.dequantize() - w).T)
    err_r = np.linalg.norm(X @ (r.dequantize() - w).T)
    assert err_g < err_r * (0.9 if bits <= 4 else 1.0), (err_g, err_r)


def test_gptq_dequantizes_with_its_own_group_parameters():
    """Every weight is s * v + o of its group (the grid the kernels compute with), all-zero groups too."""
    w, X = _problem(1)
    w[:5, :32] = 0.0            # the first group: nothing has been compensated into it yet
    q = gptq_quantize(w, X.T @ X, 4, 32)
    s = np.repeat(q.scales.astype(np.float64), 32, axis=1)
    o = np.repeat(q.offsets.astype(np.float64), 32, axis=1)
    np.testing.assert_allclose(q.dequantize(), s * values_of(q.codes, 4) + o)
    assert np.all(q.scales[:5, 0] == 0) and np.all(q.dequantize()[:5, :32] == 0)


def test_gptq_refuses_mismatched_shapes():
    w, X = _problem(2)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, np.eye(64), 4, 32)
    with pytest.raises(ValueError, match="multiple of the group"):
        gptq_quantize(w[:, :96], np.eye(96), 4, 64)
