"""Issue 18: every input a user or a file can give gets one clear error (the file and field named, exit 2
for bad input), nothing is lost or left behind. One test (or parametrized case) per cause of the issue;
the pack-destination causes are in test_pack_cli_safety.py, the fuzz suites in test_fuzz_*.py."""
from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loader.errors import AnybitError, FetchError, FormatError, StorageError, UsageError
from loader.packed import config_digest, read_packed
from tests.data_gen.tiny_models import write_tiny_bert, write_tiny_gguf, write_tiny_hf_llama

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from loader.pack import Recipe, quantize_model
    from loader.packed import write_packed
    from loader.sources import read_source
    root = tmp_path_factory.mktemp("rel")
    write_tiny_hf_llama(root / "hf")
    return write_packed(quantize_model(read_source(root / "hf"), Recipe(wbits=4, group=32)), root / "packed")


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit(d: Path, fn, version: int = 3) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg = fn(cfg)
    if isinstance(cfg, dict):
        if version == 3:
            cfg["config_sha256"] = config_digest(cfg)     # as a user who also fixed the checksum
        else:
            cfg["version"] = version                      # an older format has no config checksum
            cfg.pop("config_sha256", None)
    (d / "config.json").write_text(json.dumps(cfg))


def _set(path, value):
    def fn(cfg):
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return cfg
    return fn


PACKED_CASES = [
    ("empty list", lambda c: [], "not an anybit packed model"),
    ("null", lambda c: None, "not an anybit packed model"),
    ("model is a list", _set(["model"], [1, 2]), "model must be an object"),
    ("eos_ids null", _set(["model", "eos_ids"], None), "eos_ids is null"),
    ("eos_ids outside vocab", _set(["model", "eos_ids"], [10**6]), r"eos_ids\[0\] must be <="),
    ("group 0", _set(["tensors", "layers.0.wq", "group"], 0), "group must be >= 32"),
    ("rotate 3", _set(["tensors", "layers.0.wq", "rotate"], 3), "rotate must be 0 or a power of two"),
    ("wrong K", _set(["tensors", "layers.0.w_down", "K"], 100), "layers.0.w_down"),
    ("n_layers", _set(["model", "n_layers"], 3), "missing tensors layers.2"),
    ("norm eps NaN", _set(["model", "norm_eps"], float("nan")), "norm_eps must be finite"),
    ("norm eps negative", _set(["model", "norm_eps"], -1e-5), "norm_eps must be > 0"),
    ("rope base 0", _set(["model", "rope_theta"], 0), "rope_theta must be > 0"),
    ("rope base inf", _set(["model", "rope_theta"], float("inf")), "rope_theta must be finite"),
    ("dim a string", _set(["model", "dim"], "64"), "dim must be an integer"),
    ("tensors a list", _set(["tensors"], []), "tensors must be an object"),
]


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("name,fn,msg", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_packed_config_values_are_refused_with_file_and_field(packed, tmp_path, name, fn, msg, version):
    d = _copy(packed, tmp_path / "p")
    _edit(d, fn, version)
    with pytest.raises(FormatError, match=msg) as e:
        read_packed(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_old_format_files_still_read(packed, tmp_path):
    d = _copy(packed, tmp_path / "p")
    _edit(d, lambda c: c, version=2)
    assert read_packed(d).config.n_layers == 2


def test_generate_cli_on_a_bad_packed_dir_exits_2_with_one_line(packed, tmp_path, capsys):
    from engine import generate
    d = _copy(packed, tmp_path / "p")
    _edit(d, _set(["tensors", "layers.0.wq", "rotate"], 3))
    assert generate.main(["hi", "--model", str(d), "--device", "cpu", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "rotate" in err
    assert generate.main(["hi", "--model", str(packed), "--device", "cpu", "--max-tokens", "2"]) == 0


# ---- HF directories -------------------------------------------------------------------------------

HF_CASES = [
    ("config []", "config.json", [], "expected a JSON object"),
    ("config null", "config.json", None, "expected a JSON object"),
    ("hidden_size list", "config.json", {"hidden_size": [64]}, "hidden_size must be an integer"),
    ("eos string", "config.json", {"eos_token_id": "x"}, "eos_token_id must be an integer"),
    ("eos list of null", "config.json", {"eos_token_id": [None]}, r"eos_token_id\[0\] is null"),
    ("eps NaN", "config.json", {"rms_norm_eps": float("nan")}, "rms_norm_eps must be finite"),
    ("eps negative", "config.json", {"rms_norm_eps": -1.0}, "rms_norm_eps must be > 0"),
    ("eps zero", "config.json", {"rms_norm_eps": 0}, "rms_norm_eps must be > 0"),
    ("rope base 0", "config.json", {"rope_theta": 0.0}, "rope_theta must be > 0"),
    ("rope base inf", "config.json", {"rope_theta": float("inf")}, "rope_theta must be finite"),
    ("layers 0", "config.json", {"num_hidden_layers": 0}, "num_hidden_layers must be >= 1"),
    ("tokenizer_config list", "tokenizer_config.json", [1], "expected a JSON object"),
    ("add_bos string", "tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token must be true or false"),
]


@pytest.mark.parametrize("name,fname,value,msg", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_json_files_are_checked_before_any_work(tmp_path, name, fname, value, msg):
    from loader.hf_reader import read_hf
    d = tmp_path / "hf"
    write_tiny_hf_llama(d)
    if isinstance(value, dict):
        cur = json.loads((d / fname).read_text())
        cur.update(value)
        value = cur
    (d / fname).write_text(json.dumps(value))
    with pytest.raises(FormatError, match=msg) as e:
        read_hf(d)
    assert fname in str(e.value)


def test_shard_index_may_not_name_files_outside_the_model(tmp_path):
    from loader.hf_reader import read_hf
    d = tmp_path / "hf"
    write_tiny_hf_llama(d, shards=2)
    secret = tmp_path / "elsewhere.safetensors"
    secret.write_bytes(b"x")
    index = d / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    for bad in ("../elsewhere.safetensors", str(secret), "sub/../../elsewhere.safetensors"):
        wm["weight_map"]["model.norm.weight"] = bad
        index.write_text(json.dumps(wm))
        with pytest.raises(FormatError, match="outside the model directory"):
            read_hf(d)


@pytest.mark.parametrize("entry,msg", [
    ({"a": 5}, "must be a JSON object"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, "must be an integer"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "must be \\[begin, end\\]"),
    ({"__metadata__": {"k": 1}}, "__metadata__ must map strings to strings"),
    ({"__metadata__": []}, "__metadata__ must map strings to strings"),
])
def test_odd_safetensors_header_entries(tmp_path, entry, msg):
    from loader.hf_reader import check_safetensors
    from tests.data_gen.tiny_models import write_safetensors
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"w": ("F32", (1,), bytes(4))}, header_override=entry)
    with pytest.raises(FormatError, match=msg):
        check_safetensors(p)


# ---- GGUF -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,vtype,value,msg", [
    ("llama.attention.layer_norm_rms_epsilon", 6, -1.0, "must be > 0"),
    ("llama.attention.layer_norm_rms_epsilon", 6, float("nan"), "must be finite"),
    ("llama.rope.freq_base", 6, float("inf"), "must be finite"),
    ("llama.rope.freq_base", 6, 0.0, "must be > 0"),
    ("tokenizer.ggml.tokens", 4, 7, "must be a list"),
])
def test_gguf_hyperparameters_are_checked(tmp_path, key, vtype, value, msg):
    from loader.gguf_reader import read_gguf
    from tests.test_fuzz_gguf import parse, serialize
    p = tmp_path / "t.gguf"
    write_tiny_gguf(p)
    version, kvs, tensors, blob = parse(p.read_bytes())
    for kv in kvs:
        if kv[0] == key.encode():
            kv[1], kv[2] = vtype, value
    p.write_bytes(serialize(version, kvs, tensors, blob))
    with pytest.raises(FormatError, match=msg) as e:
        read_gguf(p)
    assert key in str(e.value) or "epsilon" in str(e.value) or "rope" in str(e.value)


# ---- CLIs -----------------------------------------------------------------------------------------

def _cli(args: list, **kw):
    return subprocess.run([sys.executable, "-m", *args], env=ENV, capture_output=True, timeout=120, **kw)


@pytest.mark.parametrize("module", ["engine.generate", "engine.embed"])
def test_non_utf8_argument_is_one_clear_error(module):
    r = _cli([module, b"caf\xe9 au lait"])
    assert r.returncode == 2
    assert b"argument 1 is not valid UTF-8 (byte 0xe9" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("opt,value,msg", [
    ("--temperature", "nan", "must be a finite number"), ("--temperature", "-1", "must be >= 0.0"),
    ("--repeat-penalty", "inf", "must be a finite number"), ("--repeat-penalty", "0", "must be > 0.0"),
    ("--top-p", "0", "must be > 0.0"), ("--top-p", "1.5", "must be <= 1.0"), ("--max-tokens", "-1", "must be >= 0"),
    ("--top-k", "-3", "must be >= 0"), ("--threads", "0", "must be >= 1"), ("--context", "0", "must be >= 1"),
    ("--seed", "-1", "must be >= 0"),
])
def test_generate_numeric_options_are_bounded(opt, value, msg, capsys):
    from engine import generate
    with pytest.raises(SystemExit) as e:
        generate.main(["hi", opt, value])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_embed_numeric_options_are_bounded(capsys):
    from engine import embed
    with pytest.raises(SystemExit) as e:
        embed.main(["hi", "--threads", "100000"])
    assert e.value.code == 2 and "must be <= 4096" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert") / "b"
    write_tiny_bert(d)
    return d


class _Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)


def test_embed_out_is_checked_before_the_work(bert, tmp_path, monkeypatch, capsys):
    from engine import embed
    monkeypatch.setattr(embed, "load_embedder", lambda *a, **k: pytest.fail("embedded before checking --out"))
    for out, msg in ((tmp_path / "missing" / "x.npy", "does not exist"), (tmp_path, "must name a .npy file")):
        assert embed.main(["a", "--model", str(bert), "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "dir.npy").mkdir()
    assert embed.main(["a", "--model", str(bert), "--out", str(tmp_path / "dir.npy")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_embed_full_disk_leaves_no_partial_file(bert, tmp_path, monkeypatch, capsys):
    from engine import embed
    out = tmp_path / "e.npy"
    out.write_bytes(b"previous result")

    def full(f, arr):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(embed.np, "save", full)
    monkeypatch.setattr(sys, "stdin", _Stdin(b""))
    assert embed.main(["a", "b", "--model", str(bert), "--device", "cpu", "--out", str(out)]) == 1
    assert "the disk is full" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result" and sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]


def test_embed_refuses_non_finite_embeddings(bert, monkeypatch, capsys):
    from engine import embed
    monkeypatch.setattr(embed.Embedder, "embed", lambda self, texts: np.full((len(texts), 64), np.nan, np.float32))
    assert embed.main(["a", "--model", str(bert), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "NaN or infinite embeddings" in err


def test_broken_pipe_ends_quietly(bert):
    """`python -m engine.embed ... | head -c 1`: no traceback, no 'Exception ignored' on stderr."""
    texts = "\n".join(f"hello world {i}" for i in range(400)).encode()
    p = subprocess.Popen([sys.executable, "-m", "engine.embed", "--model", str(bert), "--device", "cpu", "-"],
                         env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(texts)
    p.stdin.close()
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 141, err
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"Broken pipe" not in err


LIMIT = ("import resource\n"
         "def limit(headroom):\n"
         "    vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
         "    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))\n")


@pytest.mark.parametrize("stage", ["allocation", "library-mapping"])
def test_low_memory_limit_is_one_line(tmp_path, stage):
    """Under a low address-space limit the CLI says it ran out of memory: no traceback, nothing left.
    The limit is set a little above what the process has mapped at one stage of a pack: before the
    write (its buffers cannot be allocated), or before the tokenizer library is first imported
    (its segments cannot be mapped, which gave a misleading error before)."""
    gguf = tmp_path / "t.gguf"
    write_tiny_gguf(gguf)
    if stage == "allocation":
        # once the streaming writer has its temporary: packing the tensors (C loops over NumPy buffers)
        # cannot allocate. (The limit inside NumPy's own quantization ufuncs instead can crash NumPy itself,
        # a segfault in np.rint under RLIMIT_AS, numpy 2.x, which no caller can turn into a message.)
        setup = ("import tokenizers, loader.tokenizer, loader.packed, loader.pack_writer, loader.pack_ops\n"
                 "W = loader.pack_writer.PackedWriter\n"
                 "real = W.__init__\n"
                 "def limited(self, *a, **k):\n    real(self, *a, **k)\n    limit(0)\n"
                 "W.__init__ = limited\n")
    else:
        setup = "limit(1 << 20)\n"
    code = ("import sys\n" + LIMIT + "from engine.cli_common import run\nfrom tools import pack\n"
            "import numpy, loader.pack, loader.packed, loader.sources, loader.gguf_reader, engine.model_store\n"
            + setup + "sys.exit(run(pack.main, sys.argv[1:3]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(gguf), str(tmp_path / "out")],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last.startswith("error: out of memory"), r.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- the C kernels' entry points ------------------------------------------------------------------

def test_cpu_ops_check_their_arguments_before_c():
    from runtime.cpu import CpuBackend
    from runtime.cpu.errors import CpuKernelError, check
    be = CpuBackend(threads=1)
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError):
        be.rmsnorm(x, np.ones(7, np.float32), 1e-5)
    with pytest.raises(ValueError, match="finite"):
        be.rmsnorm(x, np.ones(8, np.float32), float("nan"))
    with pytest.raises(ValueError, match="> 0"):
        be.layernorm(x, np.ones(8, np.float32), np.zeros(8, np.float32), -1.0)
    with pytest.raises(ValueError):
        be.rope(np.ones((2, 2, 8), np.float32), [0, 1], 0.0, "half")
    with pytest.raises(ValueError):
        be.attention(np.ones((1, 2, 8), np.float32), np.ones((4, 8), np.float32), np.ones((4, 8), np.float32), 4, [0])
    with pytest.raises(ValueError):
        be.attention(np.ones((1, 2, 8), np.float32), np.ones((4, 1, 8), np.float32), np.ones((4, 1, 8), np.float32), 5, [0])
    with pytest.raises(CpuKernelError, match="hadamard"):       # checked by the C side itself
        be.hadamard(np.ones((2, 48), np.float32), 32)
    with pytest.raises(ValueError, match="LinearHandle"):
        be.linear(object(), x)
    with pytest.raises(ValueError):
        be.quantize_activations(np.ones((2, 64), np.float32), 4, 32, 32)
    with pytest.raises(CpuKernelError, match="bad arguments") as e:
        check(-3, "attention")
    assert isinstance(e.value, AnybitError) and e.value.rc == -3
    be.close()


def test_one_error_root():
    from runtime.cpu.errors import CpuKernelError
    from runtime.errors import CudaError, NoGpuError, OutOfMemoryError
    for t in (FormatError, FetchError, UsageError, StorageError, CudaError, NoGpuError, OutOfMemoryError,
              CpuKernelError):
        assert issubclass(t, AnybitError), t
    # each also refines the builtin that callers already catch
    assert issubclass(FormatError, ValueError) and issubclass(StorageError, OSError)
    assert issubclass(OutOfMemoryError, MemoryError) and issubclass(CudaError, RuntimeError)
    assert math.isfinite(1.0)
