"""Block Hadamard rotation of w_down's input (loader/rotation.py): the transform, the packed W R, the
decoder's run-time R x, and the packed directory that records it."""
import json

import numpy as np
import pytest

from engine.decoder import Decoder
from loader.pack import Recipe, quantize_model
from loader.packed import read_packed, write_packed
from loader.rotation import hadamard_blocks
from runtime.numpy_backend import NumpyBackend
from tests.test_pack import tiny_llama


def sylvester(n):
    """Hadamard matrix by its definition: H_1 = [1], H_2n = [[H, H], [H, -H]]."""
    H = np.array([[1.0]])
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


@pytest.mark.parametrize("b,K", [(2, 6), (8, 8), (64, 192), (256, 1536)])
def test_hadamard_blocks_is_x_times_blockdiag(b, K):
    x = np.random.default_rng(b).standard_normal((5, K))
    R = np.kron(np.eye(K // b), sylvester(b)) / np.sqrt(b)
    np.testing.assert_allclose(hadamard_blocks(x, b), x @ R, atol=1e-12)
    np.testing.assert_allclose(hadamard_blocks(hadamard_blocks(x, b), b), x, atol=1e-12)   # R R = I
    y32 = hadamard_blocks(x.astype(np.float32), b)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, x @ R, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,K", [(3, 9), (0, 8), (8192, 8192), (64, 96)])
def test_bad_blocks_are_refused(b, K):
    with pytest.raises(ValueError, match="rotation block"):
        hadamard_blocks(np.zeros((1, K)), b)
    if b in (3, 8192):
        with pytest.raises(ValueError, match="rotation block"):
            Recipe(wbits=8, rotate=b)


def _logits(pm, ids, **kw):
    d = Decoder(pm, NumpyBackend(), **kw)
    return d, d.forward(ids, d.new_cache(), all_logits=True)


def test_rotated_linears_keep_the_product():
    """W R packed, R x at run time (every linear, the tied output/embedding table too): the same logits
    as the unrotated pack to quantization noise, and far from them if the decoder forgot the run-time
    half."""
    src = tiny_llama(layers=2, d=128, F=256, V=40, seed=11)
    assert "tok_embeddings" not in src.tensors          # tied: embed() must undo the output's rotation
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    _, ref = _logits(quantize_model(src, Recipe(wbits=16)), ids)
    rotated = quantize_model(src, Recipe(wbits=8, group=32, rotate=256))
    assert rotated.info["layers.0.w_down"]["rotate"] == 256          # F = 256
    assert rotated.info["layers.0.wq"]["rotate"] == 128 and rotated.info["output"]["rotate"] == 128
    dec, got = _logits(rotated, ids)
    _, plain = _logits(quantize_model(src, Recipe(wbits=8, group=32)), ids)
    err, err_plain = np.abs(got - ref).max(), np.abs(plain - ref).max()
    assert err < 2 * err_plain + 1e-3 * np.abs(ref).max()
    for i in range(src.config.n_layers):
        dec.linear_for[f"layers.{i}.w_down"].rotate = 0
    wrong = dec.forward(ids, dec.new_cache(), all_logits=True)
    assert np.abs(wrong - ref).max() > 10 * err


@pytest.mark.parametrize("name,K,most,block", [("layers.3.w_down", 1536, 256, 256), ("layers.0.wq", 576, 256, 64),
                                               ("output", 576, 256, 64), ("layers.0.wq", 576, 0, 0),
                                               ("layers.0.wq", 48, 256, 0), ("layers.0.w_in", 384, 256, 128),
                                               ("layers.0.w_norm", 384, 256, 0)])
def test_rotation_block_rule(name, K, most, block):
    from loader.pack import rotation_block
    assert rotation_block(name, K, most) == block


def test_rotation_round_trips_through_the_packed_directory(tmp_path):
    src = tiny_llama(layers=1, d=128, F=128, V=40, seed=12)
    pm = quantize_model(src, Recipe(wbits=4, group=32, rotate=128))
    out = write_packed(pm, tmp_path / "rot")
    assert json.loads((out / "config.json").read_text())["version"] == 3     # 3: config.json checksummed too
    back = read_packed(out)
    assert back.info["layers.0.w_down"]["rotate"] == 128
    ids = [1, 2, 3]
    np.testing.assert_array_equal(_logits(back, ids)[1], _logits(pm, ids)[1])
    plain = write_packed(quantize_model(src, Recipe(wbits=4, group=32)), tmp_path / "plain")
    assert read_packed(plain).info["layers.0.w_down"]["rotate"] == 0


@pytest.mark.parametrize("abits,agroup", [(16, None), (8, "token")])
def test_compiled_cpu_forward_rotates_like_the_interpreter(abits, agroup):
    """The C graph loop rotates with ab_hadamard_rows: bitwise the op-by-op interpreter's logits."""
    from runtime.cpu import CpuBackend
    src = tiny_llama(layers=2, d=128, F=256, V=40, seed=13)
    pm = quantize_model(src, Recipe(wbits=8, group=128, rotate=256))
    ids = [5, 7, 11, 13, 17]
    with CpuBackend(threads=2) as be:
        per_op = Decoder(pm, be, abits=abits, agroup=agroup, interpret=True)
        fast = Decoder(pm, be, abits=abits, agroup=agroup)
        assert fast.program.python_ops == ["embed"]
        c0, c1 = per_op.new_cache(), fast.new_cache()
        np.testing.assert_array_equal(fast.forward(ids, c1, all_logits=True),
                                      per_op.forward(ids, c0, all_logits=True))
        np.testing.assert_array_equal(fast.forward([3], c1), per_op.forward([3], c0))


def test_c_hadamard_is_numpys_bit_for_bit():
    from runtime.cpu import build
    ffi, lib = build.load()
    x = np.random.default_rng(3).standard_normal((3, 768)).astype(np.float32)
    for b in (2, 64, 256):
        y = x.copy()
        assert lib.ab_hadamard_rows(ffi.cast("float *", y.ctypes.data), 3, 768, b) == 0
        np.testing.assert_array_equal(y, hadamard_blocks(x, b))
    assert lib.ab_hadamard_rows(ffi.cast("float *", x.ctypes.data), 3, 768, 96) == -3
    from runtime.cpu import CpuBackend
    with CpuBackend(threads=1) as be:              # the op the decoder and encoder call (rotate_rows)
        x3 = x.reshape(3, 2, 384)
        np.testing.assert_array_equal(be.hadamard(x3, 128), hadamard_blocks(x3, 128))
        with pytest.raises(RuntimeError, match="hadamard"):
            be.hadamard(x3, 96)
