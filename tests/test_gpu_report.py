"""tools.gpu_report: refuses cleanly without a GPU; records a failing step and goes on."""
import pytest

from runtime import driver
from tools import gpu_report


@pytest.mark.skipif(driver.available(), reason="this machine has a GPU")
def test_no_gpu_exits_2_and_records_nothing(tmp_path, capsys):
    assert gpu_report.main([]) == 2
    assert "no usable GPU" in capsys.readouterr().err


def test_a_failing_step_is_recorded_with_its_error():
    report = {"steps": {}}
    gpu_report.step(report, "boom", lambda: 1 / 0)
    gpu_report.step(report, "fine", lambda: {"value": 3})
    assert report["steps"]["boom"]["ok"] is False and "ZeroDivisionError" in report["steps"]["boom"]["error"]
    assert report["steps"]["fine"] == {"ok": True, "value": 3, "seconds": report["steps"]["fine"]["seconds"]}
