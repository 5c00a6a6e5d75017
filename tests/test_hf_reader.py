"""HF directory reader: llama and BERT naming and configs, F32/F16/BF16 values, shards, the source
dispatcher, and FormatErrors for lying or truncated safetensors files."""
import json
import struct

import numpy as np
import pytest

from loader.errors import FormatError
from loader.hf_reader import check_safetensors, read_hf
from loader.sources import read_source
from tests.data_gen.tiny_models import (DIM, FFN, HEADS, KV_HEADS, LAYERS, tiny_vocab, write_safetensors,
                                        write_tiny_bert, write_tiny_gguf, write_tiny_hf_llama)

LLAMA_MAP = {"model.embed_tokens.weight": "tok_embeddings", "lm_head.weight": "output", "model.norm.weight": "norm",
             "model.layers.1.self_attn.q_proj.weight": "layers.1.wq",
             "model.layers.0.self_attn.k_proj.weight": "layers.0.wk",
             "model.layers.1.self_attn.v_proj.weight": "layers.1.wv",
             "model.layers.0.self_attn.o_proj.weight": "layers.0.wo",
             "model.layers.1.mlp.gate_proj.weight": "layers.1.w_gate", "model.layers.0.mlp.up_proj.weight": "layers.0.w_up",
             "model.layers.1.mlp.down_proj.weight": "layers.1.w_down",
             "model.layers.0.input_layernorm.weight": "layers.0.attn_norm",
             "model.layers.1.post_attention_layernorm.weight": "layers.1.ffn_norm"}


def _to_dtype(a, dtype):
    """Independent reference of the stored values, as float32."""
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "BF16":   # truncation to the top 16 bits, as the writer stores it
        return (a.view(np.uint32) & 0xFFFF0000).view(np.float32)
    return a


@pytest.mark.parametrize("dtype,shards", [("F32", 1), ("F16", 3), ("BF16", 2)])
def test_llama_untied_values(tmp_path, dtype, shards):
    w = write_tiny_hf_llama(tmp_path, tied=False, shards=shards, dtype=dtype)
    src = read_hf(tmp_path)
    c = src.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == ("llama", DIM, LAYERS, HEADS, KV_HEADS, FFN)
    assert c.rope_style == "half" and not c.tied_embeddings and c.rope_theta == 100000.0
    assert c.eos_ids == [2] and c.bos_id is None and "<|im_start|>" in c.chat_template
    assert len(src.tensors) == 3 + 9 * LAYERS
    for hf_name, name in LLAMA_MAP.items():
        got = src[name].load()
        assert got.dtype == np.float32 and got.shape == w[hf_name].shape == src[name].shape
        np.testing.assert_array_equal(got, _to_dtype(w[hf_name], dtype))


def test_llama_tied(tmp_path):
    w = write_tiny_hf_llama(tmp_path, tied=True)
    src = read_hf(tmp_path)
    assert src.config.tied_embeddings and "tok_embeddings" not in src.tensors
    np.testing.assert_array_equal(src["output"].load(), w["model.embed_tokens.weight"])
    assert src.config.vocab_size == len(tiny_vocab()[0])


def test_llama_bos_when_tokenizer_adds_it(tmp_path):
    write_tiny_hf_llama(tmp_path)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                             "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                 "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert read_hf(tmp_path).config.bos_id == 1


def test_llama_config_refusals(tmp_path):
    write_tiny_hf_llama(tmp_path / "a", rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(FormatError, match="rope_scaling"):
        read_hf(tmp_path / "a")
    write_tiny_hf_llama(tmp_path / "b", model_type="gpt_neox")
    with pytest.raises(FormatError, match="config.json: model_type 'gpt_neox'"):
        read_hf(tmp_path / "b")
    write_tiny_hf_llama(tmp_path / "c", num_hidden_layers=3)
    with pytest.raises(FormatError, match="num_hidden_layers 3"):
        read_hf(tmp_path / "c")
    from safetensors.numpy import load_file, save_file
    write_tiny_hf_llama(tmp_path / "g")
    f = tmp_path / "g" / "model.safetensors"
    t = load_file(str(f))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(f))
    with pytest.raises(FormatError, match="missing tensors layers.1.w_up"):
        read_hf(tmp_path / "g")
    write_tiny_hf_llama(tmp_path / "d", num_hidden_layers=10 ** 9)
    with pytest.raises(FormatError, match="num_hidden_layers"):
        read_hf(tmp_path / "d")
    write_tiny_hf_llama(tmp_path / "e", hidden_size=None)
    with pytest.raises(FormatError, match="hidden_size"):
        read_hf(tmp_path / "e")
    write_tiny_hf_llama(tmp_path / "f", intermediate_size=FFN * 2)
    with pytest.raises(FormatError, match="shape"):
        read_hf(tmp_path / "f")


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_bert(tmp_path, prefix):
    w = write_tiny_bert(tmp_path, prefix=prefix)
    src = read_hf(tmp_path)
    c = src.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == ("bert", DIM, LAYERS, HEADS, HEADS, FFN)
    assert (c.pooling, c.normalize, c.max_seq_len, c.type_vocab_size, c.norm_eps) == ("mean", True, 32, 2, 1e-12)
    assert len(src.tensors) == 5 + 16 * LAYERS          # pooler and position_ids are skipped
    pairs = {"embeddings.word_embeddings.weight": "tok_embeddings",
             "embeddings.position_embeddings.weight": "pos_embeddings",
             "embeddings.token_type_embeddings.weight": "type_embeddings",
             "embeddings.LayerNorm.weight": "emb_norm.weight", "embeddings.LayerNorm.bias": "emb_norm.bias",
             "encoder.layer.1.attention.self.query.weight": "layers.1.wq",
             "encoder.layer.1.attention.self.query.bias": "layers.1.bq",
             "encoder.layer.0.attention.self.key.weight": "layers.0.wk",
             "encoder.layer.0.attention.self.value.bias": "layers.0.bv",
             "encoder.layer.1.attention.output.dense.weight": "layers.1.wo",
             "encoder.layer.1.attention.output.dense.bias": "layers.1.bo",
             "encoder.layer.0.attention.output.LayerNorm.weight": "layers.0.attn_norm.weight",
             "encoder.layer.0.attention.output.LayerNorm.bias": "layers.0.attn_norm.bias",
             "encoder.layer.1.intermediate.dense.weight": "layers.1.w_in",
             "encoder.layer.1.intermediate.dense.bias": "layers.1.b_in",
             "encoder.layer.0.output.dense.weight": "layers.0.w_out", "encoder.layer.0.output.dense.bias": "layers.0.b_out",
             "encoder.layer.1.output.LayerNorm.weight": "layers.1.ffn_norm.weight",
             "encoder.layer.1.output.LayerNorm.bias": "layers.1.ffn_norm.bias"}
    for hf_name, name in pairs.items():
        np.testing.assert_array_equal(src[name].load(), w[prefix + hf_name])


def test_bert_pooling_and_normalize(tmp_path):
    write_tiny_bert(tmp_path / "a", pooling="cls", normalize=False)
    c = read_hf(tmp_path / "a").config
    assert c.pooling == "cls" and c.normalize is False
    write_tiny_bert(tmp_path / "b", pooling="max")
    with pytest.raises(FormatError, match="pooling"):
        read_hf(tmp_path / "b")


# ---- malformed safetensors ----------------------------------------------------------------------

def _one(tmp_path, **override):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": ("F32", (2, 3), np.arange(6, dtype="<f4").tobytes()),
                          "b": ("F32", (4,), np.ones(4, "<f4").tobytes())}, header_override=override)
    return p


def test_check_safetensors_good(tmp_path):
    p = _one(tmp_path)
    hdr = check_safetensors(p)
    assert hdr["a"][:2] == ("F32", (2, 3)) and hdr["b"][:2] == ("F32", (4,))
    # offsets are absolute: the bytes there are the tensor
    raw = p.read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4", 6, hdr["a"][2]), np.arange(6))


@pytest.mark.parametrize("override,msg", [
    ({"b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 4000]}}, "outside the file"),
    ({"b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "overlap"),
    ({"b": {"dtype": "F32", "shape": [5], "data_offsets": [24, 40]}}, "needs 20"),
    ({"b": {"dtype": "Q4", "shape": [4], "data_offsets": [24, 40]}}, "unknown dtype"),
    ({"b": {"dtype": "F32", "shape": [4], "data_offsets": [30, 14]}}, "outside"),
    ({"b": {"shape": [4]}}, "malformed header entry"),
    ({"b": {"dtype": "F32", "shape": [-4], "data_offsets": [24, 40]}}, "bad shape"),
])
def test_lying_headers(tmp_path, override, msg):
    with pytest.raises(FormatError, match=msg):
        check_safetensors(_one(tmp_path, **override))


def test_truncated_and_garbage(tmp_path):
    p = _one(tmp_path)
    raw = p.read_bytes()
    for cut in (0, 5, 8, 20, len(raw) - 1):
        p.write_bytes(raw[:cut])
        with pytest.raises(FormatError, match=str(p)):
            check_safetensors(p)
    p.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(FormatError, match="not valid JSON"):
        check_safetensors(p)
    p.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")
    with pytest.raises(FormatError, match="exceeds the file"):
        check_safetensors(p)


def test_truncated_model_file(tmp_path):
    write_tiny_hf_llama(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match="model.safetensors"):
        read_hf(tmp_path)


def test_directory_problems(tmp_path):
    write_tiny_hf_llama(tmp_path / "m", shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match="shard files missing"):
        read_hf(tmp_path / "m")
    write_tiny_hf_llama(tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="missing tokenizer.json"):
        read_hf(tmp_path / "t")
    write_tiny_hf_llama(tmp_path / "n")
    (tmp_path / "n" / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="no \\*.safetensors"):
        read_hf(tmp_path / "n")
    write_tiny_bert(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text("[1, 2")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_hf(tmp_path / "x")


# ---- the dispatcher -----------------------------------------------------------------------------

def test_read_source_dispatch(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    assert read_source(tmp_path / "m.gguf").config.rope_style == "adjacent"
    write_tiny_hf_llama(tmp_path / "hf")
    assert read_source(tmp_path / "hf").config.rope_style == "half"
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text(json.dumps({"format": "anybit-packed", "version": 1}))
    with pytest.raises(FormatError, match="packed anybit directory"):
        read_source(packed)
    with pytest.raises(FormatError, match="packed anybit directory"):
        read_hf(packed)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match="not a GGUF file or a model directory"):
        read_source(tmp_path / "notes.txt")
    with pytest.raises(FormatError, match="not a GGUF file or a model directory"):
        read_source(tmp_path)
    with pytest.raises(FormatError, match="no such file"):
        read_source(tmp_path / "absent")


# ---- the real default embedder ------------------------------------------------------------------

def test_minilm(default_minilm):
    src = read_source(default_minilm)
    c = src.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.ffn_dim, c.vocab_size) == ("bert", 384, 6, 12, 1536, 30522)
    assert (c.pooling, c.normalize, c.max_seq_len, c.type_vocab_size) == ("mean", True, 512, 2)
    assert len(src.tensors) == 5 + 16 * 6
    # one tensor read independently: straight from the bytes at the header's offsets
    f = default_minilm / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    info = json.loads(raw[8:8 + n])["encoder.layer.3.intermediate.dense.weight"]
    assert info["dtype"] == "F32"
    b, e = info["data_offsets"]
    ref = np.frombuffer(raw[8 + n + b:8 + n + e], "<f4").reshape(info["shape"])
    np.testing.assert_array_equal(src["layers.3.w_in"].load(), ref)
