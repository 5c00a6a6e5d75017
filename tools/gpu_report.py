"""`python -m tools.gpu_report --out DIR`: the whole GPU tier in one command that fits a short GPU loan.

The GPU machines this project borrows give one command at most 10 minutes, take 64 MiB of the working
tree, have no network, and return only the files written under an output folder. So:

- every step runs in its own process with its own time limit (a hang, a crash or a device fault ends
  that step only; the next one starts in a fresh process with a fresh CUDA context);
- the report (DIR/gpu-report.json), the step logs (DIR/gpu-report.log) and the GPU tests' junit file
  are written to DIR as each step finishes, and the report to bench/results/ too;
- steps run in order of value and the whole run keeps to a budget (default 420 s): kernels against the
  interpreter bit for bit, greedy tokens of the engine on the GPU against the host backends, the GPU
  test modules, then the benchmarks against cuBLAS (through torch) and decode at the default model's
  shapes. Models are random-weight, generated in the step: nothing to download or carry.

`--dry-run` runs the same steps here without a GPU: each runs against the PTX interpreter or says
why it is skipped; it prints the planned GPU command and its estimated time (estimates for an
H100/H200-class machine, not measurements). docs/GPU.md has the command to run on a GPU machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET = 420.0
LOG_STEP_MAX = 400_000          # bytes of one step's output kept in DIR/gpu-report.log

# name, function in tools.gpu_report_steps, time limit (s), estimated GPU-machine time (s), sync launches
STEPS = (
    ("device", "step_device", 60, 5, False),
    ("kernels", "step_kernels", 150, 40, True),
    ("engine", "step_engine", 150, 50, True),
    ("pytest", "step_pytest", 180, 60, True),
    ("bench-kernels", "step_bench_kernels", 120, 50, False),
    ("bench-synth", "step_bench_synth", 150, 70, False),
)
STEP_NAMES = tuple(s[0] for s in STEPS)
GPU_COMMAND = "python -m tools.gpu_report --out \"$OUT\""

# Wheels the GPU machine's image may lack (it has numpy, torch, cuda-bindings, tokenizers, ...): gguf and
# cffi with what they need (only the missing ones are installed). `--fetch-wheels` downloads them here into WHEELS (ignored by git, carried
# with the working tree); the report installs the missing ones into a scratch folder before the steps.
WHEELS = ROOT / ".gpuwheels"
WHEEL_MODULES = {"gguf": "gguf", "cffi": "cffi", "pycparser": "pycparser", "pyyaml": "yaml", "tqdm": "tqdm",
                 "requests": "requests", "urllib3": "urllib3", "idna": "idna", "certifi": "certifi",
                 "charset_normalizer": "charset_normalizer",
                 "setuptools": "setuptools"}   # cffi compiles through it on Python >= 3.12
FETCH_COMMAND = ["-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.12", "--platform",
                 "manylinux2014_x86_64", "--implementation", "cp", "--no-deps", "-d", str(WHEELS), *WHEEL_MODULES]


def git_commit() -> str:
    """HEAD, or ANYBIT_COMMIT where the tree came without its .git (a copy on a borrowed machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ANYBIT_COMMIT", "unknown")


def step(report: dict, name: str, fn) -> None:
    """Run fn() in this process and record its dict (or its error) under report["steps"][name]."""
    t0 = time.perf_counter()
    try:
        rec = {"ok": True, **fn()}
    except Exception as e:                     # record and go on: a partial report beats none
        rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        try:
            from runtime import driver
            if driver.first_fault() is not None:
                rec["first_fault"] = driver.first_fault()
        except ImportError:
            pass
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    report["steps"][name] = rec


# ---- one step, in a child process ----------------------------------------------------------------------

def run_one(name: str, result: Path, ctx: dict) -> int:
    from tools import gpu_report_steps as steps
    fn = getattr(steps, dict((s[0], s[1]) for s in STEPS)[name])
    if os.environ.get("ANYBIT_GPU_REPORT_STALL") == name:     # tests: a step that never ends by itself
        time.sleep(3600)
    report = {"steps": {}}
    step(report, name, lambda: fn(ctx))
    result.write_text(json.dumps(report["steps"][name], default=str))
    return 0


# ---- the driver: one child per step, a budget, files written as it goes ------------------------------

def _spawn(name: str, ctx: dict, timeout: float, sync: bool, log_path: Path) -> dict:
    res = Path(ctx["tmp"]) / f"{name}.result.json"
    cmd = [sys.executable, "-m", "tools.gpu_report", "--run-step", name, "--result", str(res),
           "--seed", str(ctx["seed"])] + (["--dry-run"] if ctx["dry_run"] else []) + \
          (["--out", ctx["out"]] if ctx["out"] else [])
    path = [str(ROOT), ctx.get("site"), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    if sync:                                   # a fault names its kernel (runtime/driver.py)
        env["ANYBIT_SYNC_LAUNCH"] = "1"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, status = p.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)   # the step and whatever it started (pytest, bench)
            rc, status = p.wait(), "timeout"
    secs = round(time.perf_counter() - t0, 2)
    if status is None and res.exists():
        rec = json.loads(res.read_text())
        rec["status"] = "skipped" if rec.get("skipped") else ("ok" if rec.get("ok") else "failed")
    else:
        status = status or "crashed"
        rec = {"ok": False, "status": status, "returncode": rc,
               "error": f"step {name} {'ran past its ' + str(round(timeout)) + ' s limit' if status == 'timeout' else f'died with status {rc} before writing its result'}"}
    rec["wall_seconds"] = secs
    if not rec.get("ok"):
        rec["log_tail"] = log_path.read_bytes()[-3000:].decode(errors="replace")
    return rec


def _append_log(dest: Path, name: str, src: Path) -> None:
    data = src.read_bytes()
    if len(data) > LOG_STEP_MAX:
        data = data[:LOG_STEP_MAX // 4] + b"\n[... cut ...]\n" + data[-3 * LOG_STEP_MAX // 4:]
    with open(dest, "ab") as f:
        f.write(f"\n===== {name} =====\n".encode() + data)


def install_wheels(tmp: str) -> dict:
    """pip-install (offline, no dependencies resolved) the carried wheels whose module is missing here
    into tmp/site; -> {"site": path or None, "installed": [...], "note": ...}."""
    import importlib.util
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"site": None, "installed": [], "note": f"no {WHEELS.name}/ folder with wheels"}
    need = []
    for w in wheels:
        dist = w.name.split("-")[0].lower().replace("-", "_")
        if importlib.util.find_spec(WHEEL_MODULES.get(dist, dist)) is None:
            need.append(w)
    if not need:
        return {"site": None, "installed": [], "note": "every carried package is installed already"}
    site = Path(tmp) / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, need)], capture_output=True, text=True, timeout=120)
    if p.returncode:
        return {"site": None, "installed": [], "note": f"pip install failed: {(p.stdout + p.stderr)[-1500:]}"}
    return {"site": str(site), "installed": [w.name for w in need], "note": "ok"}


def _write(report: dict, dests, t_start: float) -> None:
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    for d in dests:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.with_suffix(".json.part")      # never a half-written report, even if killed mid-write
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(d)


def plan(names) -> tuple[str, int]:
    est = sum(s[3] for s in STEPS if s[0] in names)
    return GPU_COMMAND, est


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_report", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for gpu-report.json, gpu-report.log, gpu-junit.xml "
                    "and the bench JSON files (on a borrowed GPU machine: the folder that comes back)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run each step against the interpreter "
                    "or say why it is skipped")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps together "
                    f"(default {DEFAULT_BUDGET:.0f}); a step gets at most what is left")
    ap.add_argument("--only", default="", help=f"comma list of steps to run ({', '.join(STEP_NAMES)})")
    ap.add_argument("--skip", default="", help="comma list of steps to leave out")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--fetch-wheels", action="store_true", help=f"download the wheels a GPU machine lacks "
                    f"(gguf, cffi, ... for CPython 3.12, manylinux x86_64) into {WHEELS.name}/ and exit")
    ap.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    skip = [s for s in a.skip.split(",") if s]
    for s in only + skip + ([a.run_step] if a.run_step else []):
        if s not in STEP_NAMES:
            print(f"gpu_report: unknown step {s!r}; steps are {', '.join(STEP_NAMES)}", file=sys.stderr)
            return 2
    if a.fetch_wheels:
        return subprocess.run([sys.executable, *FETCH_COMMAND]).returncode
    ctx = {"out": str(Path(a.out).resolve()) if a.out else None, "dry_run": a.dry_run, "seed": a.seed}
    if a.run_step:
        ctx["tmp"] = str(a.result.parent)
        return run_one(a.run_step, a.result, ctx)

    if not a.dry_run:
        from runtime import driver
        if not driver.available():
            print("gpu_report: no usable GPU here (nothing recorded); --dry-run runs the steps against the "
                  "interpreter", file=sys.stderr)
            return 2
    out = Path(ctx["out"]) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    names = [n for n in STEP_NAMES if (not only or n in only) and n not in skip]
    cmd, est = plan(names)
    print(f"planned GPU command: {cmd}   (estimated {est} s on an H100/H200-class machine, budget "
          f"{a.budget:.0f} s)", flush=True)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report = {"date": date, "commit": git_commit(), "dry_run": a.dry_run, "python": sys.version.split()[0],
              "budget_s": a.budget, "estimated_gpu_s": est, "gpu_command": cmd, "steps": {}}
    ctx["tmp"] = tempfile.mkdtemp(prefix="anybit-gpu-report-")
    report["wheels"] = install_wheels(ctx["tmp"])
    ctx["site"] = report["wheels"]["site"]
    print(f"wheels: {report['wheels']['note']}" + (f" ({', '.join(report['wheels']['installed'])})"
                                                   if report["wheels"]["installed"] else ""), flush=True)
    dests = [out / "gpu-report.json"] if out else []
    log = out / "gpu-report.log" if out else Path(ctx["tmp"]) / "gpu-report.log"
    log.write_bytes(b"")
    t_start = time.perf_counter()
    for name, _, limit, est_s, sync in STEPS:
        if name not in names:
            continue
        left = a.budget - (time.perf_counter() - t_start)
        if left < 5:
            report["steps"][name] = {"ok": False, "status": "not run", "error": "the budget was spent"}
            print(f"== {name}: not run (budget spent)", flush=True)
            _write(report, dests, t_start)
            continue
        print(f"== {name} (limit {min(limit, left):.0f} s)", flush=True)
        step_log = Path(ctx["tmp"]) / f"{name}.log"
        rec = _spawn(name, ctx, min(limit, left), sync, step_log)
        rec["estimate_s"] = est_s
        report["steps"][name] = rec
        _append_log(log, name, step_log)
        why = rec.get("skipped") or rec.get("error", "")
        print(f"   {rec['status']} in {rec['wall_seconds']} s" + (f": {why}" if why else ""), flush=True)
        if name == "device" and not a.dry_run and rec.get("device"):
            arch = rec["device"].get("arch", "gpu")
            dests.append(ROOT / "bench" / "results" / f"gpu-report-{arch}-{date[:10]}.json")
        _write(report, dests, t_start)        # after every step: a cut-off run keeps what it has
    ok = all(s.get("ok") for s in report["steps"].values())
    print(f"total {report.get('total_s', 0)} s; "
          f"{sum(s.get('status') == 'ok' for s in report['steps'].values())} ok, "
          f"{sum(s.get('status') == 'skipped' for s in report['steps'].values())} skipped, "
          f"{sum(not s.get('ok') for s in report['steps'].values())} failed")
    for d in dests:
        print(f"recorded {d}")
    print(f"planned GPU command: {cmd}   (estimated {est} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
