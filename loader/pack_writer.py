"""Write a packed directory (loader/packed.py's format) as it is produced, one tensor at a time.

safetensors is an 8-byte little-endian header length, a JSON header of every tensor's dtype, shape and
byte range, then the raw bytes. A packer knows every shape before it reads any weight (loader.pack.plan_model),
so the header is written first and each tensor's bytes follow as soon as it is packed, hashed on the way
(the config's SHA-256 costs no second read) and then dropped: the peak memory of packing a 7B model is one
tensor's work, not the packed model twice over as with one in-memory save_file. The ranges are contiguous
and in file order, as the safetensors library requires of a file it loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from loader.bipolar import PackedLinear
from loader.errors import FormatError
from loader.safe_write import clean_stale, make_temp, replace_dir, storage_error

_PARTS = (".planes", ".scales", ".offsets", ".smooth", ".d", ".sc", ".dmin", ".m")

_NP = {"F32": np.dtype("<f4"), "U32": np.dtype("<u4"), "F16": np.dtype("<f2"), "I32": np.dtype("<i4"),
       "U8": np.dtype("u1"), "I8": np.dtype("i1")}
_ST = {v: k for k, v in _NP.items()}       # numpy dtype -> safetensors name


class PackedWriter:
    """entries: (key, dtype, shape) in file order. add() each array in that order, then finish(config).

    Writes never destroy (loader/safe_write.py): out_dir is checked first (only a packed or empty
    directory is replaced, anything else needs force, never the source); the file grows in a
    `.NAME.tmp-PID-*` directory that replaces out_dir only when everything is written, and temporaries
    of writers that died are removed before a new one starts."""

    def __init__(self, out_dir, entries: list[tuple[str, str, tuple]], *, force: bool = False):
        from loader.packed import PACKED_FILES, check_out_dir
        self.out = check_out_dir(out_dir, force=force)
        header, pos = {}, 0
        for key, dtype, shape in entries:
            n = int(np.prod(shape, dtype=np.int64)) * _NP[dtype].itemsize
            header[key] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + n]}
            pos += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)          # data starts 8-byte aligned (spaces are valid JSON)
        self.entries = list(entries)
        self.next = 0
        self.f = None
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.out.parent, self.out.name, PACKED_FILES)   # what killed writers of it left
            self.tmp = make_temp(self.out)
        except OSError as e:
            raise storage_error(e, self.out) from None
        try:
            self.f = open(self.tmp / "model.safetensors", "wb")
            self.sha = hashlib.sha256()
            self._put(len(blob).to_bytes(8, "little") + blob)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise storage_error(e, self.out) from None
            raise

    def _put(self, b) -> None:
        try:
            self.f.write(b)
        except OSError as e:            # a full disk: one clear error, the temporary goes in abort()
            raise storage_error(e, self.out) from None
        self.sha.update(b)

    def add(self, key: str, a: np.ndarray) -> None:
        if self.next >= len(self.entries):
            raise RuntimeError(f"packed writer: {key} was not planned")
        want_key, dtype, shape = self.entries[self.next]
        if a.dtype != _NP[dtype] and a.dtype.kind != _NP[dtype].kind:     # never a silent int <-> float cast
            raise RuntimeError(f"packed writer: {key} is {a.dtype}, planned {dtype}")
        a = np.ascontiguousarray(a, _NP[dtype])
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FormatError(f"tensor {key.rsplit('.', 1)[0] if key.endswith(_PARTS) else key!r}: NaN or "
                              "infinite values in its weights (or the quantization parameters made from them); "
                              "the source is damaged, nothing was written")
        if key != want_key or tuple(a.shape) != tuple(shape):
            raise RuntimeError(f"packed writer: got {key} {a.shape}, planned {want_key} {tuple(shape)} "
                               "(loader.pack.TensorPlan.arrays disagrees with what was packed)")
        self._put(memoryview(a).cast("B"))
        self.next += 1

    def add_tensor(self, name: str, t) -> None:
        for key, arr in tensor_arrays(name, t):
            self.add(key, arr)

    def finish(self, config: dict, tokenizer_json: str) -> Path:
        """Write tokenizer.json and config.json (with the file's SHA-256) and rename into place; an
        existing directory is replaced only now."""
        if self.next != len(self.entries):
            raise RuntimeError(f"packed writer: {len(self.entries) - self.next} planned tensors never came")
        from loader.packed import config_digest
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            (self.tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            config = dict(config, sha256=self.sha.hexdigest())
            config["config_sha256"] = config_digest(config)      # the config itself is covered too
            (self.tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
            replace_dir(self.tmp, self.out)
        except OSError as e:
            raise storage_error(e, self.out) from None
        return self.out

    def abort(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def tensor_arrays(name: str, t) -> list[tuple[str, np.ndarray]]:
    """The file keys and arrays one model tensor is stored as (the order TensorPlan.arrays plans)."""
    if not isinstance(t, PackedLinear):
        return [(name, t)]
    out = [(f"{name}.planes", t.planes)]
    if t.sub is not None:               # the source's own bytes: float16 d / dmin, 8-bit sub-scales
        from loader.packed import SUB_FIELDS
        out += [(f"{name}.{f}", getattr(t.sub, f)) for f in SUB_FIELDS if getattr(t.sub, f) is not None]
    else:
        out.append((f"{name}.scales", t.scales))
        if t.offsets is not None:
            out.append((f"{name}.offsets", t.offsets))
    if t.smooth is not None:
        out.append((f"{name}.smooth", t.smooth))
    return out


def tensor_meta(t: PackedLinear, meta: dict) -> dict:
    out = {"bits": t.bits, "group": t.group, "K": t.K, "N": t.N,
           "offsets": t.sub is not None or t.offsets is not None,        # (t.offsets would compute them)
           "smooth": t.smooth is not None, "exact": bool(meta.get("exact", False)), "rel_err": meta.get("rel_err"),
           "source_type": meta.get("source_type"), "rotate": t.rotate}
    if t.sub is not None:
        out["sub"] = {"G": t.sub.G, "S": t.sub.S, "c0": float(t.sub.c0), "nib": bool(t.sub.nib)}
    return out


def packed_config(model_config, recipe: dict, tensors: dict[str, dict]) -> dict:
    """Version 4 only when a tensor has two-level parameters: other models stay readable by version-3
    readers."""
    from loader.packed import FORMAT, VERSION
    version = VERSION if any(m.get("sub") for m in tensors.values()) else 3
    return {"format": FORMAT, "version": version, "architecture": model_config.arch,
            "model": model_config.to_dict(), "recipe": recipe, "tensors": tensors}


def write_model(model, out_dir, *, force: bool = False) -> Path:
    """An in-memory PackedModel to a packed directory (loader.packed.write_packed)."""
    entries = [(k, _ST.get(a.dtype, "F32"), a.shape)
               for n, t in model.tensors.items() for k, a in tensor_arrays(n, t)]
    w = PackedWriter(out_dir, entries, force=force)
    try:
        meta = {}
        for name, t in model.tensors.items():
            w.add_tensor(name, t)
            if isinstance(t, PackedLinear):
                meta[name] = tensor_meta(t, model.info.get(name, {}))
        return w.finish(packed_config(model.config, model.recipe, meta), model.tokenizer_json)
    except BaseException:
        w.abort()
        raise


def pack_to_dir(src, recipe, out_dir, *, smooth=None, hessians=None, progress=None,
                force: bool = False) -> tuple[Path, dict, float]:
    """Pack `src` by `recipe` into directory `out_dir`, writing each tensor as soon as it is packed.
    -> (the directory, per-linear info as PackedModel.info, seconds). Nothing is left under out_dir (or
    replaced there) when it fails or is interrupted."""
    from loader.pack import iter_packed, plan_model
    t0 = time.perf_counter()
    plans = plan_model(src, recipe, smooth)
    w = PackedWriter(out_dir, [e for p in plans for e in p.arrays()], force=force)
    try:
        info, meta = {}, {}
        for plan, packed, m in iter_packed(src, recipe, plans, hessians=hessians, progress=progress):
            w.add_tensor(plan.name, packed)
            if m is not None:
                info[plan.name] = m
                meta[plan.name] = tensor_meta(packed, m)
            del packed
        out = w.finish(packed_config(src.config, recipe.to_dict(), meta), src.tokenizer_json)
    except BaseException:
        w.abort()
        raise
    return out, info, time.perf_counter() - t0
