"""Property-based fuzzing of packed directories' config.json: mutations of a small valid packed model
either load or raise FormatError; never another exception, a crash or a hang. A mutated config that
loads must also run a forward pass on the CPU backend: a packed value that loads but breaks the first
forward (issue 18: `rotate: 3`, a wrong `K`) is a failure of the validation layer.

Mutations set any field (top level, model config, per-tensor entries, recipe) to any JSON value,
including NaN and Infinity, delete fields, replace the whole file, or flip and cut its bytes. Most
cases re-compute the config's own checksum (format 3), so that they reach the field checks instead of
stopping at the checksum; the others check that the checksum catches the edit. Counts: FAST_EXAMPLES
by default, CI_EXAMPLES in the slow-marked run.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.errors import FormatError
from tests.data_gen.tiny_models import write_tiny_hf_llama

from tests.fuzz_common import CI_EXAMPLES, FAST_EXAMPLES, no_hang

HANG_S = 20



SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.sampled_from([0, 1, 2, 3, -1, 31, 32, 48, 63, 64, 65, 96, 128, 256, 2**31, 2**63]),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e-30, 1e30, 0.5, float("nan"), float("inf")]),
                    st.text(max_size=10), st.sampled_from(["llama", "bert", "half", "adjacent", "cls", "F32"]))
JSON = st.recursive(SCALARS, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                  st.dictionaries(st.text(max_size=6), ch, max_size=3)),
                    max_leaves=6)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from loader.pack import Recipe, quantize_model
    from loader.packed import write_packed
    from loader.sources import read_source
    root = tmp_path_factory.mktemp("fuzz_packed")
    write_tiny_hf_llama(root / "hf")
    pm = quantize_model(read_source(root / "hf"), Recipe(wbits=4, group=32, rotate=64))
    return write_packed(pm, root / "packed")


def _paths(cfg: dict) -> list[tuple]:
    """Every field path a mutation may target: top-level keys, model.*, tensors.NAME.*, recipe.*."""
    out = [(k,) for k in cfg]
    out += [("model", k) for k in cfg["model"]]
    out += [("tensors", n, k) for n in list(cfg["tensors"])[:6] for k in cfg["tensors"][n]]
    out += [("recipe", k) for k in cfg["recipe"]]
    return out


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["set", "set", "set", "set", "delete", "whole", "flip", "truncate"]))
    return kind, draw(st.booleans()), draw(st.data())


def mutate(base_cfg: dict, kind: str, redigest: bool, data) -> bytes:
    from loader.packed import config_digest
    cfg = json.loads(json.dumps(base_cfg))
    if kind in ("set", "delete"):
        path = data.draw(st.sampled_from(_paths(cfg)))
        parent = cfg
        for k in path[:-1]:
            parent = parent[k]
        if kind == "set":
            parent[path[-1]] = data.draw(JSON)
        else:
            del parent[path[-1]]
    elif kind == "whole":
        cfg = data.draw(JSON)
    if redigest and isinstance(cfg, dict) and kind in ("set", "delete"):
        cfg["config_sha256"] = config_digest(cfg)
    raw = json.dumps(cfg, indent=1).encode()
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 6))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(b)
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    return raw


def check_contract(d, forward: bool) -> str:
    from loader.packed import read_packed
    with no_hang(HANG_S):
        try:
            pm = read_packed(d)
        except FormatError as e:
            assert str(e) and "\n" not in str(e).strip()
            return "refused"
        if forward:
            from engine.api import Model
            from runtime.cpu import CpuBackend
            with Model(pm, CpuBackend(threads=1), wbits=4, abits=16, agroup=None, context=32) as m:
                logits = m.logits([3, 4, 5])
            assert logits.shape == (3, pm.config.vocab_size)
            return "ran" if np.isfinite(logits).all() else "ran, not finite"
        return "loaded"


def _run(base_dir, tmp_path_factory, examples):
    d = tmp_path_factory.mktemp("packed_cases") / "case"
    shutil.copytree(base_dir, d)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    seen: dict[str, int] = {}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutation())
    def case(m):
        kind, redigest, data = m
        raw = mutate(base_cfg, kind, redigest, data)
        (d / "config.json").write_bytes(raw)
        # a forward only where the load succeeded after a change that can matter to it
        outcome = check_contract(d, forward=raw != json.dumps(base_cfg, indent=1).encode())
        seen[outcome] = seen.get(outcome, 0) + 1
    case()
    assert sum(seen.values()) >= examples
    assert seen.get("refused", 0) > 0


def test_base_packed_dir_runs(base_dir):
    assert check_contract(base_dir, forward=True) == "ran"


def test_fuzz_packed_config_fast(base_dir, tmp_path_factory):
    _run(base_dir, tmp_path_factory, FAST_EXAMPLES)


@pytest.mark.slow
def test_fuzz_packed_config_ci(base_dir, tmp_path_factory):
    _run(base_dir, tmp_path_factory, CI_EXAMPLES)
