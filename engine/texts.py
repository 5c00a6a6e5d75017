"""Fixed English texts that ship with Python: one for evaluation, a disjoint one for calibration.

Both come from the standard library of the running interpreter, so no data file is downloaded and the
two never overlap: the evaluation text is the Zen of Python followed by the docstrings of pydoc, cmd,
sched and doctest (about 1,400 tokens: long enough that perplexity differences of a percent are not
noise), the calibration text the docstrings of heapq, difflib and argparse.
"""
from __future__ import annotations

import contextlib
import io


def zen() -> str:
    """The Zen of Python (module `this` stores it rot13-encoded and prints it on import)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(ch, ch) for ch in this.s)


def eval_text() -> str:
    import cmd
    import doctest
    import pydoc
    import sched
    return "\n\n".join([zen()] + [(m.__doc__ or "").strip() for m in (pydoc, cmd, sched, doctest)])


def calibration_text() -> str:
    import argparse
    import difflib
    import heapq
    return "\n\n".join((m.__doc__ or "").strip() for m in (heapq, difflib, argparse))
