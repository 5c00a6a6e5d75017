"""commands: the wall time and peak memory of each command the README lists, as a user runs them.

Each command runs as its own process (peak RSS from wait4). `first` rows run on a packed cache that is
empty (the compiled C modules and the fetched default models are shared: installed once), `again` rows
right after on the cache the first run filled, which is what every later run costs.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from tools.bench import machine
from tools.bench.firstuse import _env, run_timed
from tools.bench.stats import print_table, report_and_save

GEN = [sys.executable, "-m", "engine.generate"]
COMMANDS = [   # (label, argv after the interpreter, runs twice: first use then cached)
    ('generate "The capital of France is" --max-tokens 40',
     GEN + ["The capital of France is", "--max-tokens", "40"], True),
    ('generate "Write a haiku about bits" --chat ... --temperature 0.7 --seed 1',
     GEN + ["Write a haiku about bits", "--chat", "--wbits", "4", "--abits", "16", "--temperature", "0.7",
            "--seed", "1"], False),
    ('generate "Hello" --wbits 8 --abits 8 --group 32 --json',
     GEN + ["Hello", "--wbits", "8", "--abits", "8", "--group", "32", "--json"], True),
    ('generate "Hello" --wbits 8 --abits 8 --group 128 --agroup token',
     GEN + ["Hello", "--wbits", "8", "--abits", "8", "--group", "128", "--agroup", "token"], True),
    ('embed "a cat sits on the mat" "a dog lies on the rug" --similarity',
     [sys.executable, "-m", "engine.embed", "a cat sits on the mat", "a dog lies on the rug", "--similarity"], True),
    ("tools.pack default packed-w2 --wbits 2", [sys.executable, "-m", "tools.pack", "default", "{tmp}/packed-w2",
                                                "--wbits", "2"], False),
    ('generate "Hello" --model packed-w2', GEN + ["Hello", "--model", "{tmp}/packed-w2"], False),
]


def _shared_cache(real: Path) -> Path:
    """A cache with the installed parts of `real` (compiled modules, fetched models) and no packed models."""
    d = Path(tempfile.mkdtemp(prefix="anybit-commands-"))
    for p in real.iterdir():
        if p.name not in ("packed", "bench"):
            (d / p.name).symlink_to(p)
    return d


def run(a) -> dict:
    from loader.fetch import cache_dir
    threads = a.threads
    cache = _shared_cache(cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix="anybit-commands-out-"))
    rows = []
    try:
        for label, argv, twice in COMMANDS:
            argv = [x.replace("{tmp}", str(tmp)) for x in argv]
            for phase in (("first", "again") if twice else ("once",)):
                r = run_timed(argv, _env(threads, cache))
                rows.append({"command": label, "phase": phase, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                             "peak_rss_bytes": r["peak_rss_bytes"], "status": r["status"],
                             "output": r["stdout"].strip()[:200]})
                print(f"  {phase:5s} {r['wall_s']:6.1f} s {r['peak_rss_bytes'] / 2**20:6.0f} MiB  {label}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bench": "commands", "schema": 1, "machine": machine.describe(threads), "threads": threads,
            "rows": rows, "note": "one process per command; the machine may be shared",
            "load_avg_end": os.getloadavg()}


def print_report(doc: dict) -> None:
    print(f"\nREADME commands on {doc['machine']['kind']} (ANYBIT_THREADS={doc['threads']})")
    print_table(["command", "run", "seconds", "CPU s", "peak RSS MiB", "status"],
                [[r["command"], r["phase"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                  f"{r['peak_rss_bytes'] / 2**20:.0f}", r["status"]]
                 for r in doc["rows"]])


def add_args(ap) -> None:
    ap.add_argument("--threads", type=int, default=2, help="ANYBIT_THREADS and BLAS threads (default 2)")


def main(a) -> int:
    return report_and_save(a, run(a), "commands", print_report)
