"""`python -m tools.cache`: lists the model cache and cleans it, touching only what anybit wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loader.fetch import MARKER
from tools import cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path, monkeypatch):
    from loader.pack import Recipe, quantize_model
    from loader.packed import write_packed
    from loader.sources import read_source
    from tests.data_gen.tiny_models import write_tiny_gguf
    r = tmp_path / "cache"
    monkeypatch.setenv("ANYBIT_CACHE", str(r))
    write_tiny_gguf(tmp_path / "t.gguf")
    pm = quantize_model(read_source(tmp_path / "t.gguf"), Recipe(wbits=4))
    good = write_packed(pm, r / "packed" / "tiny-w4-0123")
    old = write_packed(pm, r / "packed" / "tiny-w4-old")
    cfg = json.loads((old / "config.json").read_text())
    cfg["version"] = 99                                   # a format this anybit cannot read
    (old / "config.json").write_text(json.dumps(cfg))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (r / "packed" / f".tiny-w4-0123.tmp-{dead.pid}-abcdef").mkdir()
    (r / "packed" / f".tiny-w4-0123.tmp-{dead.pid}-abcdef" / "model.safetensors").write_bytes(bytes(4096))
    (r / "packed" / f".tiny-w4-9.tmp-{os.getpid()}-abcdef").mkdir()      # a running writer's
    model = r / "llm-tiny-0.1"
    model.mkdir()
    (model / "m.gguf").write_bytes(bytes(100))
    (model / MARKER).write_text("{}")
    (r / "bench").mkdir()
    (r / "bench" / "venv.txt").write_text("not anybit's")
    return r


def _keys(r):
    return {e.key: e for e in cache.entries(r)}


def test_list_and_size(root, capsys):
    assert cache.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "packed/tiny-w4-0123" in out and "format 3" in out and "unreadable" in out
    assert "llm-tiny-0.1" in out and "fetched default model" in out and "bench" in out and "never removed" in out
    keys = _keys(root)
    assert keys["packed/tiny-w4-0123"].size == cache.tree_size(root / "packed" / "tiny-w4-0123") > 0
    assert cache.main(["size"]) == 0
    out = capsys.readouterr().out
    assert "packed " in out and "model " in out and "other " in out


def test_clean_removes_only_what_is_stale(root, capsys):
    assert cache.main(["clean", "--dry-run"]) == 0
    assert len(list((root / "packed").iterdir())) == 4
    assert cache.main(["clean"]) == 0
    left = sorted(p.name for p in (root / "packed").iterdir())
    assert left == [f".tiny-w4-9.tmp-{os.getpid()}-abcdef", "tiny-w4-0123"]       # the live writer's kept
    assert (root / "llm-tiny-0.1").is_dir() and (root / "bench").is_dir()
    assert "freed" in capsys.readouterr().out


def test_clean_one_key_and_all(root, capsys):
    assert cache.main(["clean", "nope"]) == 2
    assert "no cache entry" in capsys.readouterr().err
    assert cache.main(["clean", "bench"]) == 2                            # not anybit's
    assert cache.main(["clean", "tiny-w4-0123"]) == 0                     # a packed copy by its bare name
    assert not (root / "packed" / "tiny-w4-0123").exists()
    assert cache.main(["clean", "--all"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["bench", "packed"]
    assert [p.name for p in (root / "packed").iterdir()] == [f".tiny-w4-9.tmp-{os.getpid()}-abcdef"]
    assert (root / "bench" / "venv.txt").read_text() == "not anybit's"


def test_module_entry_point(root):
    r = subprocess.run([sys.executable, "-m", "tools.cache", "list"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), ANYBIT_CACHE=str(root)), timeout=120)
    assert r.returncode == 0 and "packed/tiny-w4-0123" in r.stdout
