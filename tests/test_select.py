"""Backend selection: names, the NumPy reference, cuda without a GPU, auto staying on the CPU."""
import pytest

from runtime import driver
from runtime.errors import NoGpuError
from runtime.select import select_backend


def test_cpu_and_numpy_backends():
    be = select_backend("cpu", 1)
    assert be.name == "cpu"
    be.close()
    assert select_backend("numpy").name == "numpy"


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be one of"):
        select_backend("tpu")


@pytest.mark.skipif(driver.available(), reason="this machine has a GPU")
def test_cuda_without_gpu_raises_nogpu_and_auto_falls_back():
    with pytest.raises(NoGpuError):
        select_backend("cuda")
    be = select_backend("auto", 1)
    assert be.name == "cpu"
    be.close()
