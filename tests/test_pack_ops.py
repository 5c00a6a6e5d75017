"""The packer's C loops (loader/pack_native.c through loader/pack_ops.py) against independent references:
the NumPy definitions in loader.bipolar / loader.rotation (bitwise), and the gguf package's dequantizer
for GGUF blocks built here byte by byte from the format's layout."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from loader import native, pack_ops
from loader.bipolar import PackedLinear, pack_planes, quantize_weights
from loader.pack import exact_import
from loader.rotation import hadamard_blocks
from loader.source import SourceTensor

RNG = np.random.default_rng(11)
pytestmark = pytest.mark.skipif(native.lib() is None, reason="no C compiler: the NumPy paths are in use")


def raw_blocks(kind: str, N: int, K: int, rng=RNG) -> np.ndarray:
    """(N, K/32 * block bytes) uint8 of random GGUF blocks: f16 d (and m for Q4_1), then the quants."""
    nb = K // 32
    d = rng.uniform(-0.05, 0.05, (N, nb)).astype(np.float16)
    d[0, 0] = np.float16(6e-8)                              # a subnormal scale, decoded by hand in C
    parts = [d.view(np.uint8).reshape(N, nb, 2)]
    if kind == "Q4_1":
        parts.append(rng.uniform(-1, 0, (N, nb)).astype(np.float16).view(np.uint8).reshape(N, nb, 2))
    parts.append(rng.integers(0, 256, (N, nb, 32 if kind == "Q8_0" else 16), dtype=np.uint8))
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(N, -1))


def fields(raw: np.ndarray, kind: str, K: int) -> tuple:
    """The (d, [m,] q) fields of loader.source.SourceTensor.blocks from raw blocks (the GGUF layout)."""
    N = raw.shape[0]
    b = raw.reshape(N, K // 32, -1)
    f16 = lambda lo: np.ascontiguousarray(b[:, :, lo:lo + 2]).view("<f2")[:, :, 0].astype(np.float32)  # noqa: E731
    if kind == "Q8_0":
        return f16(0), np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(N, K)
    lo = 4 if kind == "Q4_1" else 2
    q = np.concatenate([b[:, :, lo:lo + 16] & 15, b[:, :, lo:lo + 16] >> 4], axis=2).reshape(N, K)
    return (f16(0), f16(2), q) if kind == "Q4_1" else (f16(0), q)


def tensor(w=None, raw=None, kind=None, shape=None) -> SourceTensor:
    if raw is not None:
        qt = GGMLQuantizationType[kind]
        return SourceTensor("t", shape, lambda: gguf_quants.dequantize(raw, qt).reshape(shape), kind,
                            lambda: fields(raw, kind, shape[1]), lambda: raw)
    return SourceTensor("t", w.shape, lambda: w)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_equals_numpy_planes(bits):
    codes = RNG.integers(0, 1 << bits, (37, 96), dtype=np.uint8)
    np.testing.assert_array_equal(pack_ops.pack_codes(codes, bits), pack_planes(codes, bits))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_exact_import_from_raw_blocks(kind):
    N, K = 9, 160
    raw = raw_blocks(kind, N, K)
    t = tensor(raw=raw, kind=kind, shape=(N, K))
    want_w = gguf_quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(N, K).astype(np.float64)
    for bits in ([8] if kind == "Q8_0" else [4, 6, 8]):
        lin = pack_ops.exact_from_raw(t, bits)
        ref = PackedLinear.from_quant(exact_import(fields(raw, kind, K), kind, bits))
        np.testing.assert_array_equal(lin.planes, ref.planes)
        np.testing.assert_array_equal(lin.scales, ref.scales)
        np.testing.assert_array_equal(lin.offsets, ref.offsets)
        # lossless against the gguf package's own decoding of the same bytes (to float32 rounding of o)
        np.testing.assert_allclose(lin.dequantize(), want_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantized_rows_equal_gguf(kind):
    N, K = 7, 96
    raw = raw_blocks(kind, N, K)
    out = np.empty((N, K))
    pack_ops._row_source(tensor(raw=raw, kind=kind, shape=(N, K)))(0, N, out)
    want = gguf_quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(N, K)
    np.testing.assert_array_equal(out, want.astype(np.float64))


@pytest.mark.parametrize("N,K,bits,group,asym,rot", [
    (50, 256, 4, 32, True, 0), (50, 200, 3, 64, False, 0), (40, 576, 8, 128, True, 64), (30, 1536, 2, 128, True, 256),
    (20, 576, 4, 576, True, 0),               # one group per row, summed pairwise over halves like NumPy
    (20, 1000, 5, 1024, False, 0), (10, 300, 1, 32, True, 0), (12, 64, 2, 32, True, 0)])
def test_quantize_equals_numpy_bitwise(N, K, bits, group, asym, rot):
    w = (RNG.standard_normal((N, K)) * RNG.uniform(0.1, 2, (N, 1))).astype(np.float32)
    w[0, :64] = 0.0                           # all-zero groups: scale 0
    w[1, :32] = 0.25                          # a constant group: every clipping ratio ties
    w[2] = np.round(w[2] * 4) / 4             # few distinct values: ties between ratios
    for clip in (True, False):
        lin, err = pack_ops.quantize_source(tensor(w), bits, group, asymmetric=asym, clip=clip, rotate=rot)
        x = w.astype(np.float64)
        if rot:
            x = hadamard_blocks(x, rot)
        q = quantize_weights(x, bits, group, asymmetric=asym, clip_search=clip)
        ref = PackedLinear.from_quant(q, None, rot)
        np.testing.assert_array_equal(lin.planes, ref.planes)
        np.testing.assert_array_equal(lin.scales, ref.scales)
        if asym:
            np.testing.assert_array_equal(lin.offsets, ref.offsets)
        else:
            assert lin.offsets is None
        assert lin.rotate == rot
        want = np.linalg.norm(q.dequantize() - x) / np.linalg.norm(x)
        assert err == pytest.approx(want, rel=1e-9)


def test_quantize_in_chunks_of_rows(monkeypatch):
    """Tensors larger than one chunk go through in row blocks with identical results."""
    w = RNG.standard_normal((70, 128)).astype(np.float32)
    whole, e1 = pack_ops.quantize_source(tensor(w), 3, 64, asymmetric=True, clip=True)
    monkeypatch.setattr(pack_ops, "CHUNK_BYTES", 8 * 128 * 16)          # 16 rows per chunk
    monkeypatch.setenv("ANYBIT_THREADS", "3")
    parts, e2 = pack_ops.quantize_source(tensor(w), 3, 64, asymmetric=True, clip=True)
    np.testing.assert_array_equal(whole.planes, parts.planes)
    np.testing.assert_array_equal(whole.offsets, parts.offsets)
    assert e1 == pytest.approx(e2, rel=1e-12)


def test_numpy_fallback_gives_the_same_model(monkeypatch):
    from loader.pack import Recipe, quantize_model
    from tests.test_pack import tiny_llama
    src = tiny_llama()
    recipe = Recipe(wbits=3, group=32, rotate=32)
    fast = quantize_model(src, recipe)
    monkeypatch.setenv("ANYBIT_PACK_NUMPY", "1")
    assert native.lib() is None
    slow = quantize_model(src, recipe)
    for name, t in fast.tensors.items():
        if isinstance(t, PackedLinear):
            np.testing.assert_array_equal(t.planes, slow.tensors[name].planes)
            np.testing.assert_array_equal(t.scales, slow.tensors[name].scales)
            assert fast.info[name]["rel_err"] == pytest.approx(slow.info[name]["rel_err"], rel=1e-9)


def test_release_drops_mapped_pages_without_changing_data(tmp_path):
    import mmap
    path = tmp_path / "blob"
    data = RNG.integers(0, 256, (64, 4096), dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, np.uint8, count=32 * 4096, offset=16 * 4096).reshape(32, 4096)
    t = SourceTensor("t", (32, 4096), lambda: view, raw=lambda: view)
    assert view.sum() == data[16:48].sum()
    pack_ops.release(t)                                   # the pages fault back in from the file
    np.testing.assert_array_equal(view, data[16:48])
    pack_ops.release(tensor(np.zeros((2, 32), np.float32)))   # not mapped: nothing to do
