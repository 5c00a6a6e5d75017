"""Pick the backend for `--device cpu|cuda|auto`."""
from __future__ import annotations

import sys

from runtime.errors import NoGpuError

DEVICES = ("cpu", "cuda", "auto", "numpy")   # "numpy": the reference backend, for checks


def _cpu(threads):
    try:
        from runtime.cpu.backend import CpuBackend
    except ImportError:                               # the C backend is not built in this checkout
        CpuBackend = None
    if CpuBackend is not None:
        try:
            return CpuBackend(threads=threads)
        except RuntimeError as e:                     # e.g. no C compiler: say so, run in NumPy
            print(f"anybit: C backend unavailable ({e}); using the NumPy backend", file=sys.stderr)
    from runtime.numpy_backend import NumpyBackend
    return NumpyBackend(threads)


def _cuda(threads):
    from runtime import driver
    if not driver.available():
        raise NoGpuError("no usable NVIDIA GPU (no driver, no device, or cuda-python missing)")
    from runtime.gpu_backend import GpuBackend
    return GpuBackend()


def select_backend(device: str = "auto", threads: int | None = None):
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return _cpu(threads)
    if device == "numpy":
        from runtime.numpy_backend import NumpyBackend
        return NumpyBackend(threads)
    if device == "cuda":
        return _cuda(threads)
    try:
        return _cuda(threads)
    except (NoGpuError, ImportError):
        return _cpu(threads)
