"""Packing: exact import of GGUF blocks, the packed directory (atomic, checksummed, versioned)."""
import json

import numpy as np
import pytest

from loader.bipolar import PackedLinear
from loader.errors import FormatError
from loader.pack import PackedModel, Recipe, exact_import, quantize_model
from loader.packed import read_packed, write_packed
from loader.source import ModelConfig, SourceModel, SourceTensor

RNG = np.random.default_rng(7)


def _f16(a):
    return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_exact_import_reproduces_ggml_formula(kind):
    N, K = 5, 96
    d = _f16(RNG.uniform(0.001, 0.1, (N, K // 32)))
    dd = np.repeat(d.astype(np.float64), 32, axis=1)
    if kind == "Q4_1":
        m = _f16(RNG.uniform(-1, 0, (N, K // 32)))
        q = RNG.integers(0, 16, (N, K))
        blocks, w = (d, m, q), dd * q + np.repeat(m.astype(np.float64), 32, axis=1)
    elif kind == "Q4_0":
        q = RNG.integers(0, 16, (N, K))
        blocks, w = (d, q), dd * (q - 8)
    else:
        q = RNG.integers(-128, 128, (N, K))
        blocks, w = (d, q), dd * q
    for bits in ([8] if kind == "Q8_0" else [4, 5, 6, 7, 8]):
        qt = exact_import(blocks, kind, bits)
        assert qt.bits == bits and qt.group == 32
        np.testing.assert_allclose(qt.dequantize(), w, rtol=0, atol=1e-6 * np.abs(w).max())
    with pytest.raises(FormatError, match="exactly"):
        exact_import(blocks, kind, 3)


def tiny_llama(layers=2, d=64, F=96, V=100, H=4, Hkv=2, seed=0) -> SourceModel:
    rng = np.random.default_rng(seed)
    hd = d // H
    shapes = {"output": (V, d), "norm": (d,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (d,), p + "ffn_norm": (d,), p + "wq": (H * hd, d), p + "wk": (Hkv * hd, d),
                       p + "wv": (Hkv * hd, d), p + "wo": (d, H * hd), p + "w_gate": (F, d), p + "w_up": (F, d),
                       p + "w_down": (d, F)})
    arrays = {}
    for n, s in shapes.items():
        arrays[n] = (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1]))
        arrays[n] = arrays[n].astype(np.float32)
    cfg = ModelConfig(arch="llama", dim=d, n_layers=layers, n_heads=H, n_kv_heads=Hkv, ffn_dim=F, vocab_size=V,
                      max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0, rope_style="adjacent",
                      tied_embeddings=True, eos_ids=[0])
    tensors = {n: SourceTensor(n, a.shape, (lambda a=a: a)) for n, a in arrays.items()}
    tok = '{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}'
    return SourceModel(cfg, tensors, tok, "tiny")


def test_quantize_model_packs_linears_only():
    src = tiny_llama()
    pm = quantize_model(src, Recipe(wbits=3, group=32))
    assert isinstance(pm.tensors["layers.0.wq"], PackedLinear) and pm.tensors["layers.0.wq"].bits == 3
    assert isinstance(pm.tensors["norm"], np.ndarray)
    assert pm.info["layers.1.w_down"]["exact"] is False and pm.info["layers.1.w_down"]["rel_err"] > 0


def test_packed_directory_roundtrip_bit_exact(tmp_path):
    pm = quantize_model(tiny_llama(), Recipe(wbits=4, group=32))
    out = write_packed(pm, tmp_path / "m")
    back = read_packed(out)
    assert back.config == pm.config
    for name, t in pm.tensors.items():
        b = back.tensors[name]
        if isinstance(t, PackedLinear):
            np.testing.assert_array_equal(b.planes, t.planes)
            np.testing.assert_array_equal(b.scales, t.scales)
            np.testing.assert_array_equal(b.offsets, t.offsets)
            assert (b.bits, b.group, b.K, b.N) == (t.bits, t.group, t.K, t.N)
        else:
            np.testing.assert_array_equal(b, t)


def test_packed_directory_rejects_corruption(tmp_path):
    pm = quantize_model(tiny_llama(), Recipe(wbits=2, group=32))
    out = write_packed(pm, tmp_path / "m")
    st = out / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-5] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        read_packed(out)
    st.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FormatError):
        read_packed(out, verify=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="version"):
        read_packed(out)
    with pytest.raises(FormatError, match="config.json"):
        read_packed(tmp_path / "nothing")


def test_failed_write_leaves_no_partial_output(tmp_path):
    pm = quantize_model(tiny_llama(), Recipe(wbits=2, group=32))
    pm.tensors["broken"] = object()          # cannot be converted: the write fails midway
    with pytest.raises(Exception):
        write_packed(pm, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_real_q4_1_tensor_imports_exactly(default_gguf):
    from loader.sources import read_source
    src = read_source(default_gguf)
    t = src.tensors["layers.0.wq"]
    assert t.ggml_type == "Q4_1"
    qt = exact_import(t.blocks(), "Q4_1")
    ref = t.load()                           # gguf's own dequantization (float32)
    np.testing.assert_allclose(qt.dequantize(), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    out = src.tensors["output"]
    assert out.ggml_type == "Q8_0"
    q8 = exact_import(out.blocks(), "Q8_0")
    rows = slice(0, 200)
    np.testing.assert_allclose(q8.dequantize()[rows], out.load()[rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("wbits,source,head", [(2, "Q8_0", 4), (3, None, 4), (1, "Q8_0", 4), (4, "Q8_0", 8),
                                               (6, "Q8_0", 8), (8, "Q8_0", 8), (4, None, 4), (5, "Q4_1", 5)])
def test_default_head_bits(wbits, source, head):
    """The documented policy: never below 4 bits; a Q8_0 head stays 8-bit from 4 bits on."""
    from loader.pack import default_head_bits
    assert default_head_bits(wbits, source) == head


def test_low_bit_recipe_packs_head_at_four_bits():
    pm = quantize_model(tiny_llama(), Recipe(wbits=2, group=32))
    assert pm.info["output"]["bits"] == 4 and pm.info["layers.0.wq"]["bits"] == 2


def test_released_pages_of_a_packed_file_read_back_unchanged(tmp_path):
    """FileMap.release drops resident pages only: the tensors read the same afterwards (they fault back
    in from the file)."""
    pm = quantize_model(tiny_llama(), Recipe(wbits=4, group=32))
    back = read_packed(write_packed(pm, tmp_path / "m"))
    before = {n: (t.planes.copy(), t.scales.copy()) for n, t in back.tensors.items() if isinstance(t, PackedLinear)}
    names = list(before)
    n = back.release_pages(names)
    assert n >= sum(p.nbytes + s.nbytes for p, s in before.values())
    for name, (planes, scales) in before.items():
        np.testing.assert_array_equal(back.tensors[name].planes, planes)
        np.testing.assert_array_equal(back.tensors[name].scales, scales)
    assert pm.release_pages(names) == 0                   # an in-memory model has nothing mapped
