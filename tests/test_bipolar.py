"""The bipolar-INT format against its definitions (SPEC.md section 1), in float64 NumPy."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from loader.bipolar import (PackedLinear, pack_planes, popcount_dot, quantize_activations, quantize_weights,
                            unpack_planes, values_of)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 9), words=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip(bits, n, words, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(n, 32 * words)).astype(np.uint8)
    planes = pack_planes(codes, bits)
    assert planes.shape == (bits, n, words) and planes.dtype == np.uint32
    np.testing.assert_array_equal(unpack_planes(planes), codes)


def test_plane_layout_is_msb_first_lsb_lane():
    codes = np.zeros((1, 64), np.uint8)
    codes[0, 33] = 0b101          # lane 33: word 1, bit 1
    planes = pack_planes(codes, 3)
    assert planes[0, 0, 1] == 1 << 1 and planes[1, 0, 1] == 0 and planes[2, 0, 1] == 1 << 1
    assert planes[:, :, 0].sum() == 0


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), K=st.integers(1, 150), group=st.sampled_from([32, 64, 128, None]),
       asym=st.booleans(), seed=st.integers(0, 2**31))
def test_quantize_error_bounded_by_scale(bits, K, group, asym, seed):
    w = np.random.default_rng(seed).standard_normal((3, K)) * 3
    q = quantize_weights(w, bits, group, asymmetric=asym, clip_search=False)
    err = np.abs(q.dequantize() - w)
    s = np.repeat(q.scales.astype(np.float64), q.group, axis=1)[:, :K]
    assert (err <= s * (1 + 1e-6) + 1e-6 * np.abs(w)).all()   # scales/offsets are stored as float32
    assert q.codes.max() < (1 << bits)


def test_clip_search_never_worse():
    w = np.random.default_rng(1).standard_t(3, size=(8, 256))
    for bits in (2, 3, 4):
        plain = quantize_weights(w, bits, 64, clip_search=False).dequantize()
        clip = quantize_weights(w, bits, 64, clip_search=True).dequantize()
        assert ((clip - w) ** 2).sum() <= ((plain - w) ** 2).sum() + 1e-12


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("q", range(1, 9))
def test_popcount_identity_equals_integer_dot(p, q):
    """The AND form of SPEC.md equals the float64 dot product of the bipolar integers, pads excluded."""
    rng = np.random.default_rng(p * 10 + q)
    K = 70                                    # two full words and a partial one
    wc = rng.integers(0, 1 << p, size=(1, 96)).astype(np.uint8)
    ac = rng.integers(0, 1 << q, size=(1, 96)).astype(np.uint8)
    wc[:, K:] = 0
    ac[:, K:] = 0
    expect = float(np.dot(values_of(wc[0, :K], p).astype(np.float64), values_of(ac[0, :K], q).astype(np.float64)))
    got = popcount_dot(pack_planes(wc, p)[:, 0], pack_planes(ac, q)[:, 0], K, 96)
    assert got == expect


def test_activation_quantizer_per_group_scales():
    x = np.zeros((2, 64))
    x[0, :32] = np.linspace(-1, 1, 32)
    x[0, 32:] = 100.0
    qa = quantize_activations(x, 8, 32)
    np.testing.assert_allclose(qa.scales[0], [1 / 255, 100 / 255], rtol=1e-6)
    assert (qa.scales[1] == 0).all()          # all-zero group: scale 0, so it dequantizes to exact zeros
    assert (qa.dequantize()[1] == 0).all()
    np.testing.assert_allclose(qa.dequantize()[0], x[0], atol=1 / 255)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_nested_precision_is_top_planes(k):
    w = np.random.default_rng(3).standard_normal((4, 96))
    lin = PackedLinear.from_quant(quantize_weights(w, 4, 32, asymmetric=True))
    sub = lin.nested(k)
    codes4 = unpack_planes(lin.planes)
    np.testing.assert_array_equal(unpack_planes(sub.planes), codes4 >> (4 - k))
    # the k-bit value times 2^(4-k) differs from the 4-bit value by the dropped planes only
    drop = (1 << (4 - k)) - 1
    diff = values_of(codes4, 4) - values_of(codes4 >> (4 - k), k) * (1 << (4 - k))
    assert np.abs(diff).max() <= drop


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(np.ones((2, 32)), 9, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weights(np.ones((2, 32)), 4, 48)
    with pytest.raises(ValueError, match="2-D"):
        quantize_activations(np.ones(5), 4, 32)
