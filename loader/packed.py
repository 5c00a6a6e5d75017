"""The packed-model directory (SPEC.md section 2, docs/DESIGN.md): write atomically, read by mmap.

    DIR/model.safetensors   bit planes (uint32), scales, offsets, smoothing factors, float tensors
    DIR/config.json         format, version, architecture, model config, recipe, per-tensor info, sha256
    DIR/tokenizer.json

Writing goes to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written model under the final name. Reading checks the version and the checksum first.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from loader.bipolar import PackedLinear
from loader.errors import FormatError
from loader.kquant import SubScales
from loader.pack import PackedModel
from loader.source import ModelConfig

FORMAT = "anybit-packed"
# 2 adds a per-tensor "rotate" (loader/rotation.py), 3 two-level parameters ("sub", loader/kquant.py);
# a model is written with the lowest version that holds what it uses
VERSION = 3
READABLE = (1, 2, 3)
_DTYPES = {"F32": np.float32, "U32": np.uint32, "F16": np.float16, "I32": np.int32, "U8": np.uint8, "I8": np.int8}
_SUB_FIELDS = ("d", "sc", "dmin", "m")      # two-level parameters (loader/kquant.py SubScales)


def is_packed_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_packed(model: PackedModel, out_dir: str | os.PathLike) -> Path:
    """Write `model` to `out_dir` atomically. An existing directory is replaced only on success."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}
    for name, t in model.tensors.items():
        if isinstance(t, PackedLinear):
            arrays[f"{name}.planes"] = np.ascontiguousarray(t.planes)
            if t.sub is not None:               # the source's own bytes: float16 d, 8-bit sub-scales
                for f in _SUB_FIELDS:
                    if getattr(t.sub, f) is not None:
                        arrays[f"{name}.{f}"] = np.ascontiguousarray(getattr(t.sub, f))
            else:
                arrays[f"{name}.scales"] = np.ascontiguousarray(t.scales, np.float32)
                if t.offsets is not None:
                    arrays[f"{name}.offsets"] = np.ascontiguousarray(t.offsets, np.float32)
            if t.smooth is not None:
                arrays[f"{name}.smooth"] = np.ascontiguousarray(t.smooth, np.float32)
            meta = model.info.get(name, {})
            tensors[name] = {"bits": t.bits, "group": t.group, "K": t.K, "N": t.N,
                             "offsets": t.offsets is not None, "smooth": t.smooth is not None,
                             "exact": bool(meta.get("exact", False)), "rel_err": meta.get("rel_err"),
                             "source_type": meta.get("source_type"), "rotate": t.rotate}
            if t.sub is not None:
                tensors[name].update(offsets=True, sub={"G": t.sub.G, "S": t.sub.S, "c0": t.sub.c0,
                                                        "nib": t.sub.nib})
        else:
            arrays[name] = np.ascontiguousarray(t, np.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(arrays, str(tmp / "model.safetensors"))
        (tmp / "tokenizer.json").write_text(model.tokenizer_json)
        rotated = any(m["rotate"] for m in tensors.values())
        version = 3 if any("sub" in m for m in tensors.values()) else (2 if rotated else 1)
        config = {"format": FORMAT, "version": version, "architecture": model.config.arch,
                  "model": model.config.to_dict(), "recipe": model.recipe, "tensors": tensors,
                  "sha256": sha256_file(tmp / "model.safetensors")}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class FileMap:
    """One read-only map of a file whose tensors are views of it.

    release(arrays) lets the OS take back this process's resident pages under some of those views, once a
    backend has made its own copies of them: they are clean file pages, so a later read faults them back
    in from the page cache and nothing is lost. Measured on a 7B-shaped model, the weights that stayed
    mapped after the backend had tiled them were 5 GB of the process's 12.5 GB peak."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = np.frombuffer(self.mm, np.uint8).ctypes.data
        self.size = len(self.mm)

    def array(self, offset: int, dtype, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.mm, dtype=dtype, count=n, offset=offset).reshape(shape)

    def release(self, arrays) -> int:
        """Drop the resident pages of these views (whole pages they touch); returns the bytes advised."""
        if not hasattr(self.mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        done = 0
        for a in arrays:
            start = a.ctypes.data - self._base
            if a.nbytes == 0 or start < 0 or start + a.nbytes > self.size:
                continue                                    # not a view of this map
            lo = start - start % mmap.PAGESIZE
            hi = min(self.size, -(-(start + a.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            done += hi - lo
        return done


def _map_safetensors(path: Path) -> tuple[dict[str, np.ndarray], FileMap]:
    """Memory-map every tensor of a safetensors file, checking the header against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    base = 8 + n
    fm = FileMap(path)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise FormatError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != want or begin < 0 or base + end > size:
            raise FormatError(f"{path}: tensor {name} offsets [{begin}, {end}) do not fit its shape "
                              f"{shape} or the file ({size} bytes)")
        if want == 0:
            out[name] = np.zeros(shape, dtype)
            continue
        out[name] = fm.array(base + begin, dtype, shape)
    return out, fm


def read_packed(path: str | os.PathLike, *, verify: bool = True) -> PackedModel:
    """Load a packed directory. Raises FormatError on a wrong format, version or checksum."""
    d = Path(path)
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"{d}: no config.json (not a packed model directory)") from None
    except ValueError as e:
        raise FormatError(f"{d}/config.json: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise FormatError(f"{d}: not an anybit packed model (format {config.get('format')!r})")
    if config.get("version") not in READABLE:
        raise FormatError(f"{d}: packed format version {config.get('version')!r}; this anybit reads "
                          f"versions {', '.join(map(str, READABLE))}: re-pack the model with `python -m tools.pack`")
    st = d / "model.safetensors"
    if not st.is_file():
        raise FormatError(f"{d}: model.safetensors is missing")
    if verify and sha256_file(st) != config.get("sha256"):
        raise FormatError(f"{st}: checksum mismatch (file corrupted or modified); re-pack the model")
    try:
        tokenizer_json = (d / "tokenizer.json").read_text()
    except FileNotFoundError:
        raise FormatError(f"{d}: tokenizer.json is missing") from None
    arrays, fm = _map_safetensors(st)
    cfg = ModelConfig.from_dict(config["model"])
    tensors: dict[str, np.ndarray | PackedLinear] = {}
    info = {}
    for name, meta in config.get("tensors", {}).items():
        try:
            sub = None
            if meta.get("sub"):
                sm = meta["sub"]
                f = {k: arrays.pop(f"{name}.{k}", None) for k in _SUB_FIELDS}
                sub = SubScales(f["d"], f["sc"], f["dmin"], f["m"], float(sm["c0"]), int(sm["G"]), int(sm["S"]),
                                bool(sm.get("nib")))
            tensors[name] = PackedLinear(arrays.pop(f"{name}.planes"),
                                         None if sub else arrays.pop(f"{name}.scales"),
                                         None if sub else arrays.pop(f"{name}.offsets", None), int(meta["bits"]),
                                         int(meta["group"]), int(meta["K"]), int(meta["N"]),
                                         arrays.pop(f"{name}.smooth", None), int(meta.get("rotate") or 0), sub)
        except KeyError as e:
            raise FormatError(f"{st}: packed tensor {name} lacks {e}") from None
        info[name] = {k: meta.get(k) for k in ("bits", "group", "exact", "rel_err", "source_type")}
        info[name]["rotate"] = int(meta.get("rotate") or 0)
    tensors.update(arrays)
    return PackedModel(cfg, tensors, tokenizer_json, config.get("recipe", {}), info, mapping=fm)
