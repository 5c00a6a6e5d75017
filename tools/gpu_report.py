"""`python -m tools.gpu_report`: everything a session with a GPU must run, recorded in one JSON file.

A GPU is lent to a few sessions only, for about 30 minutes, so this is one command that does the whole
GPU tier (SPEC.md section 6) in order of importance and records each result as it goes:

1. the device (name, arch, driver, memory);
2. `pytest -m gpu` (runtime, kernels, engine on the device);
3. the kernel regression suite on the GPU and in the interpreter, integer results compared bit for bit;
4. greedy tokens of the default model on `--device cuda` against the CPU backend at W8A8 and W4A16;
5. the benchmarks (`tools.bench kernels`, `e2e` and `synth` with `--device cuda`).

The file goes to bench/results/gpu-report-<arch>-<date>.json with the commit; a step that fails is
recorded with its error and the report goes on. Without a GPU it exits with status 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step(report: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        report["steps"][name] = {"ok": True, **fn()}
    except Exception as e:                     # record and go on: a partial report beats none
        report["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()[-4000:]}
    report["steps"][name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"   {'ok' if report['steps'][name]['ok'] else 'FAILED'} in {report['steps'][name]['seconds']} s",
          flush=True)


def run_pytest_gpu() -> dict:
    xml = Path("/tmp/anybit-gpu-junit.xml")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={xml}"],
                       cwd=ROOT, capture_output=True, text=True)
    import xml.etree.ElementTree as ET
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [tc.get("classname", "") + "::" + tc.get("name", "") for tc in suite.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    return {"ok": p.returncode == 0, "tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
            "errors": int(suite.get("errors", 0)), "skipped": int(suite.get("skipped", 0)), "failed": failed,
            "tail": p.stdout[-3000:]}


def run_kernelcheck(seed: int) -> dict:
    from tools import kernelcheck as kc
    runners = [kc.SimRunner(), kc.GpuRunner()]
    try:
        res = kc.run_all(runners, seed, True, None)
    finally:
        for r in runners:
            r.close()
    rows = [{"case": r.case, "shape": r.shape, "ok": bool(r.ok), "err": float(r.err), "note": r.note} for r in res]
    return {"ok": all(r["ok"] for r in rows), "seed": seed, "passed": sum(r["ok"] for r in rows),
            "failed": sum(not r["ok"] for r in rows), "rows": rows}


def run_engine_match(max_tokens: int) -> dict:
    import engine
    prompt = "The three primary colors are"
    out = {}
    for wbits, abits in ((8, 8), (4, 16)):
        gens = {}
        for device in ("cpu", "cuda"):
            with engine.load(None, wbits=wbits, abits=abits, device=device, progress=False) as m:
                r = m.generate(prompt, max_tokens=max_tokens)
                gens[device] = {"ids": r.ids, "text": r.text, "decode_tok_s": r.decode_tok_s,
                                "prompt_tok_s": r.prompt_tok_s, "device": m.device}
        out[f"W{wbits}A{abits}"] = {"same_tokens": gens["cpu"]["ids"] == gens["cuda"]["ids"], **gens}
    out["ok"] = all(v["same_tokens"] for v in out.values())
    return out


def run_bench() -> dict:
    results = {}
    for sub in ("kernels", "e2e", "synth"):       # synth: decode at Llama-2-7B shapes, W4A16 and W2A16
        p = subprocess.run([sys.executable, "-m", "tools.bench", sub, "--device", "cuda", "--quick"], cwd=ROOT,
                           capture_output=True, text=True)
        results[sub] = {"returncode": p.returncode, "tail": (p.stdout + p.stderr)[-4000:]}
    results["ok"] = all(v["returncode"] == 0 for v in results.values() if isinstance(v, dict))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_report", description=__doc__.split("\n")[0])
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: pytest,kernels,engine,bench")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    from runtime import driver
    if not driver.available():
        print("gpu_report: no usable GPU here (nothing recorded)", file=sys.stderr)
        return 2
    props = driver.query_props(0)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "device": {**props.__dict__, "arch": props.arch}, "python": sys.version.split()[0], "steps": {}}
    out = ROOT / "bench" / "results" / f"gpu-report-{props.arch}-{report['date'][:10]}.json"
    skip = set(filter(None, a.skip.split(",")))
    plan = [("pytest", run_pytest_gpu), ("kernels", lambda: run_kernelcheck(a.seed)),
            ("engine", lambda: run_engine_match(a.max_tokens)), ("bench", run_bench)]
    for name, fn in plan:
        if name in skip:
            continue
        step(report, name, fn)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))     # after every step: survive a cut-off
    print(f"recorded {out}")
    return 0 if all(s["ok"] for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
