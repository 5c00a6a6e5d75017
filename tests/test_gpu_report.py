"""tools.gpu_report: refuses without a GPU unless --dry-run; one process per step with its own limit and
the report written to --out as each step finishes; the dry run itself (every step against the
interpreter or skipped with its reason) as CI runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import driver
from tools import gpu_report, gpu_report_steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(driver.available(), reason="this machine has a GPU")
def test_no_gpu_exits_2_and_records_nothing(tmp_path, capsys):
    assert gpu_report.main(["--out", str(tmp_path / "o")]) == 2
    assert "no usable GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_step_is_a_usage_error(capsys):
    assert gpu_report.main(["--dry-run", "--only", "nope"]) == 2
    assert "unknown step 'nope'" in capsys.readouterr().err


def test_a_failing_step_is_recorded_with_its_error():
    report = {"steps": {}}
    gpu_report.step(report, "boom", lambda: 1 / 0)
    gpu_report.step(report, "fine", lambda: {"value": 3})
    assert report["steps"]["boom"]["ok"] is False and "ZeroDivisionError" in report["steps"]["boom"]["error"]
    assert report["steps"]["fine"] == {"ok": True, "value": 3, "seconds": report["steps"]["fine"]["seconds"]}


def test_plan_orders_by_value_and_fits_the_machine():
    names = [s[0] for s in gpu_report.STEPS]
    assert names[:3] == ["device", "kernels", "engine"] and names[-2:] == ["bench-kernels", "bench-synth"]
    _, est = gpu_report.plan(names)
    assert est < 0.75 * gpu_report.DEFAULT_BUDGET            # estimates well inside the budget
    assert gpu_report.DEFAULT_BUDGET <= 480                    # and the budget under 8 of the 10 minutes


def test_a_step_past_its_limit_is_cut_and_the_report_still_written(tmp_path):
    """A kernels step that hangs (ANYBIT_GPU_REPORT_STALL) is killed at the 8-second budget, recorded as a
    timeout, and the steps after it are marked as not run; the files are in --out."""
    out = tmp_path / "o"
    env = dict(os.environ, ANYBIT_GPU_REPORT_STALL="kernels")
    p = subprocess.run([sys.executable, "-m", "tools.gpu_report", "--dry-run", "--out", str(out), "--only",
                        "kernels,pytest", "--budget", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    rep = json.loads((out / "gpu-report.json").read_text())
    k = rep["steps"]["kernels"]
    assert k["status"] == "timeout" and "limit" in k["error"] and k["wall_seconds"] < 30
    assert rep["steps"]["pytest"]["status"] == "not run"
    assert "===== kernels =====" in (out / "gpu-report.log").read_text()


def test_logit_comparison_tells_ties_from_errors():
    ref = np.array([[1.0, 5.0, 4.999999], [0.0, 1.0, 3.0]])
    got = ref.copy()
    got[0] = [1.0, 4.999998, 5.0]                               # a near tie flipped: not an error
    r = gpu_report_steps._compare_logits(got, ref)
    assert r["argmax_differs"] == 1 and r["argmax_differs_not_tie"] == 0
    got[1] = [0.0, 3.5, 3.0]                                    # a clear winner lost: an error
    r = gpu_report_steps._compare_logits(got, ref)
    assert r["argmax_differs"] == 2 and r["argmax_differs_not_tie"] == 1


def test_wheels_for_the_gpu_machine_are_cp312_manylinux():
    cmd = gpu_report.FETCH_COMMAND
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux2014_x86_64" in cmd
    assert {"gguf", "cffi", "pycparser"} <= set(cmd) and "--no-deps" in cmd
    assert ".gpuwheels/" in (ROOT / ".gitignore").read_text()


@pytest.mark.slow
def test_dry_run_passes_and_writes_its_files(tmp_path):
    """What CI runs: the whole dry run (about a minute: kernels and engine in the interpreter)."""
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-m", "tools.gpu_report", "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'planned GPU command: python -m tools.gpu_report --out "$OUT"' in p.stdout
    assert "estimated" in p.stdout and "total " in p.stdout
    files = sorted(f.name for f in out.iterdir())
    assert files == ["gpu-junit.xml", "gpu-report.json", "gpu-report.log"]
    rep = json.loads((out / "gpu-report.json").read_text())
    st = rep["steps"]
    assert rep["dry_run"] is True and list(st) == [s[0] for s in gpu_report.STEPS]
    assert st["kernels"]["status"] == "ok" and st["kernels"]["runners"] == ["sim"] and st["kernels"]["passed"] > 40
    assert st["engine"]["status"] == "ok" and st["engine"]["precisions"]["W4A16"]["same_tokens_as_numpy"]["device"]
    assert st["pytest"]["status"] == "ok" and st["pytest"]["tests"] == st["pytest"]["n_skipped"] > 0
    for b in ("bench-kernels", "bench-synth"):
        assert st[b]["status"] == "skipped" and "interpreter" in st[b]["skipped"]
