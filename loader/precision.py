"""Bit widths: the one rule for a precision value (weights or activations), and its parser for CLIs.

A precision is 1..8 bits (bipolar codes) or 16 (unquantized: float weights, or 16-bit activations)."""
from __future__ import annotations

import argparse

BITS = tuple(range(1, 9)) + (16,)


def check_bits(v, what: str = "bits") -> int:
    """v as an int when it is 1..8 or 16, else ValueError naming `what`."""
    try:
        b = int(v)
    except (TypeError, ValueError):
        b = None
    if b is None or b != v or b not in BITS:
        raise ValueError(f"{what} must be 1..8 or 16, got {v!r}")
    return b


def parse_bits(s: str) -> int:
    """argparse type: "4" -> 4; anything else than 1..8 or 16 is a usage error (exit 2)."""
    try:
        return check_bits(int(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1..8 or 16, got {s!r}") from None
