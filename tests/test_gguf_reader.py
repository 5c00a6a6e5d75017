"""GGUF reader: config and names, dequantization and raw blocks against independent references,
agreement with the gguf package's own parser, and clear FormatErrors on malformed files."""
import random
import struct

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as T

from loader.errors import FormatError
from loader.gguf_reader import GGUFFile, read_gguf
from tests.data_gen.tiny_models import (DIM, FFN, HEADS, HEAD_DIM, KV_HEADS, LAYERS, tensor_info_pos,
                                        tiny_vocab, write_tiny_gguf)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Untied tiny llama with every exact-import type plus F32/F16/BF16 matrices."""
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    types = {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "F16",
             "blk.0.attn_output.weight": "BF16", "blk.1.ffn_up.weight": "F32", "blk.1.ffn_down.weight": "Q4_1",
             "blk.1.attn_q.weight": "Q4_0"}
    weights = write_tiny_gguf(path, types=types, default_type="Q8_0", tied=False)
    return path, weights, types


def _expected_names(tied):
    names = {"output", "norm"} | ({"tok_embeddings"} if not tied else set())
    for i in range(LAYERS):
        names |= {f"layers.{i}.{n}" for n in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up",
                                               "w_down")}
    return names


def test_config_and_names(mixed):
    path, _w, types = mixed
    src = read_gguf(path)
    c = src.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == ("llama", DIM, LAYERS, HEADS, KV_HEADS, FFN)
    assert (c.head_dim, c.vocab_size, c.max_seq_len) == (HEAD_DIM, len(tiny_vocab()[0]), 256)
    assert c.rope_style == "adjacent" and not c.tied_embeddings
    assert c.rope_theta == 100000.0 and abs(c.norm_eps - 1e-5) < 1e-10
    assert c.bos_id is None                    # add_bos_token is False in the file
    assert c.eos_ids == [0, 2]                  # eos_token_id, then <|im_end|>
    assert "<|im_start|>" in c.chat_template
    assert set(src.tensors) == _expected_names(tied=False)
    assert src["layers.0.wq"].ggml_type == "Q4_0" and src["layers.0.wv"].ggml_type == "F16"
    assert src["norm"].ggml_type == "F32" and src["norm"].blocks is None
    assert src["layers.1.wk"].shape == (KV_HEADS * HEAD_DIM, DIM)
    assert src["layers.1.w_down"].shape == (DIM, FFN)


def test_tied_embedding_is_output_only(tmp_path):
    path = tmp_path / "tied.gguf"
    w = write_tiny_gguf(path, default_type="F32", tied=True)
    src = read_gguf(path)
    assert src.config.tied_embeddings
    assert set(src.tensors) == _expected_names(tied=True) and "tok_embeddings" not in src.tensors
    np.testing.assert_array_equal(src["output"].load(), w["token_embd.weight"])


@pytest.mark.parametrize("gname,iname", [("blk.0.attn_q.weight", "layers.0.wq"), ("blk.0.attn_k.weight", "layers.0.wk"),
                                         ("blk.0.attn_v.weight", "layers.0.wv"), ("blk.0.attn_output.weight", "layers.0.wo"),
                                         ("blk.1.ffn_up.weight", "layers.1.w_up"), ("blk.1.ffn_down.weight", "layers.1.w_down"),
                                         ("blk.0.ffn_gate.weight", "layers.0.w_gate"), ("output.weight", "output"),
                                         ("token_embd.weight", "tok_embeddings"), ("blk.1.attn_norm.weight", "layers.1.attn_norm")])
def test_load_close_to_original(mixed, gname, iname):
    """Dequantized values are the written float weights within each format's rounding error."""
    path, weights, types = mixed
    src = read_gguf(path)
    ref = weights[gname].astype(np.float64)
    got = src[iname].load()
    assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
    t = "F32" if ref.ndim == 1 else types.get(gname, "Q8_0")
    # half a quantization step of the block: max|w| / 127 (Q8_0), / 7 (Q4_0 odd side), range / 15 (Q4_1)
    blk = np.abs(ref.reshape(ref.shape[0] if ref.ndim == 2 else 1, -1, 32)).max(axis=2, keepdims=True)
    rel = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.5 / 127 + 1e-3, "Q4_0": 1 / 8 + 1e-3,
           "Q4_1": 1 / 15 + 1e-3}[t]
    err = np.abs(got.astype(np.float64) - ref).reshape(blk.shape[0], -1, 32)
    assert np.all(err <= rel * blk + 1e-7), (t, float((err / (blk + 1e-12)).max()))


@pytest.mark.parametrize("iname,kind", [("layers.0.wq", "Q4_0"), ("layers.0.wk", "Q4_1"), ("layers.1.w_down", "Q4_1"),
                                        ("output", "Q8_0"), ("tok_embeddings", "Q8_0")])
def test_blocks_match_gguf_dequantize(mixed, iname, kind):
    """blocks() parses the bytes here (nibble order: low nibbles are elements 0..15); rebuilding
    the weights from its fields must equal the gguf package's own dequantization exactly."""
    src = read_gguf(mixed[0])
    t = src[iname]
    assert t.ggml_type == kind
    w = t.load()
    n, k = w.shape
    fields = t.blocks()
    for f in fields[:-1]:
        assert f.dtype == np.float32 and f.shape == (n, k // 32)
    q = fields[-1]
    assert q.shape == (n, k)
    if kind == "Q8_0":
        d, q = fields
        assert q.dtype == np.int8
        rec = np.repeat(d, 32, axis=1) * q.astype(np.float32)
    elif kind == "Q4_0":
        d, q = fields
        assert q.min() >= 0 and q.max() <= 15
        rec = np.repeat(d, 32, axis=1) * (q.astype(np.float32) - 8)
    else:
        d, m, q = fields
        assert q.min() >= 0 and q.max() <= 15
        rec = np.repeat(d, 32, axis=1) * q.astype(np.float32) + np.repeat(m, 32, axis=1)
    np.testing.assert_array_equal(rec, w)


def test_nibble_order_by_hand(tmp_path):
    """A hand-built Q4_0 row: block with d = 1 and q[j] = j (bytes qs[j] = j | (j + 16 - 16) << 4)."""
    qs = np.array([(j & 0xF) | (((j + 16) & 0xF) << 4) for j in range(16)], np.uint8)  # low: j, high: j
    block = np.frombuffer(np.float16(1.0).tobytes(), np.uint8).tolist() + qs.tolist()
    row = np.array([block], np.uint8)                                # 1 row, K = 32
    path = tmp_path / "nib.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("x", row, raw_shape=row.shape, raw_dtype=T.Q4_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    g = GGUFFile(path)
    d, q = g.blocks("x")
    expect = np.concatenate([np.arange(16), np.arange(16)])           # high nibble of byte j = element j + 16
    np.testing.assert_array_equal(q[0], expect)
    np.testing.assert_array_equal(g.load("x")[0], expect - 8.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # random bytes make NaN scales
@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_other_types_dequantize(tmp_path, kind):
    """Types without an exact path still load, through gguf.quants.dequantize, from the right bytes
    and into the right shape. (gguf cannot quantize most of them, so the blocks are random bytes.)"""
    block, tsize = gguf.GGML_QUANT_SIZES[T[kind]]
    rows, k = 3, 512
    raw = np.random.default_rng(3).integers(0, 256, (rows, k // block * tsize), dtype=np.uint8)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("pad", np.zeros(8, np.float32))               # so that "x" does not start the data section
    w.add_tensor("x", raw, raw_shape=raw.shape, raw_dtype=T[kind])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    g = GGUFFile(path)
    got = g.load("x")
    assert got.shape == (rows, k) and got.dtype == np.float32
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, T[kind]))
    codes, sub = g.blocks("x")             # the two-level exact import (tests/test_kquant.py checks values)
    assert codes.shape == (rows, k) and sub.d.shape == (rows, k // sub.S)


def _compare_with_gguf_reader(path):
    r = gguf.GGUFReader(str(path))
    g = GGUFFile(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(g.meta)
    for k, f in fields.items():
        ref = f.contents()
        if isinstance(ref, float):
            assert g.meta[k] == pytest.approx(ref, rel=1e-7), k
        else:
            assert g.meta[k] == ref, k
    assert {t.name for t in r.tensors} == set(g.tensors)
    for t in r.tensors:
        shape, raw_type, start, nbytes = g.tensors[t.name]
        assert shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        assert (raw_type, start, nbytes) == (int(t.tensor_type), t.data_offset, t.n_bytes), t.name


def test_parser_agrees_with_gguf_reader(mixed):
    _compare_with_gguf_reader(mixed[0])


# ---- malformed files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_tiny_gguf(path, default_type="Q8_0", tied=True)
    return path, path.read_bytes()


def _write(tmp_path, data, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def test_bad_magic(tmp_path, good_bytes):
    data = bytearray(good_bytes[1])
    data[:4] = b"GGML"
    with pytest.raises(FormatError, match="not a GGUF file"):
        read_gguf(_write(tmp_path, data))


def test_bad_version_and_tiny_files(tmp_path, good_bytes):
    data = bytearray(good_bytes[1])
    data[4:8] = struct.pack("<I", 7)
    with pytest.raises(FormatError, match="version 7"):
        read_gguf(_write(tmp_path, data))
    with pytest.raises(FormatError, match="not a GGUF"):
        read_gguf(_write(tmp_path, b""))
    with pytest.raises(FormatError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FormatError):
        read_gguf(tmp_path)                                    # a directory


def test_truncated_everywhere(tmp_path, good_bytes):
    """Cut in the header (every 97 bytes), at the header's end, and inside the tensor data."""
    path, data = good_bytes
    g = GGUFFile(path)
    cuts = list(range(0, g.data_start, 97)) + [g.data_start - 1, g.data_start + 10, len(data) // 2, len(data) - 1]
    for cut in cuts:
        p = _write(tmp_path, data[:cut], f"cut{cut}.gguf")
        with pytest.raises(FormatError) as e:
            read_gguf(p)
        assert str(p) in str(e.value)
    with pytest.raises(FormatError, match="truncated|outside"):
        read_gguf(_write(tmp_path, data[:len(data) - 1]))


def test_tensor_offset_outside_file(tmp_path, good_bytes):
    path, data = good_bytes
    _tp, op = tensor_info_pos(path, "blk.1.ffn_down.weight")
    bad = bytearray(data)
    bad[op:op + 8] = struct.pack("<Q", len(data) * 4)
    with pytest.raises(FormatError, match="blk.1.ffn_down.weight.*outside the file"):
        read_gguf(_write(tmp_path, bad))
    bad[op:op + 8] = struct.pack("<Q", 2 ** 63)
    with pytest.raises(FormatError, match="outside"):
        read_gguf(_write(tmp_path, bad))


def test_overlapping_tensors(tmp_path, good_bytes):
    path, data = good_bytes
    _tp, op_a = tensor_info_pos(path, "blk.0.ffn_up.weight")
    _tp, op_b = tensor_info_pos(path, "blk.0.ffn_gate.weight")
    bad = bytearray(data)
    bad[op_a:op_a + 8] = data[op_b:op_b + 8]
    with pytest.raises(FormatError, match="overlap"):
        read_gguf(_write(tmp_path, bad))


def test_unsupported_and_unknown_types(tmp_path, good_bytes):
    path, data = good_bytes
    tp, _op = tensor_info_pos(path, "output_norm.weight")
    bad = bytearray(data)
    bad[tp:tp + 4] = struct.pack("<I", int(T.I32))           # same byte size as F32, but not a weight type
    with pytest.raises(FormatError, match="output_norm.weight.*I32"):
        read_gguf(_write(tmp_path, bad))
    bad[tp:tp + 4] = struct.pack("<I", 99)
    with pytest.raises(FormatError, match="unknown type id 99"):
        read_gguf(_write(tmp_path, bad))


def test_unknown_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    write_tiny_gguf(p, arch="gpt2")
    with pytest.raises(FormatError, match="'gpt2'"):
        read_gguf(p)


def test_missing_tensor_and_metadata(tmp_path):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p, drop_tensors=("blk.1.attn_v.weight",))
    with pytest.raises(FormatError, match="missing tensors layers.1.wv"):
        read_gguf(p)
    p2 = tmp_path / "m2.gguf"
    write_tiny_gguf(p2, drop_meta=("feed_forward_length",))
    with pytest.raises(FormatError, match="llama.feed_forward_length"):
        read_gguf(p2)


def test_unsupported_rope_scaling(tmp_path):
    p = tmp_path / "yarn.gguf"
    write_tiny_gguf(p, extra_meta={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(FormatError, match="RoPE scaling 'yarn'"):
        read_gguf(p)


def test_random_corruption_gives_format_error_only(tmp_path, good_bytes):
    """Byte-level fuzzing of the header: any outcome but an exception other than FormatError."""
    path, data = good_bytes
    header_end = GGUFFile(path).data_start
    rng = random.Random(1234)
    for i in range(150):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(header_end)
            bad[pos] = rng.randrange(256)
        p = _write(tmp_path, bad, "fuzz.gguf")
        try:
            src = read_gguf(p)
            src["output"].load()
        except FormatError:
            pass


# ---- the real default model (fetched once by the session fixture) ------------------------------

def test_default_model(default_gguf):
    src = read_gguf(default_gguf)
    c = src.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tied_embeddings and c.rope_style == "adjacent" and c.head_dim == 64
    assert c.eos_ids == [2] and c.bos_id is None
    kinds = [t.ggml_type for t in src.tensors.values()]
    assert kinds.count("Q4_1") == 210 and src["output"].ggml_type == "Q8_0"
    assert "tok_embeddings" not in src.tensors
    t = src["layers.7.w_down"]
    d, m, q = t.blocks()
    rec = np.repeat(d, 32, axis=1) * q + np.repeat(m, 32, axis=1)
    np.testing.assert_array_equal(rec, t.load())
    _compare_with_gguf_reader(default_gguf)
