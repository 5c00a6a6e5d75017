"""Errors of the runtime layer, under the common root loader.errors.AnybitError. Importable without
cuda-python or a GPU."""
from loader.errors import AnybitError


def human_bytes(n: int) -> str:
    """1536 -> '1.50 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class CudaError(AnybitError, RuntimeError):
    """A CUDA driver call failed: carries the CUresult code, its name and the call."""

    def __init__(self, code: int, name: str, call: str, detail: str = ""):
        self.code, self.name, self.call, self.detail = int(code), name, call, detail
        msg = f"{call} failed: {name} ({int(code)})"
        super().__init__(msg + (f"\n{detail}" if detail else ""))


class NoGpuError(AnybitError, RuntimeError):
    """No usable GPU: no driver library, no device, or cuda-python missing. Callers fall back to CPU."""


class OutOfMemoryError(AnybitError, MemoryError):
    """The pool could not satisfy an allocation even after freeing its cache."""

    def __init__(self, size: int, used: int, limit: int | None):
        self.size, self.used, self.limit = size, used, limit
        lim = "no limit" if limit is None else human_bytes(limit)
        super().__init__(f"out of device memory: requested {human_bytes(size)}, "
                         f"{human_bytes(used)} in use, limit {lim}")
