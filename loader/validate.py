"""One validation layer for every file anybit reads: checked before any work, errors name file and field.

Each reader parses its JSON here (`load_json`: invalid UTF-8, invalid JSON and absurd nesting are one
`FormatError`), then checks the parsed value against a small schema: a dict of field -> rule, where a
rule says the type, the range and whether the field is required. Numbers must be finite (JSON as
Python reads it accepts NaN and Infinity) and hyperparameters that divide or take logarithms must be
positive, so a file that would run and print garbage is refused when it is read. The rules are plain
data, so the same rule serves a packed config, an HF config and a GGUF-derived model config.

No dependency beyond the standard library: the schemas are a few dozen fields, a schema library would
cost more than it checks.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from loader.errors import FormatError, UsageError

MAX_DIM = 1 << 20           # widths (dim, ffn, vocab, context) beyond this are lies, not models
MAX_JSON = 64 << 20         # a config or header larger than this is not one


@dataclass(frozen=True)
class Rule:
    """One field: kind "int" | "num" | "bool" | "str" | "dict" | "list" | "any"; lo/hi inclusive bounds
    (lo_open: lo exclusive); choices: allowed values; null: None is accepted."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    required: bool = False
    null: bool = False
    lo_open: bool = False
    choices: tuple | None = None


def _name(v) -> str:
    return "null" if v is None else type(v).__name__


def check_value(v, rule: Rule, where: str):
    """Check one value against a rule; returns it. `where` is "file: field" for the message."""
    if v is None:
        if rule.null:
            return v
        raise FormatError(f"{where} is null; expected {'an object' if rule.kind == 'dict' else rule.kind}")
    kind = rule.kind
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise FormatError(f"{where} must be an integer, got {_name(v)} {v!r:.60}")
    elif kind == "num":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FormatError(f"{where} must be a number, got {_name(v)} {v!r:.60}")
        if not math.isfinite(v):
            raise FormatError(f"{where} must be finite, got {v!r}")
    elif kind == "bool":
        if not isinstance(v, bool):
            raise FormatError(f"{where} must be true or false, got {_name(v)} {v!r:.60}")
    elif kind in ("str", "dict", "list"):
        want = {"str": str, "dict": dict, "list": list}[kind]
        if not isinstance(v, want):
            label = {"str": "a string", "dict": "an object", "list": "a list"}[kind]
            raise FormatError(f"{where} must be {label}, got {_name(v)}")
    if rule.choices is not None and v not in rule.choices:
        raise FormatError(f"{where} must be one of {', '.join(map(repr, rule.choices))}, got {v!r:.60}")
    if kind in ("int", "num"):
        if rule.lo is not None and (v <= rule.lo if rule.lo_open else v < rule.lo):
            raise FormatError(f"{where} must be {'>' if rule.lo_open else '>='} {rule.lo}, got {v!r}")
        if rule.hi is not None and v > rule.hi:
            raise FormatError(f"{where} must be <= {rule.hi}, got {v!r}")
    return v


def check_object(obj, schema: dict[str, Rule], where: str) -> dict:
    """Check a JSON object against {field: Rule}; unknown fields are allowed (formats grow)."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where} must be a JSON object, got {_name(obj)}")
    for key, rule in schema.items():
        if key not in obj:
            if rule.required:
                raise FormatError(f"{where}: required field {key!r} is missing")
            continue
        check_value(obj[key], rule, f"{where}: {key}")
    return obj


def check_int_list(v, where: str, lo: int = 0, hi: int | None = None) -> list[int]:
    if not isinstance(v, list):
        raise FormatError(f"{where} must be a list of integers, got {_name(v)}")
    for i, x in enumerate(v):
        check_value(x, Rule("int", lo, hi, required=True), f"{where}[{i}]")
    return v


def load_json(source: str | os.PathLike | bytes, what: str | None = None):
    """Parse JSON from a file path or bytes; every way it can fail is a FormatError naming `what`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw, what = bytes(source), what or "JSON"
    else:
        path = Path(source)
        what = what or str(path)
        try:
            if path.stat().st_size > MAX_JSON:
                raise FormatError(f"{what}: {path.stat().st_size} bytes is too large for a JSON config")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FormatError(f"{what}: missing") from None
        except IsADirectoryError:
            raise FormatError(f"{what}: is a directory, not a JSON file") from None
        except OSError as e:
            raise FormatError(f"{what}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(f"{what}: not valid UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise FormatError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:
        raise FormatError(f"{what}: not valid JSON ({e})") from None


# ---- the model config (internal names; loader/source.py ModelConfig) ------------------------------

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "bert")     # loader/source.py's
MODEL_SCHEMA = {
    "arch": Rule("str", required=True, choices=ARCHITECTURES),
    "dim": Rule("int", 1, MAX_DIM, required=True),
    "n_layers": Rule("int", 1, 4096, required=True),
    "n_heads": Rule("int", 1, 4096, required=True),
    "n_kv_heads": Rule("int", 1, 4096, required=True),
    "ffn_dim": Rule("int", 1, MAX_DIM, required=True),
    "vocab_size": Rule("int", 1, 1 << 24, required=True),
    "max_seq_len": Rule("int", 1, 1 << 24, required=True),
    # epsilon under a square root: 0 or negative divides by zero or takes the root of a negative
    "norm_eps": Rule("num", 0, 1, required=True, lo_open=True),
    "rope_theta": Rule("num", 0, 1e12, lo_open=True),
    "rope_style": Rule("str", choices=("adjacent", "half")),
    "tied_embeddings": Rule("bool"),
    "head_dim": Rule("int", 0, 4096),
    "type_vocab_size": Rule("int", 0, 1 << 16),
    "pooling": Rule("str", choices=("mean", "cls")),
    "normalize": Rule("bool"),
    "truncate_len": Rule("int", 0, 1 << 24),
    "bos_id": Rule("int", 0, null=True),
    "eos_ids": Rule("list"),
    "chat_template": Rule("str", null=True),
    # decoder options (loader/source.py ModelConfig); relations are checked there
    "qkv_bias": Rule("bool"), "o_bias": Rule("bool"), "qk_norm": Rule("bool"), "post_norms": Rule("bool"),
    "ffn_act": Rule("str", choices=("silu", "gelu_tanh")),
    "embed_scale": Rule("num", 0, 1e6, lo_open=True),
    "attn_scale": Rule("num", 0, 1e6),
    "logit_softcap": Rule("num", 0, 1e9),
    "rope_dim": Rule("int", 0, 4096),
    "rope_scaling": Rule("str", choices=("none", "linear", "llama3")),
    "rope_scale": Rule("num", 0, 1e6, lo_open=True),
    "rope_freq_factors": Rule("list", null=True),
    "rope_local_theta": Rule("num", 0, 1e12),
    "sliding_window": Rule("int", 0, 1 << 24),
    "swa_layers": Rule("list"),
}


def check_model_config(d: dict, where: str = "model config") -> dict:
    """Types, ranges and the relations between fields of a model config dict (internal names)."""
    check_object(d, MODEL_SCHEMA, where)
    vocab = d["vocab_size"]
    if d.get("bos_id") is not None and d["bos_id"] >= vocab:
        raise FormatError(f"{where}: bos_id {d['bos_id']} is outside the vocabulary ({vocab} tokens)")
    if d.get("eos_ids") is not None:
        check_int_list(d["eos_ids"], f"{where}: eos_ids", 0, vocab - 1)
    hd = d.get("head_dim") or 0
    if hd == 0 and d["dim"] % d["n_heads"]:
        raise FormatError(f"{where}: dim {d['dim']} is not divisible by n_heads {d['n_heads']}")
    hd = hd or d["dim"] // d["n_heads"]
    if d["n_heads"] % d["n_kv_heads"]:
        raise FormatError(f"{where}: n_heads {d['n_heads']} is not a multiple of n_kv_heads {d['n_kv_heads']}")
    if d["arch"] != "bert" and (hd % 2 or hd > 1024):
        # RoPE rotates pairs, and the kernels' RoPE table holds at most 1024 lanes per head
        raise FormatError(f"{where}: head size {hd} must be even and at most 1024 for RoPE")
    if d["arch"] == "bert" and not d.get("type_vocab_size"):
        raise FormatError(f"{where}: type_vocab_size must be at least 1 for a BERT model")
    return d


# ---- Hugging Face config.json, tokenizer_config.json, sentence-transformers files -------------------

_HF_COMMON = {
    "model_type": Rule("str", required=True),
    "hidden_size": Rule("int", 1, MAX_DIM, required=True),
    "num_hidden_layers": Rule("int", 1, 4096, required=True),
    "num_attention_heads": Rule("int", 1, 4096, required=True),
    "intermediate_size": Rule("int", 1, MAX_DIM, required=True),
    "vocab_size": Rule("int", 1, 1 << 24, required=True),
    "max_position_embeddings": Rule("int", 1, 1 << 24, required=True),
    "hidden_act": Rule("str", null=True),
}
HF_LLAMA_SCHEMA = {**_HF_COMMON,
                   "num_key_value_heads": Rule("int", 1, 4096, null=True),
                   "rms_norm_eps": Rule("num", 0, 1, lo_open=True, null=True),
                   "rope_theta": Rule("num", 0, 1e12, lo_open=True, null=True),
                   "tie_word_embeddings": Rule("bool", null=True),
                   "head_dim": Rule("int", 1, 4096, null=True),
                   "bos_token_id": Rule("int", 0, null=True),
                   "attention_bias": Rule("bool", null=True),
                   "mlp_bias": Rule("bool", null=True)}
HF_BERT_SCHEMA = {**_HF_COMMON,
                  "layer_norm_eps": Rule("num", 0, 1, lo_open=True, null=True),
                  "type_vocab_size": Rule("int", 1, 1 << 16, null=True),
                  "position_embedding_type": Rule("str", null=True)}


def check_hf_config(cfg, path, arch: str) -> dict:
    """An HF config.json for a llama- or BERT-family model (only the fields anybit reads)."""
    check_object(cfg, HF_BERT_SCHEMA if arch == "bert" else HF_LLAMA_SCHEMA, str(path))
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        check_int_list(eos, f"{path}: eos_token_id")
    elif eos is not None:
        check_value(eos, Rule("int", 0), f"{path}: eos_token_id")
    return cfg


def check_tokenizer_config(tc, path) -> dict:
    # chat_template is a string, or (newer files) a list of named templates, which anybit ignores
    return check_object(tc, {"chat_template": Rule("any", null=True),
                             "add_bos_token": Rule("bool", null=True)}, str(path))


def check_sentence_config(st, path) -> dict:
    return check_object(st, {"max_seq_length": Rule("int", 0, 1 << 24, null=True)}, str(path))


def shard_files(index, path: Path, directory: Path) -> list[Path]:
    """The files a model.safetensors.index.json names, each required to lie inside the model directory
    (an index naming ../../elsewhere would make anybit read files the user never gave it)."""
    check_object(index, {"weight_map": Rule("dict", required=True)}, str(path))
    root = directory.resolve()
    files = set()
    for name, f in index["weight_map"].items():
        check_value(f, Rule("str", required=True), f"{path}: weight_map[{name!r}]")
        if not f or "\0" in f:
            raise FormatError(f"{path}: weight_map[{name!r}] = {f!r} is not a file name")
        p = Path(f)
        target = (directory / p).resolve()
        if p.is_absolute() or ".." in p.parts or not target.is_relative_to(root):
            raise FormatError(f"{path}: weight_map[{name!r}] = {f!r} lies outside the model directory")
        files.add(directory / p)
    return sorted(files)


# ---- safetensors headers ----------------------------------------------------------------------------

ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_ST_HEADER = 100 << 20


def read_safetensors_header(path: Path, dtypes=None) -> tuple[dict, int]:
    """Read and validate a safetensors file's header against the file size and the format's rules
    (what the Rust reader would refuse later, refused now with the file and tensor named).
    Returns ({name: (dtype, shape, absolute byte offset)}, the data section's start)."""
    dtypes = ST_DTYPES if dtypes is None else dtypes
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_ST_HEADER or 8 + n > size:
                raise FormatError(f"{path}: safetensors header length {n} exceeds the file "
                                  f"({size} bytes): truncated?")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    header = load_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header must be a JSON object, got {_name(header)}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        check_object(info, {"dtype": Rule("str", required=True), "shape": Rule("list", required=True),
                            "data_offsets": Rule("list", required=True)}, f"{where}: malformed header entry")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in dtypes:
            raise FormatError(f"{where} has unknown dtype {dtype!r} (supported: {', '.join(dtypes)})")
        check_int_list(shape, f"{where}: bad shape", 0, 1 << 40)
        if len(shape) > 8:
            raise FormatError(f"{where}: bad shape: {len(shape)} dimensions (at most 8)")
        check_int_list(offs, f"{where}: bad data_offsets", 0)
        if len(offs) != 2:
            raise FormatError(f"{where}: bad data_offsets: must be [begin, end], got {offs!r:.60}")
        b, e = offs
        want = math.prod(shape) * dtypes[dtype]
        if not b <= e or e > data_size:
            raise FormatError(f"{where}: data [{b}, {e}) lies outside the file's data section "
                              f"({data_size} bytes): truncated or corrupt header")
        if e - b != want:
            raise FormatError(f"{where}: occupies {e - b} bytes, but {dtype} {shape} needs {want}")
        spans.append((b, e, name))
        out[name] = (dtype, tuple(shape), 8 + n + b)
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return out, 8 + n


# ---- packed config.json (loader/packed.py) ----------------------------------------------------------

PACKED_SCHEMA = {
    "format": Rule("str", required=True),
    "version": Rule("int", required=True),
    "architecture": Rule("str", choices=ARCHITECTURES),
    "model": Rule("dict", required=True),
    "recipe": Rule("dict", null=True),
    "tensors": Rule("dict", null=True),
    "sha256": Rule("str", required=True),
    "config_sha256": Rule("str"),
}
PACKED_TENSOR_SCHEMA = {
    "bits": Rule("int", 1, 8, required=True),
    "group": Rule("int", 32, MAX_DIM, required=True),
    "K": Rule("int", 1, MAX_DIM, required=True),
    "N": Rule("int", 1, 1 << 24, required=True),
    "offsets": Rule("bool", null=True),
    "smooth": Rule("bool", null=True),
    "exact": Rule("bool", null=True),
    "rel_err": Rule("num", 0, null=True),
    "source_type": Rule("str", null=True),
    "rotate": Rule("int", 0, 4096, null=True),
    "sub": Rule("dict", null=True),             # two-level parameters (format version 4, loader/kquant.py)
}
_PACKED_SUB_TENSOR_SCHEMA = dict(PACKED_TENSOR_SCHEMA, group=Rule("int", 16, MAX_DIM, required=True))
PACKED_SUB_SCHEMA = {
    "G": Rule("int", choices=(16, 32), required=True),
    "S": Rule("int", 32, 4096, required=True),
    "c0": Rule("num", -256, 256, required=True),
    "nib": Rule("bool", null=True),
}


def check_packed_tensor(meta, where: str) -> dict:
    sub = meta.get("sub") if isinstance(meta, dict) else None
    # a two-level tensor's group is its sub-block, 16 or 32 lanes (checked against G below)
    check_object(meta, _PACKED_SUB_TENSOR_SCHEMA if sub is not None else PACKED_TENSOR_SCHEMA, where)
    if sub is not None:
        check_object(sub, PACKED_SUB_SCHEMA, f"{where}: sub")
        if sub["S"] % 32 or sub["S"] % sub["G"] or meta["group"] != sub["G"]:
            raise FormatError(f"{where}: sub-block G={sub['G']} / super-block S={sub['S']} do not fit group "
                              f"{meta['group']} (S a multiple of 32 and of G, group = G)")
        if meta.get("rotate") or meta.get("smooth"):
            raise FormatError(f"{where}: a two-level (sub) tensor is neither rotated nor smoothed")
    elif meta["group"] % 32:
        raise FormatError(f"{where}: group must be a multiple of 32, got {meta['group']}")
    rot = meta.get("rotate") or 0
    if rot and (rot < 2 or rot & (rot - 1) or meta["K"] % rot):
        raise FormatError(f"{where}: rotate must be 0 or a power of two dividing K={meta['K']}, got {rot}")
    return meta


def check_group(group, widths: list[int], where: str) -> None:
    """A requested weight group no larger than the widest linear input (K): a larger one only pads
    every row with zeros up to the group, which at --group 65536 ran out of memory after minutes."""
    if isinstance(group, int) and widths and group > max(widths):
        raise UsageError(f"{where}: weight group {group} is larger than the widest linear input of this model "
                          f"(K = {max(widths)}); use at most {max(widths)} or 'channel'")


# ---- GGUF metadata (loader/gguf_reader.py): the keys anybit reads, by type -------------------------

_GGUF_INT = ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
             "llama.rope.dimension_count", "llama.expert_count", "general.alignment",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id")
GGUF_SCHEMA = {**{k: Rule("int", 0, null=True) for k in _GGUF_INT},
               "general.architecture": Rule("str", null=True),
               "llama.rope.freq_base": Rule("num", 0, 1e12, lo_open=True, null=True),
               "llama.attention.layer_norm_rms_epsilon": Rule("num", 0, 1, lo_open=True, null=True),
               "llama.rope.scaling.type": Rule("str", null=True),
               "tokenizer.ggml.model": Rule("str", null=True),
               "tokenizer.ggml.pre": Rule("str", null=True),
               "tokenizer.ggml.add_bos_token": Rule("bool", null=True),
               "tokenizer.ggml.add_eos_token": Rule("bool", null=True),
               "tokenizer.chat_template": Rule("str", null=True),
               "tokenizer.ggml.tokens": Rule("list", null=True),
               "tokenizer.ggml.merges": Rule("list", null=True),
               "tokenizer.ggml.token_type": Rule("list", null=True),
               "tokenizer.ggml.scores": Rule("list", null=True)}


def check_gguf_meta(meta: dict, path) -> dict:
    """The metadata keys anybit reads, each of the type the GGUF spec gives it (a file may put any type
    under any key); vocabulary lists of strings and integers, of one length."""
    where = f"{path}: metadata"
    for key, rule in GGUF_SCHEMA.items():
        if key in meta:
            check_value(meta[key], rule, f"{where} {key!r}")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        items = meta.get(key) or []
        if not all(isinstance(t, str) for t in items):
            raise FormatError(f"{where} {key!r} must be a list of strings")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for key, kind in (("tokenizer.ggml.token_type", int), ("tokenizer.ggml.scores", (int, float))):
        items = meta.get(key)
        if items is None:
            continue
        if not all(isinstance(t, kind) and not isinstance(t, bool) for t in items):
            raise FormatError(f"{where} {key!r} must be a list of numbers")
        if len(items) != len(tokens):
            raise FormatError(f"{where} {key!r} has {len(items)} entries for {len(tokens)} tokens")
    return meta
