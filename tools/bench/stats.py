"""Timing statistics and the result files: every figure is a median with its spread, never one sample.

Two candidates measured in the same run are timed alternately (round robin), so that a load that other
processes put on the machine hits both sides alike instead of whichever ran during the busy second.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench" / "results"
SCHEMA = 1        # bump when a field changes meaning; readers check it


def summarize(samples) -> dict:
    """median, min, max, q1, q3 and the count of a list of samples (seconds, or any figure)."""
    a = np.asarray(list(samples), np.float64)
    if a.size == 0:
        raise ValueError("summarize() needs at least one sample")
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "min": float(a.min()), "max": float(a.max()), "q1": float(q1),
            "q3": float(q3), "n": int(a.size)}


def calibrate(fn: Callable[[], object], target_s: float) -> int:
    """How many back-to-back calls make one sample of about target_s (timer resolution, call overhead)."""
    fn()                                                      # warm-up: first-call caches, page faults
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(target_s / one))


def alternate(cands: dict[str, Callable[[], object]], *, reps: int, min_time: float,
              sample_s: float = 0.01) -> dict[str, list[float]]:
    """Seconds per call of each candidate, sampled in rounds (A, B, C, A, B, C, ...).

    At least `reps` rounds and at least `min_time` seconds in total; each sample runs a candidate
    `inner` times back to back (calibrated) and records the mean of that batch.
    """
    inner = {k: calibrate(f, sample_s) for k, f in cands.items()}
    out: dict[str, list[float]] = {k: [] for k in cands}
    t_start, rounds = time.perf_counter(), 0
    while rounds < reps or time.perf_counter() - t_start < min_time:
        for k, f in cands.items():
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            out[k].append((time.perf_counter() - t0) / n)
        rounds += 1
        if rounds >= 200:                                      # enough for any median
            break
    return out


def result_path(kind: str, machine: dict, when: datetime | None = None, directory: Path | None = None) -> Path:
    """bench/results/<kind>-<machine kind>-<YYYYmmdd-HHMM>.json (UTC), a free name (free_path)."""
    when = when or datetime.now(timezone.utc)
    return free_path((directory or RESULTS_DIR) / f"{kind}-{machine['kind']}-{when.strftime('%Y%m%d-%H%M')}.json")


def free_path(path: Path) -> Path:
    """path, or path with -2, -3, ... before its suffix when it exists: a second run in the same minute
    must not overwrite the first one's record."""
    path, n = Path(path), 2
    free = path
    while free.exists():
        free, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return free


def write_result(doc: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def report_and_save(a, doc: dict, bench: str, print_report) -> int:
    """The end of every measuring command: print the table, write the JSON unless --no-save."""
    print_report(doc)
    if not a.no_save:
        print(f"wrote {write_result(doc, result_path(bench, doc['machine'], directory=a.out))}")
    return 0


def load_results(directory: Path | None = None) -> list[dict]:
    """Every result file in the directory (oldest first by recorded date), with its path added."""
    docs = []
    for p in sorted((directory or RESULTS_DIR).glob("*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable result file ({e})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA or "bench" not in d:
            continue                                            # some other JSON: not ours
        d["_path"] = str(p)
        docs.append(d)
    docs.sort(key=lambda d: d.get("machine", {}).get("date", ""))
    return docs


def latest(docs: list[dict], bench: str) -> dict[str, dict]:
    """The newest result of one bench per machine kind."""
    out: dict[str, dict] = {}
    for d in docs:
        if d["bench"] == bench:
            out[d["machine"]["kind"]] = d                      # docs are sorted: the last one wins
    return out


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    """'median (min-max)' of a summary, scaled."""
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def print_table(headers: list[str], rows: list[list], file=None) -> None:
    """A plain aligned text table (the terminal view; the README gets Markdown from readme.py)."""
    cells = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w[i]) if i else h.ljust(w[i]) for i, h in enumerate(headers))
    print(line, file=file)
    print("-" * len(line), file=file)
    for r in cells:
        print("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)), file=file, flush=True)
