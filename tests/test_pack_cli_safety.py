"""`python -m tools.pack` never destroys what it was not asked to replace (issue 18): an unrelated OUT,
the source itself, a half-written result after SIGTERM or a full disk, temporaries of dead writers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.cli_common import run
from loader.packed import is_packed_dir, read_packed
from tests.data_gen.tiny_models import write_tiny_gguf, write_tiny_hf_llama
from tools import pack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gguf(tmp_path):
    p = tmp_path / "src" / "tiny.gguf"
    p.parent.mkdir()
    write_tiny_gguf(p)
    return p


def _tree(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_unrelated_directory_is_refused_and_kept(gguf, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    assert pack.main([str(gguf), str(out)]) == 2
    err = capsys.readouterr().err
    assert "not an anybit packed directory" in err and "--force" in err and err.count("\n") == 1
    assert (out / "holiday.jpg").read_bytes() == b"precious" and not _leftovers(tmp_path)
    assert pack.main([str(gguf), str(out), "--force"]) == 0      # asked for: replaced
    assert is_packed_dir(out) and not (out / "holiday.jpg").exists()


def test_existing_file_is_refused(gguf, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert pack.main([str(gguf), str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err and out.read_text() == "keep me"


def test_packed_and_empty_directories_are_replaced(gguf, tmp_path):
    out = tmp_path / "packed"
    out.mkdir()
    assert pack.main([str(gguf), str(out), "--wbits", "8"]) == 0
    assert pack.main([str(gguf), str(out), "--wbits", "4"]) == 0       # a packed dir: replaced atomically
    assert read_packed(out).info["layers.0.wq"]["bits"] == 4
    assert not _leftovers(tmp_path)


def test_output_equal_to_or_holding_the_source_is_refused_even_with_force(tmp_path, gguf, capsys):
    hf = tmp_path / "hf"
    write_tiny_hf_llama(hf)
    before = _tree(hf)
    for args in ([str(hf), str(hf)], [str(hf), str(hf), "--force"], [str(gguf), str(gguf.parent), "--force"],
                 [str(gguf), str(gguf)]):
        assert pack.main(args) == 2
        assert "destroy the source" in capsys.readouterr().err
    assert _tree(hf) == before and gguf.is_file()
    inside = hf / "packed"
    assert pack.main([str(hf), str(inside)]) == 2                      # inside the source: only with --force
    assert "inside the source directory" in capsys.readouterr().err
    assert pack.main([str(hf), str(inside), "--force"]) == 0
    assert {k: v for k, v in _tree(hf).items() if not k.startswith("packed")} == before


def test_stale_temporaries_of_dead_writers_are_cleaned(gguf, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    live = tmp_path / f".out.tmp-{os.getpid()}-def456"      # a running writer's: kept
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(bytes(1000))
    foreign = [tmp_path / f".notes.tmp-{dead.pid}-zzz", tmp_path / f".out.tmp-{dead.pid}-yyy"]
    for d in foreign:                    # another output's, and one holding files anybit never writes
        d.mkdir()
        (d / "diary.txt").write_text("not anybit's")
    assert pack.main([str(gguf), str(tmp_path / "out")]) == 0
    assert not stale.exists() and live.exists() and all(d.exists() for d in foreign)


def test_group_larger_than_every_input_is_refused_before_packing(gguf, tmp_path, capsys):
    t0 = time.perf_counter()
    assert pack.main([str(gguf), str(tmp_path / "out"), "--group", "65536"]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "larger than the widest linear input" in err and "K = 128" in err
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    hf = tmp_path / "hf"
    write_tiny_hf_llama(hf)
    from tests.data_gen.tiny_models import hf_llama_weights, tiny_vocab, _save
    w = hf_llama_weights(len(tiny_vocab()[0]), True)
    w["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    _save(w, hf, 1, "F32")
    assert pack.main([str(hf), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "NaN or infinite" in err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_full_disk_leaves_nothing_and_keeps_the_old_output(gguf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert pack.main([str(gguf), str(out), "--wbits", "8"]) == 0
    before = _tree(out)
    capsys.readouterr()
    import errno

    from loader.pack_writer import PackedWriter
    real_add = PackedWriter.add

    class FullDisk:                     # the temporary file's writes fail as on a full disk
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    def full(self, key, a):
        if not isinstance(self.f, FullDisk):
            self.f.close()
            self.f = FullDisk()
        return real_add(self, key, a)
    monkeypatch.setattr(PackedWriter, "add", full)
    assert pack.main([str(gguf), str(out), "--wbits", "4"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]      # after the progress bar: one line
    assert err.startswith("error: cannot write") and "the disk is full" in err
    assert _tree(out) == before and not _leftovers(tmp_path)


def test_sigterm_in_process_removes_the_temporary(gguf, tmp_path, monkeypatch, capsys):
    from loader.pack_writer import PackedWriter
    real_add = PackedWriter.add

    def term(self, key, a):
        real_add(self, key, a)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    monkeypatch.setattr(PackedWriter, "add", term)
    assert run(pack.main, [str(gguf), str(tmp_path / "out")]) == 143
    assert "terminated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_sigterm_to_a_real_pack_process(gguf, tmp_path):
    """A real process and signal: the pack is held inside its write; SIGTERM must remove the temporary."""
    code = ("import sys, time\nfrom loader.pack_writer import PackedWriter as W\n"
            "real = W.add\n"
            "def slow(self, k, a):\n    real(self, k, a); self.f.flush(); time.sleep(60)\n"
            "W.add = slow\n"
            "from engine.cli_common import run\nfrom tools import pack\n"
            "sys.exit(run(pack.main, sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, str(gguf), str(tmp_path / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.tmp-") and (p / "model.safetensors").exists()
                                             for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert _leftovers(tmp_path), "the pack never reached its write"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert b"Traceback" not in err
    assert not _leftovers(tmp_path) and not (tmp_path / "out").exists()


def test_config_checksum_catches_an_edit(gguf, tmp_path):
    out = tmp_path / "out"
    assert pack.main([str(gguf), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["version"] == 3 and len(cfg["config_sha256"]) == 64
    cfg["model"]["n_layers"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    from loader.errors import FormatError
    with pytest.raises(FormatError, match="config.json was edited"):
        read_packed(out)
