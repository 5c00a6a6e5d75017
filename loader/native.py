"""Build loader/pack_native.c with cffi on first use, into a content-addressed cache, and load it.

The same scheme as the CPU backend's build (runtime/cpu/build.py), kept apart so that packing never
imports the runtime: the key is the SHA-256 of the sources, the flags and the Python ABI; the build runs
in a private temporary directory renamed into place, so concurrent first uses never see half a module.

Without a C compiler (or with ANYBIT_PACK_NUMPY=1) `lib()` is None and loader/pack_ops.py packs with
the NumPy references instead: same results, slower.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE, HEADER = "pack_native.c", "pack_native.h"
# no -ffast-math, no FMA contraction: the float64 steps must round exactly as NumPy's (pack_native.c)
CFLAGS = ["-O3", "-fPIC", "-pthread", "-std=gnu11", "-ffp-contract=off"]
LDFLAGS = ["-pthread", "-lm"]
MODULE = "_anybit_pack"

_state: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("ANYBIT_CACHE") or Path.home() / ".cache" / "anybit") / "pack"


def build_key() -> str:
    h = hashlib.sha256()
    for name in (SOURCE, HEADER):
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    h.update(repr((CFLAGS, LDFLAGS, sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"))).encode())
    return h.hexdigest()[:32]


def _module_in(d: Path) -> Path | None:
    p = d / (MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    return p if p.exists() else None


def _compile(dest: Path) -> None:
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("\n".join(ln for ln in (HERE / HEADER).read_text().splitlines() if not ln.startswith("#include")))
    ffi.set_source(MODULE, f'#include "{HEADER}"', sources=[str(HERE / SOURCE)], include_dirs=[str(HERE)],
                   extra_compile_args=CFLAGS, extra_link_args=LDFLAGS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        ffi.compile(tmpdir=str(tmp), verbose=bool(os.environ.get("ANYBIT_CPU_VERBOSE")))
        try:
            os.rename(tmp, dest)
        except OSError:
            if _module_in(dest) is None:         # not a lost race with an identical build: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def lib():
    """(ffi, lib) of the compiled module, or None when it cannot be built (the NumPy paths then run)."""
    if os.environ.get("ANYBIT_PACK_NUMPY"):
        return None
    if "lib" in _state:
        return _state["lib"]
    result = None
    try:
        dest = _cache_dir() / build_key()
        path = _module_in(dest)
        if path is None:
            _compile(dest)
            path = _module_in(dest)
        if path is not None:
            spec = importlib.util.spec_from_file_location(MODULE, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            result = (mod.ffi, mod.lib)
    except Exception as e:                      # no compiler, no cffi, unwritable cache: NumPy instead
        print(f"anybit: the packer's C loops could not be built ({type(e).__name__}: {str(e)[:200]}); "
              "packing with NumPy (same result, slower)", file=sys.stderr)
    _state["lib"] = result
    return result
