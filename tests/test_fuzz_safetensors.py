"""Property-based fuzzing of Hugging Face directories: safetensors headers (and, in a second suite, the
JSON files beside them) mutated from a small valid directory either load or raise FormatError; never
another exception, a crash or a hang.

Header mutations work on the parsed JSON (an entry's dtype, shape or offsets replaced by any JSON value,
entries added or removed, __metadata__ of any shape, a header that is not an object, deep nesting,
NaN and Infinity tokens) and on the bytes (the length field lying, flips, truncation). A load that
succeeds must also read a tensor. Counts: FAST_EXAMPLES by default, CI_EXAMPLES in the slow-marked run.
"""
from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.errors import FormatError
from tests.data_gen.tiny_models import write_tiny_hf_llama

from tests.fuzz_common import CI_EXAMPLES, FAST_EXAMPLES, no_hang

HANG_S = 10



SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "llama", "bert", "Q4"]))
JSON = st.recursive(SCALARS, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                  st.dictionaries(st.text(max_size=8), ch, max_size=4)),
                    max_leaves=8)
INT_LISTS = st.lists(st.one_of(st.integers(-5, 2**40), st.sampled_from([0, 64, 128, 259, 272])), max_size=4)


def split(raw: bytes):
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data: bytes, length=None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def header_mutation(draw):
    kind = draw(st.sampled_from(["field", "field", "field", "offsets", "shape", "drop", "add", "metadata",
                                 "not_object", "deep", "length", "flip", "truncate", "nan"]))
    return kind, draw(st.data())


def mutate_header(raw: bytes, kind: str, data) -> bytes:
    header, blob = split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    if kind == "field":
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(JSON)
    elif kind == "offsets":
        header[name]["data_offsets"] = data.draw(INT_LISTS)
    elif kind == "shape":
        header[name]["shape"] = data.draw(INT_LISTS)
    elif kind == "drop":
        del header[name]
    elif kind == "add":
        header[data.draw(st.text(max_size=30))] = data.draw(JSON)
    elif kind == "metadata":
        header["__metadata__"] = data.draw(JSON)
    elif kind == "not_object":
        header = data.draw(JSON)
    elif kind == "deep":
        depth = data.draw(st.sampled_from([10, 1000, 100000]))
        return join(b"[" * depth + b"]" * depth, blob)
    elif kind == "nan":
        header[name]["data_offsets"] = [0, float(data.draw(st.sampled_from(["nan", "inf"])))]
    out = join(header, blob)
    if kind == "length":
        text_len = struct.unpack_from("<Q", out)[0]
        out = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, text_len + 16)))) + out[8:]
    elif kind == "flip":
        b = bytearray(out)
        end = 8 + struct.unpack_from("<Q", out)[0]
        for _ in range(data.draw(st.integers(1, 6))):
            b[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
        out = bytes(b)
    elif kind == "truncate":
        out = out[:data.draw(st.integers(0, len(out) - 1))]
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_hf") / "base"
    write_tiny_hf_llama(d)
    return d


def check_contract(d) -> None:
    from loader.hf_reader import read_hf
    with no_hang(HANG_S):
        try:
            src = read_hf(d)
            src.tensors["layers.0.wq"].load()
        except FormatError as e:
            assert str(e) and "\n" not in str(e).strip()


def _case_dir(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_cases") / "case"
    shutil.copytree(base_dir, d)
    return d


def _run_headers(base_dir, tmp_path_factory, examples):
    d = _case_dir(base_dir, tmp_path_factory)
    raw = (base_dir / "model.safetensors").read_bytes()
    n = {"cases": 0}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(header_mutation())
    def case(m):
        kind, data = m
        (d / "model.safetensors").write_bytes(mutate_header(raw, kind, data))
        n["cases"] += 1
        check_contract(d)
    case()
    assert n["cases"] >= examples


# ---- the JSON files of an HF directory: config.json, tokenizer_config.json, a shard index ----------

CONFIG_KEYS = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "head_dim", "rope_scaling"]


@st.composite
def config_mutation(draw):
    kind = draw(st.sampled_from(["value", "value", "value", "drop", "whole", "tok_config", "index"]))
    return kind, draw(st.data())


def mutate_configs(d, base_dir, kind, data) -> None:
    cfg = json.loads((base_dir / "config.json").read_text())
    for f in ("config.json", "tokenizer_config.json"):
        shutil.copy(base_dir / f, d / f)
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    if kind == "value":
        cfg[data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(st.one_of(JSON, st.sampled_from(
            [0, -1, 1e-30, float("nan"), float("inf"), None, [], {}, [2, "x"], 2**40])))
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "drop":
        del cfg[data.draw(st.sampled_from(CONFIG_KEYS[:8]))]
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "whole":
        (d / "config.json").write_text(json.dumps(data.draw(JSON)))
    elif kind == "tok_config":
        (d / "tokenizer_config.json").write_text(json.dumps(data.draw(JSON)))
    elif kind == "index":
        wm = data.draw(st.one_of(JSON, st.dictionaries(st.text(max_size=8), st.sampled_from(
            ["model.safetensors", "../base/model.safetensors", "/etc/passwd", "", ".", "sub/../model.safetensors"]),
            max_size=3)))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def _run_configs(base_dir, tmp_path_factory, examples):
    d = _case_dir(base_dir, tmp_path_factory)
    n = {"cases": 0}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(config_mutation())
    def case(m):
        kind, data = m
        mutate_configs(d, base_dir, kind, data)
        n["cases"] += 1
        check_contract(d)
    case()
    assert n["cases"] >= examples


def test_base_directory_loads(base_dir):
    check_contract(base_dir)


def test_fuzz_safetensors_headers_fast(base_dir, tmp_path_factory):
    _run_headers(base_dir, tmp_path_factory, FAST_EXAMPLES)


def test_fuzz_hf_configs_fast(base_dir, tmp_path_factory):
    _run_configs(base_dir, tmp_path_factory, FAST_EXAMPLES)


@pytest.mark.slow
def test_fuzz_safetensors_headers_ci(base_dir, tmp_path_factory):
    _run_headers(base_dir, tmp_path_factory, CI_EXAMPLES)


@pytest.mark.slow
def test_fuzz_hf_configs_ci(base_dir, tmp_path_factory):
    _run_configs(base_dir, tmp_path_factory, CI_EXAMPLES // 2)
