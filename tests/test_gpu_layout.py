"""runtime.gpu_layout: the load-time GPU layout is invertible and its derived code sums are right."""
import numpy as np
import pytest

from loader.bipolar import pack_planes, quantize_weights
from runtime.gpu_layout import chunk_code_sums, from_gpu_planes, gpu_words, to_gpu_planes


@pytest.mark.parametrize("p,N,W", [(1, 1, 1), (4, 24, 9), (8, 40, 16), (3, 7, 33)])
def test_roundtrip_and_padding(p, N, W):
    rng = np.random.default_rng(p * 100 + W)
    planes = rng.integers(0, 2 ** 32, (p, N, W), dtype=np.uint32)
    g = to_gpu_planes(planes)
    assert g.shape == (p, N, gpu_words(W, words=True)) and g.shape[2] % 8 == 0 and g.shape[2] >= W
    assert not g[:, :, W:].any()
    np.testing.assert_array_equal(from_gpu_planes(g, W), planes)


def test_inverse_refuses_foreign_input():
    g = to_gpu_planes(np.ones((2, 3, 5), np.uint32))
    g[0, 0, 7] = 1
    with pytest.raises(ValueError, match="pad words"):
        from_gpu_planes(g, 5)
    with pytest.raises(ValueError):
        to_gpu_planes(np.ones((2, 3), np.uint32))


@pytest.mark.parametrize("p,K,G", [(4, 300, 32), (8, 128, 128), (2, 1000, 64)])
def test_chunk_code_sums_are_code_sums(p, K, G):
    rng = np.random.default_rng(K)
    qt = quantize_weights(rng.standard_normal((5, K)), p, G)
    g = to_gpu_planes(pack_planes(qt.codes, p))
    codes = np.zeros((5, g.shape[2] * 32), np.int64)
    codes[:, :qt.codes.shape[1]] = qt.codes
    ref = codes.reshape(5, -1, 128).sum(-1)
    np.testing.assert_array_equal(chunk_code_sums(g), ref)


def test_gpu_words():
    assert gpu_words(32) == 8 and gpu_words(256) == 8 and gpu_words(288) == 16 and gpu_words(9, words=True) == 16
