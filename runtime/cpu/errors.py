"""The C kernels' return codes as exceptions (CpuKernelError, under loader.errors.AnybitError)."""
from __future__ import annotations

from loader.errors import AnybitError

_ERRORS = {-1: "out of memory", -2: "instruction set not available on this CPU", -3: "bad arguments"}


class CpuKernelError(AnybitError, RuntimeError):
    """A C kernel refused its arguments or failed; carries the return code and the kernel's name."""

    def __init__(self, rc: int, what: str):
        self.rc, self.kernel = int(rc), what
        super().__init__(f"CPU kernel {what} failed: {_ERRORS.get(rc, rc)}")


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise CpuKernelError(rc, what)
