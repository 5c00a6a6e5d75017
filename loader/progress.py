"""Progress of long steps and the packing summary, on stderr.

On a terminal: one bar redrawn in place. Anywhere else (a log file, a pipe, a CI job, a notebook cell)
one line every few seconds with the fraction done, the rate and the time left: before this a first use
that packed for minutes printed nothing at all when stderr was captured. ANYBIT_PROGRESS_EVERY sets the
seconds between those lines (default 3).
"""
from __future__ import annotations

import os
import sys
import time


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ANYBIT_PROGRESS_EVERY", "3")))
    except ValueError:
        return 3.0


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class Progress:
    """progress(done, total, what): `label` with done/total units (weights by default) of a step."""

    def __init__(self, label: str, unit: str = "weights", stream=None, tty: bool | None = None):
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = 0.1 if self.tty else _interval()
        self.t0 = time.perf_counter()
        self.last = None                    # time of the last line or redraw
        self.started = False

    def line(self, done: float, total: float, what: str) -> str:
        frac = done / total if total else 1.0
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        left = (total - done) / rate if rate > 0 else float("nan")
        eta = f", {left:.0f} s left" if rate > 0 and done < total else ""
        return (f"{self.label}: {100 * frac:3.0f}% of {_count(total)} {self.unit}, "
                f"{_count(rate)} {self.unit}/s{eta} ({what[:32]})")

    def __call__(self, done: float, total: float, what: str = "") -> None:
        now = time.perf_counter()
        end = done >= total
        if not self.started:
            self.started = True
            self.t0 = now
            if not self.tty:                # say at once that something long has begun
                self.stream.write(f"{self.label}: {_count(total)} {self.unit} ...\n")
                self.stream.flush()
            self.last = now
            if not end:
                return
        if not end and now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            width = 24
            fill = int(width * (done / total if total else 1))
            text = f"\r{self.line(done, total, what)} [{'#' * fill}{'.' * (width - fill)}]"
            self.stream.write(text + ("\n" if end else ""))
        else:
            self.stream.write(self.line(done, total, "done" if end else what) + "\n")
        self.stream.flush()


def summary(info: dict[str, dict], seconds: float, packed_bytes: int, src_bytes: int | None = None) -> str:
    """What a packing did: per source type and precision how many linears were imported exactly and how
    many rounded, with the rounded ones' relative weight error (mean, worst and where)."""
    exact: dict[str, int] = {}
    rounded: dict[str, int] = {}
    for m in info.values():
        key = f"{m.get('source_type') or 'float'} -> W{m['bits']} G{m['group']}"
        key += " rotated" if m.get("rotate") else ""
        book = exact if m["exact"] else rounded
        book[key] = book.get(key, 0) + 1
    size = f"{src_bytes / 2**20:.1f} MiB source -> " if src_bytes else ""
    lines = [f"packed {len(info)} linear tensors in {seconds:.1f} s ({size}{packed_bytes / 2**20:.1f} MiB packed)"]
    lines.append("  exact (lossless): " + (", ".join(f"{n} {k}" for k, n in exact.items()) or "none"))
    errs = sorted(((m["rel_err"] or 0.0, n) for n, m in info.items() if not m["exact"]), reverse=True)
    if errs:
        mean = sum(e for e, _ in errs) / len(errs)
        lines.append("  rounded: " + ", ".join(f"{n} {k}" for k, n in rounded.items())
                     + f"; relative weight error mean {mean:.4f}, worst {errs[0][0]:.4f} ({errs[0][1]})")
    else:
        lines.append("  rounded: none")
    return "\n".join(lines)
