"""Bit widths: the one rule for a precision value (weights or activations), and its parser for CLIs.

A precision is 1..8 bits (bipolar codes) or 16 (unquantized: float weights, or 16-bit activations). Weights
may also be "source": each tensor at its source type's own bits (a GGUF Q5_0 tensor at 5, Q6_K at 6, Q8_0
at 8; exact imports, loader/pack.py Recipe wbits 0). Activations may also be "q8": each linear's input
rounded to llama.cpp's 8-bit grid in the blocks its weight's source type pairs with (runtime/act_q8.py)."""
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


SOURCE = "source"
Q8 = "q8"


def _check_or_word(v, word: str, what: str, zero_means_word: bool = False):
    """check_bits, or `word` (any case, spaces around) as itself; 0 too when zero_means_word."""
    if isinstance(v, str) and v.strip().lower() == word or (zero_means_word and v == 0 and not isinstance(v, bool)):
        return word
    try:
        return check_bits(v, what)
    except ValueError:
        raise ValueError(f"{what} must be 1..8, 16 or {word!r}, got {v!r}") from None


def _parse_or_word(s: str, word: str):
    """parse_bits, or `word` (any case) as itself."""
    if s.strip().lower() == word:
        return word
    try:
        return check_bits(int(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1..8, 16 or {word!r}, got {s!r}") from None


def check_wbits(v, what: str = "wbits"):
    """Weight bits: 1..8 or 16 as an int, or "source" (0, tools.pack's other spelling of it, is "source")."""
    return _check_or_word(v, SOURCE, what, zero_means_word=True)


def parse_wbits(s: str):
    """argparse type of --wbits: 1..8, 16 or 'source' (each tensor at its source type's bits)."""
    return _parse_or_word(s, SOURCE)


def check_abits(v, what: str = "abits"):
    """Activation bits: 1..8 or 16 as an int, or "q8" (llama.cpp's 8-bit activation rounding, CPU only)."""
    return _check_or_word(v, Q8, what)


def parse_abits(s: str):
    """argparse type of --abits: 1..8, 16 or 'q8'."""
    return _parse_or_word(s, Q8)
