"""The C kernels' return codes as exceptions."""
from __future__ import annotations

_ERRORS = {-1: "out of memory", -2: "instruction set not available on this CPU", -3: "bad arguments"}


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"CPU kernel {what} failed: {_ERRORS.get(rc, rc)}")
