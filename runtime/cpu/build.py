"""Compile the C kernels with cffi (API mode) on first use, into a content-addressed cache.

The cache key is the SHA-256 of every source file, the compiler flags and the Python ABI tag, so an
edited kernel or another interpreter gets its own build. Each build happens in a private temporary
directory that is renamed into place, so concurrent processes never see a half-written module: the
loser of a rename race simply uses the winner's identical result.
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
SOURCES = ("threadpool.c", "kernels_linear.c", "kernels_ops.c", "kernels_graph.c", "kernels_int8.c",
           "kernels_quant.c", "kernels_attn.c", "kernels_kq.c", "kernels_q8.c",
           "kernels_decode.c", "kernels_batch.c")
HEADERS = ("anybit_cpu.h", "ab_internal.h", "ab_i8.h")
# No -march=native: ISA-specific functions carry target attributes and are chosen at run time.
# No -ffast-math: the activation quantizer must round exactly like NumPy. No FMA contraction: the
# quantized-activation recovery (kernels_quant.c) must round identically on every isa path.
CFLAGS = ["-O3", "-fPIC", "-pthread", "-std=gnu11", "-fno-strict-aliasing", "-ffp-contract=off"]
LDFLAGS = ["-pthread", "-lm"]
MODULE = "_anybit_cpu"

_lib = None


def cache_root() -> Path:
    from loader.fetch import cache_dir
    return cache_dir() / "cpu"


def build_key() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    h.update(repr((CFLAGS, LDFLAGS, sys.implementation.cache_tag,
                   sysconfig.get_config_var("EXT_SUFFIX"))).encode())
    return h.hexdigest()


def _find_module(d: Path) -> Path | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    p = d / (MODULE + suffix)
    return p if p.exists() else None


def _compile(dest: Path) -> None:
    try:
        import cffi
    except ImportError as e:  # pragma: no cover - cffi is a declared dependency
        raise RuntimeError("the CPU backend needs the 'cffi' package (pip install cffi)") from e
    if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")):
        raise RuntimeError("no C compiler found: install gcc (e.g. apt-get install gcc) or clang, "
                           "or set CC, to build the anybit CPU backend")
    ffi = cffi.FFI()
    ffi.cdef((HERE / "anybit_cpu.h").read_text())
    ffi.set_source(MODULE, '#include "anybit_cpu.h"',
                   sources=[str(HERE / s) for s in SOURCES], include_dirs=[str(HERE)],
                   extra_compile_args=CFLAGS, extra_link_args=LDFLAGS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        try:
            ffi.compile(tmpdir=str(tmp), verbose=bool(os.environ.get("ANYBIT_CPU_VERBOSE")))
        except Exception as e:
            raise RuntimeError(f"building the anybit CPU backend failed ({type(e).__name__}: {e}); "
                               "a working C compiler (gcc or clang) is required") from e
        try:
            os.rename(tmp, dest)
        except OSError:
            if _find_module(dest) is None:   # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load():
    """(ffi, lib) of the compiled module, building it if this source version has no cached build."""
    global _lib
    if _lib is not None:
        return _lib
    dest = cache_root() / build_key()
    path = _find_module(dest)
    if path is None:
        _compile(dest)
        path = _find_module(dest)
        if path is None:
            raise RuntimeError(f"the anybit CPU backend build left no module in {dest}")
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _lib = (mod.ffi, mod.lib)
    return _lib


if __name__ == "__main__":
    ffi, lib = load()
    print("built", cache_root() / build_key(), "isa mask", lib.ab_isa_available())
