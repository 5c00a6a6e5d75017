"""Packing straight to disk (loader/pack_writer.py), progress lines off a terminal and the summary."""
import io
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from loader.bipolar import PackedLinear
from loader.pack import Recipe, quantize_model
from loader.pack_writer import PackedWriter, pack_to_dir
from loader.packed import read_packed, sha256_file
from loader.progress import Progress, summary
from tests.test_pack import tiny_llama


@pytest.mark.parametrize("recipe", [Recipe(wbits=4, group=32), Recipe(wbits=2, group=64, asymmetric=False),
                                    Recipe(wbits=8, group=64, rotate=32)])
def test_streamed_directory_equals_the_in_memory_model(tmp_path, recipe):
    src = tiny_llama()
    out, info, _ = pack_to_dir(src, recipe, tmp_path / "m")
    mem = quantize_model(src, recipe)
    # the safetensors library itself (an independent reader) accepts the file and reads the same arrays
    st = load_file(str(out / "model.safetensors"))
    back = read_packed(out)                             # verifies the streamed SHA-256 against the file
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sha256"] == sha256_file(out / "model.safetensors")
    for name, t in mem.tensors.items():
        if isinstance(t, PackedLinear):
            np.testing.assert_array_equal(st[f"{name}.planes"], t.planes)
            np.testing.assert_array_equal(back.tensors[name].scales, t.scales)
            assert (back.tensors[name].offsets is None) == (t.offsets is None)
            assert info[name]["rel_err"] == pytest.approx(mem.info[name]["rel_err"], rel=1e-12)
        else:
            np.testing.assert_array_equal(st[name], t)
    assert back.info.keys() == mem.info.keys()


def test_data_starts_aligned_and_ranges_are_contiguous(tmp_path):
    out, _, _ = pack_to_dir(tiny_llama(), Recipe(wbits=3, group=32), tmp_path / "m")
    raw = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    spans = sorted(v["data_offsets"] for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_failure_midway_leaves_nothing_and_keeps_the_old_directory(tmp_path):
    src = tiny_llama()
    out = tmp_path / "m"
    pack_to_dir(src, Recipe(wbits=4, group=32), out)
    before = (out / "config.json").read_text()

    def boom():
        raise OSError("disk gone")
    src.tensors["layers.1.w_up"].load = boom
    with pytest.raises(OSError, match="disk gone"):
        pack_to_dir(src, Recipe(wbits=2, group=32), out)
    assert (out / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_writer_refuses_what_was_not_planned(tmp_path):
    w = PackedWriter(tmp_path / "m", [("a", "F32", (2, 3))])
    with pytest.raises(RuntimeError, match="planned"):
        w.add("a", np.zeros((3, 2), np.float32))
    w.abort()
    assert not any(tmp_path.iterdir())


def test_progress_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv("ANYBIT_PROGRESS_EVERY", "0")
    buf = io.StringIO()
    p = Progress("packing x", stream=buf)
    for done in (0, 25, 50, 100):
        p(done, 100, f"t{done}")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("packing x: 100 weights")
    assert any("50% of 100 weights" in ln and "weights/s" in ln for ln in lines)
    assert lines[-1].endswith("(done)") and "100%" in lines[-1]


def test_progress_is_quiet_between_intervals(monkeypatch):
    monkeypatch.setenv("ANYBIT_PROGRESS_EVERY", "3600")
    buf = io.StringIO()
    p = Progress("packing x", stream=buf)
    for done in range(0, 101):
        p(done, 100, "t")
    assert len(buf.getvalue().splitlines()) == 2                 # the start and the end


def test_summary_names_exact_and_rounded():
    info = {"a": {"bits": 4, "group": 32, "exact": True, "rel_err": 0.0, "source_type": "Q4_1", "rotate": 0},
            "b": {"bits": 8, "group": 128, "exact": False, "rel_err": 0.01, "source_type": "Q8_0", "rotate": 64},
            "c": {"bits": 8, "group": 128, "exact": False, "rel_err": 0.03, "source_type": "Q8_0", "rotate": 64}}
    s = summary(info, 1.5, 3 << 20, 2 << 20)
    assert "1 Q4_1 -> W4 G32" in s and "2 Q8_0 -> W8 G128 rotated" in s
    assert "mean 0.0200, worst 0.0300 (c)" in s and "2.0 MiB source -> 3.0 MiB packed" in s


def test_first_use_prints_progress_and_summary_to_captured_stderr(tmp_path, monkeypatch, capfd, default_gguf):
    """A first use whose stderr is a pipe (as under CI or a notebook) still says what it is doing."""
    from engine import model_store
    monkeypatch.setenv("ANYBIT_PROGRESS_EVERY", "0")
    monkeypatch.setattr(model_store, "cache_root", lambda: tmp_path)
    pm, bits = model_store.load_packed_model(default_gguf, wbits=4)
    err = capfd.readouterr().err
    assert bits == 4 and "%" in err and "weights/s" in err
    assert "exact (lossless): 1 Q8_0 -> W8 G32, 210 Q4_1 -> W4 G32" in err and "rounded: none" in err
    assert "\r" not in err                                        # lines, not a redrawn bar
    model_store.load_packed_model(default_gguf, wbits=4)           # cached: silent
    assert capfd.readouterr().err == ""
