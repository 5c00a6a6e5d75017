"""Exact import of the two-level GGUF types (loader/kquant.py) against gguf.quants.dequantize, the
format's reference: random blocks of every type, a GGUF file through the reader and the packer, nested
precision, bytes per weight, and (slow) the real tensors of a Gemma 3 Q4_K_M file."""
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from loader.bipolar import PackedLinear, concat_rows
from loader.gguf_reader import GGUFFile
from loader.kquant import F16_FIELDS, KQ_TYPES, decode
from loader.pack import exact_import, exact_import_sub

TYPES = list(KQ_TYPES)
# the source formats' bits per weight (block bytes * 8 / block lanes)
SOURCE_BPW = {t: v[3] * 8 / v[2] for t, v in KQ_TYPES.items()}


def random_blocks(kind: str, rows: int, K: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks: random bytes, float16 fields set to finite values of mixed magnitude."""
    _p, _G, S, nbytes, _c0 = KQ_TYPES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, K // S, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        f = (rng.standard_normal((rows, K // S)) * 10.0 ** rng.integers(-4, 1, (rows, K // S))).astype("<f2")
        raw[:, :, off:off + 2] = f.view(np.uint8).reshape(rows, K // S, 2)
    return raw.reshape(rows, -1)


def packed(raw: np.ndarray, kind: str, bits: int | None = None) -> PackedLinear:
    N, K = raw.shape[0], raw.shape[1] // KQ_TYPES[kind][3] * KQ_TYPES[kind][2]
    q, sub = exact_import_sub(decode(raw, kind, N, K), kind, bits)
    return PackedLinear.from_quant(q, sub=sub)


def assert_same_f32(got64: np.ndarray, want: np.ndarray):
    """float64 dequantization rounded to float32 equals the reference bit for bit (by value: a zero may
    differ in sign)."""
    got = got64.astype(np.float32)
    assert got.dtype == want.dtype == np.float32
    bad = got != want
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ, e.g. {got[bad][:4]} vs {want[bad][:4]}"


@pytest.mark.parametrize("kind", TYPES)
def test_random_blocks_bitwise(kind):
    raw = random_blocks(kind, 5, 512, seed=TYPES.index(kind))
    lin = packed(raw, kind)
    assert lin.bits == KQ_TYPES[kind][0] and lin.group == KQ_TYPES[kind][1]
    assert_same_f32(lin.dequantize(), gguf.quants.dequantize(raw, T[kind]))


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1"])
def test_gguf_quantized_blocks_bitwise(kind):
    """Blocks from gguf's own quantizer (it has one for these two types)."""
    w = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(w, T[kind])
    lin = packed(raw, kind)
    assert_same_f32(lin.dequantize(), gguf.quants.dequantize(raw, T[kind]))


@pytest.mark.parametrize("kind", ["Q5_0", "Q4_K", "Q6_K", "Q3_K", "Q2_K"])
def test_wider_grid_and_nested(kind):
    """Imported at more bits than the source, the codes shift and the weight is the same; the nested
    weight of the top k planes equals the float32-parameter form's nested weight."""
    raw = random_blocks(kind, 3, 256, seed=7)
    ref = gguf.quants.dequantize(raw, T[kind])
    p = KQ_TYPES[kind][0]
    assert_same_f32(packed(raw, kind, 8).dequantize(), ref)
    lin = packed(raw, kind)
    flat = PackedLinear(lin.planes, lin.scales, lin.offsets, lin.bits, lin.group, lin.K, lin.N)
    for k in range(1, p):
        a, b = lin.nested(k).dequantize(), flat.nested(k).dequantize()
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-7 * np.abs(b).max())


@pytest.mark.parametrize("kind", [t for t in TYPES if not t.startswith("IQ")])
def test_bytes_per_weight_near_source(kind):
    """Codes at the source's bits plus its float16 d / dmin and 8-bit sub-scales: within 10% of the
    source type's bits per weight (float32 per group would be 6.0 for Q4_K's 4.5). (IQ4 types are
    exact only at 8 bits, ~8.4 bpw: packed at fewer bits they are re-quantized, loader/pack.py.)"""
    lin = packed(random_blocks(kind, 4, 1024), kind)
    bpw = lin.nbytes * 8 / (lin.N * lin.K)
    assert bpw <= 1.10 * SOURCE_BPW[kind], (kind, bpw, SOURCE_BPW[kind])


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_concat_keeps_two_level(kind):
    a, b = packed(random_blocks(kind, 3, 256, 1), kind), packed(random_blocks(kind, 2, 256, 2), kind)
    c = concat_rows([a, b])
    assert c.sub is not None and c.N == 5
    np.testing.assert_array_equal(c.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))


def test_float32_form_of_exact_import():
    """exact_import (float32 scales / offsets) agrees with the two-level form to float32 rounding."""
    raw = random_blocks("Q4_K", 3, 256, 4)
    q = exact_import(decode(raw, "Q4_K", 3, 256), "Q4_K")
    want = gguf.quants.dequantize(raw, T.Q4_K).astype(np.float64)
    np.testing.assert_allclose(q.dequantize(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, str]]):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (raw, kind) in tensors.items():
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=T[kind])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_through_the_reader(tmp_path):
    raws = {k: random_blocks(k, 2, 512, 11) for k in TYPES}
    _write_gguf(tmp_path / "k.gguf", {f"x_{k}": (r, k) for k, r in raws.items()})
    g = GGUFFile(tmp_path / "k.gguf")
    for k, r in raws.items():
        q, sub = exact_import_sub(g.blocks(f"x_{k}"), k)
        lin = PackedLinear.from_quant(q, sub=sub)
        assert_same_f32(lin.dequantize(), g.load(f"x_{k}"))


GEMMA = os.environ.get("ANYBIT_GEMMA_GGUF", "/tmp/models/gemma-3-270m-q4_k_m.gguf")


@pytest.mark.slow
def test_real_gemma_tensors_bitwise():
    """Every two-level tensor of a real Q4_K_M file (Gemma 3 270M: Q5_0, Q4_K, Q6_K), a slice of rows each."""
    if not Path(GEMMA).is_file():
        pytest.skip(f"no Gemma 3 GGUF at {GEMMA} (set ANYBIT_GEMMA_GGUF)")
    g = GGUFFile(GEMMA)
    seen = set()
    for name, (shape, raw_type, _s, _n) in g.tensors.items():
        kind = T(raw_type).name
        if kind not in KQ_TYPES or len(shape) != 2:
            continue
        seen.add(kind)
        raw = g.raw(name)[:64]
        N, K = raw.shape[0], shape[1]
        q, sub = exact_import_sub(decode(raw, kind, N, K), kind)
        assert_same_f32(PackedLinear.from_quant(q, sub=sub).dequantize(), gguf.quants.dequantize(raw, T[kind]))
    assert {"Q5_0", "Q4_K", "Q6_K"} <= seen
