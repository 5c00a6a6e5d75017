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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loader.bipolar import PackedLinear
from loader.errors import FormatError
from loader.kquant import SubScales
from loader.safe_write import check_destination, clean_stale, make_temp, replace_dir, storage_error
from loader.source import ModelConfig, expected_shapes
from loader.validate import (PACKED_SCHEMA, check_model_config, check_object, check_packed_tensor, load_json,
                             read_safetensors_header)


@dataclass
class PackedModel:
    config: ModelConfig
    tensors: dict[str, np.ndarray | PackedLinear]
    tokenizer_json: str
    recipe: dict
    info: dict[str, dict] = field(default_factory=dict)   # per linear: bits, group, exact, rel_err
    mapping: object = None      # loader.packed.FileMap when the tensors are views of a mapped file

    def release_pages(self, names) -> int:
        """After a backend has made its own copies of these tensors: let the OS take back the resident
        pages of their mapped file data (loader.packed.FileMap.release; nothing is lost). Returns bytes."""
        if self.mapping is None:
            return 0
        arrays = []
        for n in names:
            t = self.tensors.get(n)
            if isinstance(t, PackedLinear):
                params = ((t.sub.d, t.sub.sc, t.sub.dmin, t.sub.m) if t.sub is not None   # (never computed)
                          else (t.scales, t.offsets))
                arrays += [a for a in (t.planes, *params, t.smooth) if a is not None]
            elif isinstance(t, np.ndarray):
                arrays.append(t)
        return self.mapping.release(arrays)

    def linear(self, name: str) -> np.ndarray | PackedLinear:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"packed model has no tensor {name!r}") from None

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


FORMAT = "anybit-packed"
# 2 added a per-tensor "rotate" (loader/rotation.py); 3 adds "config_sha256", a checksum of config.json
# itself, so that an edited field (n_layers, K) is refused instead of silently changing the model; 4 adds
# two-level parameters (a tensor's "sub" and its d / sc / dmin / m arrays, loader/kquant.py). A model is
# written as 4 only when it has a two-level tensor, so that older readers still take the others.
VERSION = 4
READABLE = (1, 2, 3, 4)
_DTYPES = {"F32": 4, "U32": 4, "F16": 2, "I32": 4, "U8": 1, "I8": 1}
_NP = {"F32": np.float32, "U32": np.uint32, "F16": np.float16, "I32": np.int32, "U8": np.uint8, "I8": np.int8}
SUB_FIELDS = ("d", "sc", "dmin", "m")      # two-level parameters (loader/kquant.py SubScales)


def is_packed_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_bytes().decode("utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_digest(config: dict) -> str:
    """sha256 of the config without its own checksum, in a canonical JSON form (sorted keys)."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


PACKED_FILES = {"model.safetensors", "tokenizer.json", "config.json"}


def check_out_dir(out, *, force: bool = False, source=None) -> Path:
    """Where a packed model may be written (loader/safe_write.py): nothing but a packed directory or an
    empty one is replaced unless force, never the source."""
    return check_destination(out, same_kind=is_packed_dir, kind="an anybit packed directory", force=force,
                             source=source)


def _check_finite(name: str, arrays) -> None:
    for a in arrays:
        if a is not None and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FormatError(f"tensor {name!r}: NaN or infinite values in its weights (or the quantization "
                              f"parameters made from them); the source is damaged, nothing was written")


def write_packed(model: PackedModel, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `model` to `out_dir` atomically. An existing packed (or empty) directory is replaced only on
    success; anything else at out_dir is refused unless force. Temporaries of writers that died are
    removed first. (The writer is loader/pack_writer.py, which also streams a model to disk while it is
    packed.)"""
    from loader.pack_writer import write_model
    return write_model(model, out_dir, force=force)


class FileMap:
    """One read-only map of a file whose tensors are views of it.

    release(arrays) lets the OS take back this process's resident pages under some of those views, once a
    backend has made its own copies of them: they are clean file pages, so a later read faults them back
    in from the page cache and nothing is lost. Measured on a 7B-shaped model, the weights that stayed
    mapped after the backend had tiled them were 5 GB of the process's 12.5 GB peak."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        self._base = np.frombuffer(self.mm, np.uint8).ctypes.data
        self.size = len(self.mm)

    def array(self, offset: int, dtype, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.mm, dtype=dtype, count=n, offset=offset).reshape(shape)

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass

    def take(self, a: np.ndarray, ids) -> np.ndarray:
        """a[..., ids, :] for a view `a` of this map (rows along its next-to-last axis, each row contiguous),
        read with pread instead of through the mapping: the kernel maps a whole large folio of page cache
        around a touched byte, so gathering the 32 embedding rows of a prompt from the map made 54 MB of
        a 7B-shaped model's file resident. Other arrays are indexed as usual."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        start = a.ctypes.data - self._base
        if a.ndim < 2 or a.nbytes == 0 or start < 0 or start + a.nbytes > self.size or a.strides[-1] != a.itemsize:
            return a[..., ids, :]
        if len(ids) and (ids.min() < -a.shape[-2] or ids.max() >= a.shape[-2]):
            raise IndexError(f"row index out of range for {a.shape[-2]} rows")
        ids = ids % a.shape[-2] if len(ids) else ids
        out = np.empty(a.shape[:-2] + (len(ids), a.shape[-1]), a.dtype)
        row = a.shape[-1] * a.itemsize
        dst = memoryview(out.reshape(-1)).cast("B")
        offs = [int(r) * a.strides[-2] for r in ids]
        preadv = getattr(os, "preadv", None)
        at = 0
        for lead in np.ndindex(*a.shape[:-2]):
            base = start + sum(i * st for i, st in zip(lead, a.strides[:-2]))
            for o in offs:          # straight into out: a decode step gathers 8 planes x its rows
                if preadv is not None:
                    got = preadv(self.fd, [dst[at:at + row]], base + o)
                else:
                    buf = os.pread(self.fd, row, base + o)
                    got = len(buf)
                    dst[at:at + got] = buf
                if got != row:
                    raise OSError(f"short read of a mapped file ({got} of {row} bytes)")
                at += row
        return out

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
    """Memory-map every tensor of a safetensors file, its header checked first (loader/validate.py)."""
    entries, _ = read_safetensors_header(path, _DTYPES)
    fm = FileMap(path)
    out = {}
    for name, (dtype, shape, offset) in entries.items():
        if 0 in shape:
            out[name] = np.zeros(shape, _NP[dtype])
            continue
        out[name] = fm.array(offset, _NP[dtype], shape)
    return out, fm


def read_config(d: Path) -> dict:
    """A packed directory's config.json, checked: format, version, its own checksum (version 3), and
    every field's type and range (loader/validate.py), before any tensor is touched."""
    path = d / "config.json"
    if not path.is_file():
        raise FormatError(f"{d}: no config.json (not a packed model directory)")
    config = load_json(path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else None
        raise FormatError(f"{d}: not an anybit packed model (format {fmt!r})")
    if config.get("version") not in READABLE or isinstance(config.get("version"), bool):
        raise FormatError(f"{d}: packed format version {config.get('version')!r}; this anybit reads "
                          f"versions {', '.join(map(str, READABLE))}: re-pack the model with `python -m tools.pack`")
    check_object(config, PACKED_SCHEMA, str(path))
    if config["version"] >= 3 and config.get("config_sha256") != config_digest(config):
        raise FormatError(f"{path}: checksum mismatch (config.json was edited or damaged); re-pack the model")
    check_model_config(config["model"], f"{path}: model")
    for name, meta in (config.get("tensors") or {}).items():
        check_packed_tensor(meta, f"{path}: tensors[{name!r}]")
        if meta.get("sub") is not None and config["version"] < 4:
            raise FormatError(f"{path}: tensors[{name!r}] has two-level parameters (sub), which need format "
                              f"version 4, not {config['version']}")
    return config


def _check_shapes(st: Path, cfg: ModelConfig, tensors: dict) -> None:
    """Every tensor against the shape its model config implies, so that a packed value that loads but
    would fail (or read out of range) in the first forward is refused here, with its name."""
    expected = expected_shapes(cfg)
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            raise FormatError(f"{st}: unexpected tensor {name!r} for this {cfg.arch} model")
        got = (t.N, t.K) if isinstance(t, PackedLinear) else t.shape
        if tuple(got) != tuple(want):
            raise FormatError(f"{st}: tensor {name!r} has shape {list(got)}, the model config implies {list(want)}")
        if not isinstance(t, PackedLinear) and t.dtype != np.float32:
            raise FormatError(f"{st}: tensor {name!r} is {t.dtype}, expected float32")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FormatError(f"{st}: missing tensors {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def read_packed(path: str | os.PathLike, *, verify: bool = True) -> PackedModel:
    """Load a packed directory. Raises FormatError on a wrong format, version, field or checksum."""
    d = Path(path)
    config = read_config(d)
    st = d / "model.safetensors"
    if not st.is_file():
        raise FormatError(f"{d}: model.safetensors is missing")
    if verify and sha256_file(st) != config.get("sha256"):
        raise FormatError(f"{st}: checksum mismatch (file corrupted or modified); re-pack the model")
    tok_path = d / "tokenizer.json"
    try:
        tokenizer_json = tok_path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FormatError(f"{d}: tokenizer.json is missing") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{tok_path}: not valid UTF-8 (byte {e.start})") from None
    arrays, fm = _map_safetensors(st)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except FormatError as e:
        raise FormatError(f"{d / 'config.json'}: model: {e}") from None
    tensors: dict[str, np.ndarray | PackedLinear] = {}
    info = {}
    for name, meta in (config.get("tensors") or {}).items():
        try:
            sub = None
            if meta.get("sub") is not None:
                sm = meta["sub"]
                f = {k: arrays.pop(f"{name}.{k}", None) for k in SUB_FIELDS}
                if f["d"] is None:
                    raise KeyError(f"{name}.d")
                sub = SubScales(f["d"], f["sc"], f["dmin"], f["m"], float(sm["c0"]), int(sm["G"]), int(sm["S"]),
                                bool(sm.get("nib")))
            lin = PackedLinear(arrays.pop(f"{name}.planes"), None if sub else arrays.pop(f"{name}.scales"),
                               None if sub or not meta.get("offsets", True) else arrays.pop(f"{name}.offsets", None),
                               meta["bits"], meta["group"], meta["K"], meta["N"],
                               arrays.pop(f"{name}.smooth", None), int(meta.get("rotate") or 0), sub)
        except KeyError as e:
            raise FormatError(f"{st}: packed tensor {name} lacks {e}") from None
        except FormatError as e:
            raise FormatError(f"{st}: packed tensor {name}: {e}") from None
        if lin.smooth is not None and lin.smooth.shape != (lin.K,):
            raise FormatError(f"{st}: packed tensor {name}: smooth shape {lin.smooth.shape}, expected ({lin.K},)")
        if lin.sub is None and (lin.scales.dtype != np.float32
                                or (lin.offsets is not None and lin.offsets.dtype != np.float32)):
            raise FormatError(f"{st}: packed tensor {name}: scales and offsets must be float32")
        tensors[name] = lin
        info[name] = {k: meta.get(k) for k in ("bits", "group", "exact", "rel_err", "source_type")}
        info[name]["rotate"] = int(meta.get("rotate") or 0)
    tensors.update(arrays)
    _check_shapes(st, cfg, tensors)
    return PackedModel(cfg, tensors, tokenizer_json, config.get("recipe") or {}, info, mapping=fm)
