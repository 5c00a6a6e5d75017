"""Machine description stored in every result: which hardware and software produced the numbers.

The `kind` field names the machine type in result file names and README tables (e.g. cpu-amd-epyc-2c,
nvidia-h100-80gb-hbm3); ANYBIT_BENCH_MACHINE overrides it.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata

from tools.bench.stats import REPO

_LIBS = ("numpy", "cffi", "cuda-python", "matplotlib", "torch", "cupy", "llama_cpp_python")


def _cpuinfo() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return info
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        info["model"] = m.group(1).strip()
    f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if f:
        # only the flags that decide which kernel path runs: the whole list is noise
        keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vpopcntdq",
                "avx512_bitalg", "avx512vbmi", "avx512_vbmi", "amx_tile", "amx_int8", "neon", "asimd")
        have = set(f.group(1).split())
        info["flags"] = [k for k in keep if k in have]
    cores = set(re.findall(r"^core id\s*:\s*(\d+)", text, re.M))
    info["physical_cores_per_socket"] = len(cores) or None
    return info


def _mem_total() -> int | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git() -> dict:
    def run(*a):
        try:
            r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _gpu() -> dict | None:
    """Name, arch and driver of GPU 0 through our own driver wrapper; None without a usable GPU."""
    try:
        from runtime import driver
        if not driver.available():
            return None
        p = driver.query_props(0)
        v = p.driver_version
        return {"name": p.name, "arch": p.arch, "sm_count": p.sm_count, "memory_bytes": p.total_mem,
                "driver_cuda_version": f"{v // 1000}.{v % 1000 // 10}"}
    except Exception as e:                                      # a broken driver must not stop a CPU run
        return {"error": f"{type(e).__name__}: {e}"}


def slug(text: str) -> str:
    s = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core", " ", text.lower())
    s = re.sub(r"@.*$", "", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def describe(threads: int | None = None, gpu: bool = True) -> dict:
    cpu = _cpuinfo()
    g = _gpu() if gpu else None
    if os.environ.get("ANYBIT_BENCH_MACHINE"):
        kind = slug(os.environ["ANYBIT_BENCH_MACHINE"])
    elif g and g.get("name"):
        kind = slug(g["name"])
    else:
        kind = f"cpu-{slug(cpu['model'])}-{os.cpu_count()}c"
    return {
        "kind": kind,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": {"model": cpu["model"], "logical_cores": os.cpu_count(),
                "physical_cores_per_socket": cpu.get("physical_cores_per_socket"),
                "arch": platform.machine(), "flags": cpu["flags"]},
        "memory_bytes": _mem_total(),
        "gpu": g,
        "threads": threads,
        "versions": _versions(),
        "git": _git(),
        "argv": sys.argv[1:],
    }


def load_average() -> list[float] | None:
    """1/5/15 minute load: a loaded machine explains noisy numbers."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _busy_ticks() -> int | None:
    """Clock ticks all CPUs spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def _proc_ticks(pid: int) -> int | None:
    """Clock ticks process `pid` (all its threads) has run: utime + stime of /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[11]) + int(rest[12])


def cpu_mark(pid: int):
    """A mark for other_cores: (wall time, busy ticks of the machine, ticks of `pid`)."""
    import time
    return time.perf_counter(), _busy_ticks(), _proc_ticks(pid)


def other_cores(mark, pid: int) -> float | None:
    """Cores that processes other than `pid` kept busy since `mark` (cpu_mark), on average: 0 when the
    timed process had the machine to itself; on 2 cores, 1.0 means that half of the machine was taken
    (another engine spinning, a test suite). None where /proc is not there."""
    t1, b1, p1 = cpu_mark(pid)
    t0, b0, p0 = mark
    if None in (b0, b1, p0, p1) or t1 <= t0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return round(max(0.0, ((b1 - b0) - (p1 - p0)) / hz / (t1 - t0)), 3)
