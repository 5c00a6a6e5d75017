"""Pick the backend for `--device cpu|cuda|auto`."""
from __future__ import annotations

import sys

from runtime.errors import NoGpuError

DEVICES = ("cpu", "cuda", "auto", "numpy")
CUDA_VERIFIED = False       # flip once tools.gpu_report has passed on a GPU (see README, Status)   # "numpy": the reference backend, for checks


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
    # "auto" stays on the CPU until the CUDA backend has a recorded run on real hardware
    # (bench/results/gpu-report-*.json): a user should not meet an unverified path by default.
    if CUDA_VERIFIED:
        try:
            return _cuda(threads)
        except (NoGpuError, ImportError):
            pass
    else:
        try:
            from runtime import driver
            if driver.available():
                print("anybit: a GPU is present, but the CUDA backend is untested on hardware; running on "
                      "the CPU (pass --device cuda to use it)", file=sys.stderr)
        except ImportError:
            pass
    return _cpu(threads)
