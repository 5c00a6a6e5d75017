"""`python -m engine.embed`: output formats and the handling of bad input (exit 2, one line, no traceback)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import embed as cli

ROOT = Path(__file__).resolve().parents[1]


class _Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)


def run(argv, capsys, monkeypatch, stdin: bytes = b""):
    monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def model(default_minilm) -> str:
    return str(default_minilm)


@pytest.fixture(scope="module")
def reference(model):
    e = cli.load_embedder(model, device="cpu")
    yield e
    e.close()


def test_json_lines_match_the_python_api(model, reference, capsys, monkeypatch):
    texts = ["A dog runs in the park.", "Ein Hund läuft im Park."]
    rc, out, err = run(["--model", model, "--device", "cpu", *texts], capsys, monkeypatch)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == texts
    got = np.array([r["embedding"] for r in rows], np.float32)
    np.testing.assert_array_equal(got, reference.embed(texts))     # str(float32) round-trips exactly
    assert "embedded 2 text(s), dim 384" in err


def test_stdin_lines_and_dash(model, reference, capsys, monkeypatch):
    rc, out, err = run(["--model", model, "--device", "cpu", "first", "-"], capsys, monkeypatch,
                       stdin=b"second line\r\n\nthird\n")
    assert rc == 0, err
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert texts == ["first", "second line", "", "third"]          # a blank line is a text (embedded)
    rc, out2, _ = run(["--model", model, "--device", "cpu"], capsys, monkeypatch, stdin=b"only stdin\n")
    assert rc == 0 and [json.loads(line)["text"] for line in out2.splitlines()] == ["only stdin"]


def test_similarity_matrix(model, capsys, monkeypatch):
    texts = ["The cat sleeps.", "A kitten is sleeping.", "Stock markets fell today."]
    rc, out, err = run(["--model", model, "--device", "cpu", "--similarity", *texts], capsys, monkeypatch)
    assert rc == 0, err
    m = np.array([json.loads(line)["similarity"] for line in out.splitlines()])
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)
    np.testing.assert_allclose(m, m.T, atol=1e-6)
    assert m[0, 1] > m[0, 2] + 0.2


def test_out_npy(model, reference, tmp_path, capsys, monkeypatch):
    path = tmp_path / "vecs.npy"
    rc, out, err = run(["--model", model, "--device", "cpu", "--batch", "1", "--out", str(path), "x", "y z"],
                       capsys, monkeypatch)
    assert rc == 0, err
    assert out == "" and "wrote 2x384" in err
    v = np.load(path)
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, reference.embed(["x", "y z"]), atol=2e-6)


def _one_clean_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_empty_input_is_an_error(model, capsys, monkeypatch):
    rc, out, err = run(["--model", model, "--device", "cpu"], capsys, monkeypatch, stdin=b"")
    assert rc == 2 and out == ""
    assert "no input texts" in _one_clean_line(err)


def test_non_utf8_stdin_names_the_line(model, capsys, monkeypatch):
    rc, out, err = run(["--model", model, "--device", "cpu", "-"], capsys, monkeypatch,
                       stdin="fine\nla caf".encode() + b"\xe9 noire\n")
    assert rc == 2 and out == ""
    line = _one_clean_line(err)
    assert "line 2" in line and "UTF-8" in line and "0xe9" in line


def test_whitespace_text_is_embedded(model, capsys, monkeypatch):
    rc, out, err = run(["--model", model, "--device", "cpu", "   ", ""], capsys, monkeypatch)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and rows[0]["embedding"] == rows[1]["embedding"]


def test_overlong_text_warns(model, capsys, monkeypatch):
    rc, out, err = run(["--model", model, "--device", "cpu", "word " * 600], capsys, monkeypatch)
    assert rc == 0
    assert "truncated" in err and len(out.splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/nonexistent/model", "hi"], "does not exist"),
    (["--out", "vectors.txt", "hi"], ".npy"),
])
def test_bad_arguments_exit_2(argv, needle, capsys, monkeypatch):
    rc, out, err = run(argv, capsys, monkeypatch)
    assert rc == 2 and out == ""
    assert needle in _one_clean_line(err)


def test_bad_bits_is_a_usage_error(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        run(["--wbits", "9", "hi"], capsys, monkeypatch)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_module_entry_point_with_bad_stdin(model):
    # the real `python -m` path: undecodable stdin gives exit 2 and one line, not a traceback
    p = subprocess.run([sys.executable, "-m", "engine.embed", "--model", model, "--device", "cpu"],
                       input=b"\xff\xfe\n", capture_output=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stdout == b""
    assert "line 1" in _one_clean_line(p.stderr.decode())
