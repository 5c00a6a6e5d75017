"""Tiny model files for the reader tests, written into tmp dirs at test time (nothing binary is committed).

- `write_tiny_gguf`: a 2-layer llama GGUF with random weights in chosen ggml types, a byte-level BPE
  vocabulary (3 control tokens, the 256 byte symbols, a few merges) and a ChatML template.
- `write_tiny_hf_llama` / `write_tiny_bert`: Hugging Face directories (config.json, safetensors,
  tokenizer.json), optionally sharded.
- `tensor_info_pos`: where a tensor's type and offset fields sit in a GGUF file, for corruption tests.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

DIM, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = DIM // HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the digit merges are never used under the "smollm" pre-tokenizer (digits are isolated first);
# they make that isolation observable in the tests
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "e ll", "h ell", "1 2", "Ġ 1"]
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_symbols() -> list[str]:
    """The GPT-2 byte-level alphabet: symbol of byte b at index b (printable bytes stand for
    themselves; the others are shifted to code points 256, 257, ... in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = CONTROL + byte_symbols()
    for m in MERGES:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, types, MERGES


def tiny_llama_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights in NumPy (N, K) orientation."""
    rng = np.random.default_rng(seed)
    w = {"token_embd.weight": rng.standard_normal((vocab, DIM)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)}
    if not tied:
        w["output.weight"] = rng.standard_normal((vocab, DIM)).astype(np.float32)
    for i in range(LAYERS):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
        w[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
        for n, shape in (("attn_q", (HEADS * HEAD_DIM, DIM)), ("attn_k", (KV_HEADS * HEAD_DIM, DIM)),
                         ("attn_v", (KV_HEADS * HEAD_DIM, DIM)), ("attn_output", (DIM, HEADS * HEAD_DIM)),
                         ("ffn_gate", (FFN, DIM)), ("ffn_up", (FFN, DIM)), ("ffn_down", (DIM, FFN))):
            w[p + n + ".weight"] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return w


def write_tiny_gguf(path, types: dict[str, str] | None = None, default_type: str = "Q8_0", tied: bool = True,
                    arch: str = "llama", seed: int = 0, extra_meta=None, drop_tensors=(), drop_meta=(),
                    ) -> dict[str, np.ndarray]:
    """Write the tiny llama GGUF; matrices get `types.get(name, default_type)`, norms F32.
    Returns the float32 weights that were quantized (the reference for dequantization).
    `drop_tensors` / `drop_meta` leave things out, to make incomplete files."""
    import gguf
    from gguf import GGMLQuantizationType as T

    tokens, ttypes, merges = tiny_vocab()
    weights = tiny_llama_weights(len(tokens), tied, seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    if "feed_forward_length" not in drop_meta:
        w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for k, v in (extra_meta or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    types = types or {}
    for name, arr in weights.items():
        if name in drop_tensors:
            continue
        t = "F32" if arr.ndim == 1 else types.get(name, default_type)
        q = gguf.quants.quantize(arr, T[t])
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=T[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def tensor_info_pos(path, name: str) -> tuple[int, int]:
    """(position of the u32 type field, position of the u64 offset field) of tensor `name`."""
    data = Path(path).read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.rindex(key) + len(key)      # tensor infos come after the metadata: take the last match
    n_dims = struct.unpack_from("<I", data, pos)[0]
    type_pos = pos + 4 + 8 * n_dims
    return type_pos, type_pos + 4


def _tokenizer_json_bpe() -> str:
    from loader.tokenizer import tokenizer_json_from_gguf
    tokens, types, merges = tiny_vocab()
    return tokenizer_json_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                                     "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                                     "tokenizer.ggml.merges": merges})


def write_safetensors(path, tensors: dict[str, tuple[str, tuple, bytes]], header_override=None):
    """A safetensors file written by hand: {name: (dtype, shape, raw bytes)}. `header_override` replaces
    header entries (to make lying files)."""
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header.update(header_override or {})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def _save(tensors: dict, directory: Path, shards: int, dtype: str):
    names = sorted(tensors)
    if shards == 1:
        files = {"model.safetensors": names}
    else:
        files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in files.items() for n in ns}}))

    def conv(a):
        if dtype == "F16":
            return a.astype("<f2").tobytes()
        if dtype == "BF16":   # top half of each float32 (truncation: the test reference does the same)
            return (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        return a.astype("<f4").tobytes()
    for f, ns in files.items():
        write_safetensors(directory / f, {n: (dtype, tensors[n].shape, conv(tensors[n])) for n in ns})


def hf_llama_weights(vocab: int, tied: bool, seed: int = 1) -> dict[str, np.ndarray]:
    g = tiny_llama_weights(vocab, tied, seed)
    ren = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
           "output_norm.weight": "model.norm.weight"}
    sub = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {}
    for k, v in g.items():
        if k in ren:
            out[ren[k]] = v
        else:
            _blk, i, part, _w = k.split(".")
            out[f"model.layers.{i}.{sub[part]}.weight"] = v
    return out


def write_tiny_hf_llama(directory, tied: bool = True, shards: int = 1, dtype: str = "F32", **cfg_over):
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_json_bpe()
    vocab = len(tiny_vocab()[0])
    weights = hf_llama_weights(vocab, tied)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "intermediate_size": FFN, "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 100000.0, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu"}
    cfg.update(cfg_over)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text(tok)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    _save(weights, d, shards, dtype)
    return weights


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "##s", "cat", ",", "."]


def bert_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
    vocab = {w: i for i, w in enumerate(BERT_WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.enable_padding(length=16)        # like the real MiniLM file; the wrapper must switch it off
    tok.enable_truncation(max_length=16)
    return tok.to_str()


def write_tiny_bert(directory, pooling: str = "mean", normalize: bool = True, prefix: str = "", seed: int = 2):
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    V, P, T, F = len(BERT_WORDS), 32, 2, FFN

    def r(*s):
        return rng.standard_normal(s).astype(np.float32)
    w = {"embeddings.word_embeddings.weight": r(V, DIM), "embeddings.position_embeddings.weight": r(P, DIM),
         "embeddings.token_type_embeddings.weight": r(T, DIM), "embeddings.LayerNorm.weight": r(DIM),
         "embeddings.LayerNorm.bias": r(DIM), "pooler.dense.weight": r(DIM, DIM), "pooler.dense.bias": r(DIM)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for n, (o, k) in (("attention.self.query", (DIM, DIM)), ("attention.self.key", (DIM, DIM)),
                          ("attention.self.value", (DIM, DIM)), ("attention.output.dense", (DIM, DIM)),
                          ("intermediate.dense", (F, DIM)), ("output.dense", (DIM, F))):
            w[p + n + ".weight"], w[p + n + ".bias"] = r(o, k), r(o)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + n + ".weight"], w[p + n + ".bias"] = r(DIM), r(DIM)
    w = {prefix + k: v for k, v in w.items()}
    w["embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]
    cfg = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": DIM, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "intermediate_size": F, "vocab_size": V, "max_position_embeddings": P,
           "type_vocab_size": T, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text(bert_tokenizer_json())
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}))
    mods = [{"idx": 0, "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "type": "sentence_transformers.models.Normalize"})
    (d / "modules.json").write_text(json.dumps(mods))
    from safetensors.numpy import save_file
    save_file(w, str(d / "model.safetensors"))
    return w
