"""Fixed English texts that ship with Python: one for evaluation, a disjoint one for calibration.

Both come from the standard library of the running interpreter, so no data file is downloaded and the
two never overlap: the evaluation text is the Zen of Python, the calibration text is made of module
docstrings (heapq, difflib, argparse).
"""
from __future__ import annotations

import contextlib
import io


def eval_text() -> str:
    """The Zen of Python (module `this` stores it rot13-encoded and prints it on import)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(ch, ch) for ch in this.s)


def calibration_text() -> str:
    import argparse
    import difflib
    import heapq
    return "\n\n".join((m.__doc__ or "").strip() for m in (heapq, difflib, argparse))
