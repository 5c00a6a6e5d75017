"""Hugging Face model directory (config.json + *.safetensors + tokenizer.json) -> `SourceModel`.

Decoders of loader/hf_config.py (HF rotate-half RoPE, so rope_style "half") and BERT encoders. Every safetensors
header is checked here first (length, dtypes, offsets inside the file, no overlaps), so a truncated or
lying file gives a `FormatError` naming it rather than an error from the Rust reader. BF16 has no NumPy
dtype: those tensors are read as uint16 and shifted into the top half of a float32.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from loader.errors import FormatError
from loader.hf_config import DECODER_TYPES, check_model_type, hf_decoder_config, hf_internal_names, norm_shift
from loader.source import ModelConfig, SourceModel, SourceTensor, expected_shapes, finite
from loader.validate import (check_hf_config, check_object, check_sentence_config, check_tokenizer_config,
                             load_json, read_safetensors_header, shard_files, Rule)

BERT_TYPES = ("bert",)
_FLOAT = ("F64", "F32", "F16", "BF16")


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against the file size; returns {name: (dtype, shape, begin)}."""
    return read_safetensors_header(path)[0]


def _loader(path: Path, name: str, dtype: str, shape: tuple, offset: int):
    def load() -> np.ndarray:
        if dtype == "BF16":
            # bf16 is the top 16 bits of a float32
            raw = np.fromfile(path, dtype="<u2", count=int(np.prod(shape)), offset=offset)
            return finite((raw.astype(np.uint32) << 16).view(np.float32).reshape(shape), f"{path}: tensor {name!r}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                arr = f.get_tensor(name)
        except Exception as e:
            raise FormatError(f"{path}: cannot read tensor {name!r}: {e}") from None
        return finite(np.ascontiguousarray(arr, dtype=np.float32), f"{path}: tensor {name!r}")
    return load


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = shard_files(load_json(index), index, d)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{d}: no *.safetensors file")
    return files


def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise FormatError(f"{path.parent}: missing {path.name}")
        return None
    v = load_json(path)
    if not isinstance(v, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(v).__name__}")
    return v


def _get(cfg: dict, key: str, path: Path, default=None):
    v = cfg.get(key, default)
    if v is None:
        raise FormatError(f"{path}: config.json lacks {key!r}")
    return v


_BERT_LAYER = {"attention.self.query": ("wq", "bq"), "attention.self.key": ("wk", "bk"),
               "attention.self.value": ("wv", "bv"), "attention.output.dense": ("wo", "bo"),
               "attention.output.LayerNorm": ("attn_norm.weight", "attn_norm.bias"),
               "intermediate.dense": ("w_in", "b_in"), "output.dense": ("w_out", "b_out"),
               "output.LayerNorm": ("ffn_norm.weight", "ffn_norm.bias")}
_BERT_EMB = {"word_embeddings.weight": "tok_embeddings", "position_embeddings.weight": "pos_embeddings",
             "token_type_embeddings.weight": "type_embeddings", "LayerNorm.weight": "emb_norm.weight",
             "LayerNorm.bias": "emb_norm.bias", "LayerNorm.gamma": "emb_norm.weight",
             "LayerNorm.beta": "emb_norm.bias"}
_SKIP = re.compile(r"(.*rotary_emb\.inv_freq|.*position_ids|(bert\.)?pooler\..*|cls\..*)$")


def _part(load, rows: slice | None, shift: float):
    """A loader of rows `rows` of a tensor (a part of a fused one), plus `shift` (Gemma's 1 + w norms)."""
    if rows is None and not shift:
        return load

    def part():
        w = load()
        w = w[rows] if rows is not None else w
        return np.ascontiguousarray(w + np.float32(shift) if shift else w, dtype=np.float32)
    return part


def _bert_name(name: str) -> str | None:
    name = name[5:] if name.startswith("bert.") else name
    if name.startswith("embeddings.") and name[11:] in _BERT_EMB:
        return _BERT_EMB[name[11:]]
    m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$", name)
    if m and m.group(2) in _BERT_LAYER:
        w, b = _BERT_LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{w if m.group(3) in ('weight', 'gamma') else b}"
    return ""


def _special_tokens(cfg: dict, tok) -> dict:
    eos = cfg.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])]
    for end in ("<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot_id|>"):
        i = tok.token_to_id(end)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    bos = cfg.get("bos_token_id")
    # record BOS only if the tokenizer's post-processor adds it (i.e. the model wants it)
    wants_bos = isinstance(bos, int) and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return dict(bos_id=bos if wants_bos else None, eos_ids=eos_ids)


def _bert_config(cfg: dict, p: Path, d: Path) -> ModelConfig:
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise FormatError(f"{p}: hidden_act {cfg['hidden_act']!r} is not supported (BERT uses gelu)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise FormatError(f"{p}: position_embedding_type {cfg['position_embedding_type']!r} is not supported")
    pooling = "mean"
    pool = _read_json(d / "1_Pooling" / "config.json", required=False)
    if pool is not None:
        if pool.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not pool.get("pooling_mode_mean_tokens"):
            raise FormatError(f"{d / '1_Pooling' / 'config.json'}: only CLS or mean pooling is supported")
    modules = d / "modules.json"
    normalize = False
    if modules.is_file():
        mods = load_json(modules)
        if not isinstance(mods, list):
            raise FormatError(f"{modules}: must be a JSON list of modules, got {type(mods).__name__}")
        for i, m in enumerate(mods):
            check_object(m, {"type": Rule("str", null=True)}, f"{modules}: [{i}]")
        normalize = any(str(m.get("type") or "").endswith("Normalize") for m in mods)
    n_heads = _get(cfg, "num_attention_heads", p)
    # sentence-transformers cuts inputs at max_seq_length (256 for all-MiniLM-L6-v2), not at the
    # position table's size: embeddings of long texts match the reference only with the same cut
    st_path = d / "sentence_bert_config.json"
    st_cfg = check_sentence_config(_read_json(st_path, required=False) or {}, st_path)
    truncate_len = int(st_cfg.get("max_seq_length") or 0)
    return ModelConfig(
        arch="bert", truncate_len=truncate_len, dim=_get(cfg, "hidden_size", p), n_layers=_get(cfg, "num_hidden_layers", p),
        n_heads=n_heads, n_kv_heads=n_heads, ffn_dim=_get(cfg, "intermediate_size", p),
        vocab_size=_get(cfg, "vocab_size", p), max_seq_len=_get(cfg, "max_position_embeddings", p),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), type_vocab_size=int(cfg.get("type_vocab_size", 2)),
        pooling=pooling, normalize=normalize)


def read_hf(directory) -> SourceModel:
    """Read and validate a Hugging Face model directory; tensors stay lazy."""
    from tokenizers import Tokenizer as _HFTokenizer

    d = Path(directory)
    if not d.is_dir():
        raise FormatError(f"{d}: not a directory")
    p = d / "config.json"
    cfg = _read_json(p)
    if cfg.get("format") == "anybit-packed":
        raise FormatError(f"{d}: is a packed anybit directory; read it with loader.packed")
    mtype = check_model_type(cfg, p)
    if mtype not in DECODER_TYPES + BERT_TYPES:
        raise FormatError(f"{p}: model_type {mtype!r} is not supported "
                          f"(supported: {', '.join(DECODER_TYPES + BERT_TYPES)})")
    check_hf_config(cfg, p, "bert" if mtype in BERT_TYPES else "llama")
    tok_path = d / "tokenizer.json"
    if not tok_path.is_file():
        raise FormatError(f"{d}: missing tokenizer.json")
    try:
        tok_json = tok_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{tok_path}: not valid UTF-8 (byte {e.start})") from None
    try:
        tok = _HFTokenizer.from_str(tok_json)
    except MemoryError:
        raise
    except Exception as e:
        raise FormatError(f"{tok_path}: invalid tokenizer: {e}") from None

    entries = {}
    for f in _safetensors_files(d):
        for name, (dtype, shape, off) in check_safetensors(f).items():
            if name in entries:
                raise FormatError(f"{f}: tensor {name!r} also appears in {entries[name][0]}")
            entries[name] = (f, dtype, shape, off)
    try:
        if mtype in BERT_TYPES:
            config = _bert_config(cfg, p, d)
        else:
            config = hf_decoder_config(cfg, p, set(entries), _special_tokens(cfg, tok))
            tc_path = d / "tokenizer_config.json"
            tc = check_tokenizer_config(_read_json(tc_path, required=False) or {}, tc_path)
            if isinstance(tc.get("chat_template"), str):
                config.chat_template = tc["chat_template"]
    except FormatError as e:
        raise FormatError(str(e) if str(e).startswith(str(p)) else f"{p}: {e}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{p}: bad value in config ({e})") from None

    # before building per-layer tables from a lying count (phi3 fuses q|k|v and gate|up: 6 per layer)
    if config.n_layers * (6 if config.arch == "phi3" else 9) > len(entries):
        raise FormatError(f"{p}: num_hidden_layers {config.n_layers} but only {len(entries)} tensors")
    expected = expected_shapes(config)
    tensors: dict[str, SourceTensor] = {}
    for name, (f, dtype, shape, off) in entries.items():
        if config.arch == "bert":
            internal = _bert_name(name)
            parts = [] if internal == "" else [(internal, None)]
        else:
            parts = hf_internal_names(name, config)
        if parts is None or (parts == [] and _SKIP.match(name)):
            continue
        if not parts:
            raise FormatError(f"{f}: unexpected tensor {name!r} for a {mtype} model with {config.n_layers} layers")
        if dtype not in _FLOAT:
            raise FormatError(f"{f}: tensor {name!r} has dtype {dtype}; expected a float type")
        for internal, rows in parts:
            if internal not in expected:
                raise FormatError(f"{f}: unexpected tensor {name!r} for a {mtype} model with {config.n_layers} "
                                  f"layers and this configuration")
            if internal in tensors:
                raise FormatError(f"{f}: two tensors map to {internal!r} (one is {name!r})")
            part = shape if rows is None else (len(range(*rows.indices(shape[0]))),) + tuple(shape[1:])
            if (rows is not None and rows.stop > shape[0]) or part != expected[internal]:
                raise FormatError(f"{f}: tensor {name!r} has shape {list(shape)}, expected "
                                  f"{list(expected[internal]) if rows is None else 'rows for ' + internal}")
            shift = 0.0 if config.arch == "bert" else norm_shift(config, internal)
            tensors[internal] = SourceTensor(name=internal, shape=part,
                                             load=_part(_loader(f, name, dtype, shape, off), rows, shift))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FormatError(f"{d}: missing tensors {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return SourceModel(config=config, tensors=tensors, tokenizer_json=tok_json, source=str(d))
