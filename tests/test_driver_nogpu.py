"""runtime.driver without a GPU: check(), every 'no GPU' path, a fake driver for Context/props."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

import runtime.driver as drv
from runtime.errors import CudaError, NoGpuError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_driver_state():
    drv._reset_for_tests()
    yield
    drv._reset_for_tests()


def test_check_payloads():
    assert drv.check((0,), "cuX") is None
    assert drv.check(0, "cuX") is None
    assert drv.check((0, 7), "cuX") == 7
    assert drv.check((0, 1, 2), "cuX") == (1, 2)


def test_check_raises_with_code_name_and_call():
    d = pytest.importorskip("cuda.bindings.driver")
    with pytest.raises(CudaError) as ei:
        drv.check((d.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc")
    e = ei.value
    assert e.code == 2 and e.name == "CUDA_ERROR_OUT_OF_MEMORY" and e.call == "cuMemAlloc"
    assert "cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (2)" in str(e)


def test_cdiv():
    assert [drv.cdiv(n, 128) for n in (1, 127, 128, 129, 1000)] == [1, 1, 1, 2, 8]


def test_import_runtime_without_cuda_python():
    code = ("import sys; sys.modules['cuda'] = None; sys.modules['cuda.bindings'] = None\n"
            "import runtime, runtime.driver as d, runtime.module, runtime.memory, runtime.staging\n"
            "import runtime.graph, runtime.nvjitlink\n"
            "assert d.available() is False\n"
            "try:\n    d.init()\nexcept runtime.NoGpuError as e:\n    print('NOGPU', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "NOGPU cuda-python is not installed" in out.stdout


def test_real_machine_without_gpu_gives_nogpuerror():
    if drv.available():
        pytest.skip("a GPU is present")
    with pytest.raises(NoGpuError):
        drv.init()
    with pytest.raises(NoGpuError):
        drv.Context(0)


def test_graph_capture_without_gpu_raises_nogpuerror():
    if drv.available():
        pytest.skip("a GPU is present")
    from runtime.graph import Graph
    with pytest.raises(NoGpuError):
        Graph.capture(object(), lambda: None)


class _Enum(int):
    """An int that also has .name, like the binding's enums."""

    def __new__(cls, v, name=""):
        o = int.__new__(cls, v)
        o.name = name
        return o


class _Names:
    def __getattr__(self, name):
        return name


class FakeDriver(types.SimpleNamespace):
    """Just enough of cuda.bindings.driver for init/Context/query_props."""

    def __init__(self, init_code=0, count=1, load_error=None):
        super().__init__()
        self.calls = []
        self.init_code, self.count, self.load_error = init_code, count, load_error
        self.CUdevice_attribute = _Names()
        self.attrs = {"CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR": 9,
                      "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR": 0,
                      "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT": 132,
                      "CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK": 1024,
                      "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK": 49152,
                      "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 232448,
                      "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472,
                      "CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
                      "CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE": 52428800}

    def CUresult(self, code):
        return _Enum(code, {0: "CUDA_SUCCESS", 100: "CUDA_ERROR_NO_DEVICE"}.get(code, f"E{code}"))

    def cuGetErrorName(self, err):
        return (_Enum(0), self.CUresult(int(err)).name.encode())

    def cuInit(self, flags):
        if self.load_error:
            raise RuntimeError(self.load_error)
        self.calls.append("cuInit")
        return (_Enum(self.init_code),)

    def cuDeviceGetCount(self):
        return (_Enum(0), self.count)

    def cuDeviceGet(self, i):
        self.calls.append(f"cuDeviceGet({i})")
        return (_Enum(0), 1000 + i)

    def cuDevicePrimaryCtxRetain(self, dev):
        self.calls.append(f"retain({dev})")
        return (_Enum(0), "ctx")

    def cuDevicePrimaryCtxRelease(self, dev):
        self.calls.append(f"release({dev})")
        return (_Enum(0),)

    def cuCtxSetCurrent(self, ctx):
        self.calls.append(f"current({ctx})")
        return (_Enum(0),)

    def cuDeviceGetName(self, n, dev):
        return (_Enum(0), b"Fake H100\0\0\0")

    def cuDeviceGetAttribute(self, attr, dev):
        return (_Enum(0), self.attrs[attr])

    def cuDeviceTotalMem(self, dev):
        return (_Enum(0), 80 << 30)

    def cuDriverGetVersion(self):
        return (_Enum(0), 13000)


def test_no_device_code_is_nogpuerror():
    drv._drv = FakeDriver(init_code=100)
    with pytest.raises(NoGpuError, match="no CUDA-capable device"):
        drv.init()
    assert drv.available() is False


def test_library_load_failure_is_nogpuerror():
    drv._drv = FakeDriver(load_error="Failed to dlopen libcuda.so.1")
    with pytest.raises(NoGpuError, match="libcuda"):
        drv.init()


def test_zero_devices_is_nogpuerror():
    drv._drv = FakeDriver(count=0)
    with pytest.raises(NoGpuError, match="zero CUDA devices"):
        drv.init()


def test_other_init_error_is_cudaerror():
    drv._drv = FakeDriver(init_code=101)   # CUDA_ERROR_INVALID_DEVICE: a real error, not "no GPU"
    with pytest.raises(CudaError):
        drv.init()


def test_context_lifecycle_and_props_with_fake_driver():
    fake = drv._drv = FakeDriver()
    assert drv.available()
    with drv.Context(0) as ctx:
        p = ctx.props
        assert p.arch == "sm_90" and p.name == "Fake H100" and p.sm_count == 132
        assert p.max_smem_per_block_optin == 227 * 1024 and p.driver_version == 13000
        with pytest.raises(Exception):
            p.sm_count = 1   # frozen
    assert fake.calls[:4] == ["cuInit", "cuDeviceGet(0)", "retain(1000)", "current(ctx)"]
    assert fake.calls.count("release(1000)") == 1
    ctx.close()  # idempotent
    assert fake.calls.count("release(1000)") == 1
    with pytest.raises(NoGpuError, match="device 3"):
        drv.Context(3)


# ---- device-fault containment ----------------------------------------------------------------------

class FaultingDriver(FakeDriver):
    """Launches are accepted; the first synchronize after `fault_after` launches reports
    CUDA_ERROR_ILLEGAL_ADDRESS, and from then on every call does (a sticky fault)."""

    def __init__(self, fault_after=1):
        super().__init__()
        self.launched, self.fault_after, self.faulted = [], fault_after, False
        self.destroyed = []

    def CUresult(self, code):
        return _Enum(code, {0: "CUDA_SUCCESS", 700: "CUDA_ERROR_ILLEGAL_ADDRESS"}.get(code, f"E{code}"))

    def _rc(self):
        return (_Enum(700 if self.faulted else 0),)

    def CUstream(self, h):
        return h

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
        self.launched.append(f)
        return self._rc()

    def cuStreamSynchronize(self, h):
        if len(self.launched) >= self.fault_after:
            self.faulted = True
        return self._rc()

    def cuGraphExecDestroy(self, e):
        self.destroyed.append(e)
        return self._rc()

    def cuGraphDestroy(self, g):
        self.destroyed.append(g)
        return self._rc()


def _function(name="k", params="out:ptr, n:u32"):
    from runtime.module import Function, KernelSignature, parse_header
    sig = parse_header(f"// anybit-kernel: {name}\n// params: {params}\n")[name]
    return Function(f"handle-{name}", sig)


def test_sync_launch_names_the_kernel_that_faulted(monkeypatch):
    fake = drv._drv = FaultingDriver(fault_after=2)
    monkeypatch.setattr(drv, "SYNC_LAUNCH", True)
    _function("good").launch((4, 1, 1), (128, 1, 1), [0x1000, 7])
    with pytest.raises(CudaError) as ei:
        _function("bad").launch((2, 3, 1), (32, 1, 1), [0xdead00, 9])
    assert ei.value.code == 700 and "after bad" in ei.value.call
    f = drv.first_fault()
    assert f["error"] == "CUDA_ERROR_ILLEGAL_ADDRESS" and f["sync_launch"] is True
    assert f["kernel"] == {"kernel": "bad", "grid": [2, 3, 1], "block": [32, 1, 1], "smem": 0,
                           "args": [0xdead00, 9]}
    assert [k["kernel"] for k in f["recent_launches"]] == ["good", "bad"]
    with pytest.raises(CudaError):                # later failures do not overwrite the first fault
        _function("later").launch(1, 32, [0, 1])
    assert drv.first_fault()["kernel"]["kernel"] == "bad" and len(fake.launched) == 3


def test_grid_beyond_hardware_limits_is_refused_before_the_driver():
    fake = drv._drv = FaultingDriver()
    for grid in [(1, 65536, 1), (1, 1, 65536), (2**31, 1, 1)]:
        with pytest.raises(ValueError, match=r"k: grid .* exceeds the hardware limit"):
            _function().launch(grid, (32, 1, 1), [0, 1])
    with pytest.raises(ValueError, match="z = 65 exceeds"):
        _function().launch(1, (1, 1, 65), [0, 1])
    assert fake.launched == []
    _function().launch((2**31 - 1, 65535, 65535), (32, 1, 1), [0, 1])   # the limits themselves pass


def test_releaser_runs_every_step_and_raises_the_first_error():
    done = []

    def fail(tag):
        done.append(tag)
        raise RuntimeError(tag)
    rel = drv.Releaser()
    rel(fail, "first")
    rel(done.append, "ok")
    rel(fail, "second")
    assert done == ["first", "ok", "second"] and rel.failed == 2
    with pytest.raises(RuntimeError, match="first"):
        rel.done()
    drv.Releaser().done()                          # nothing failed: nothing raised


def test_graph_close_after_a_fault_destroys_both_and_raises_once():
    from runtime.graph import Graph
    fake = drv._drv = FaultingDriver()
    fake.faulted = True
    g = Graph("graph", "exec")
    with pytest.raises(CudaError, match="cuGraphExecDestroy"):
        g.close()
    assert fake.destroyed == ["exec", "graph"] and g.exec is None and g.graph is None
    g.close()                                      # idempotent: nothing left to destroy
    assert fake.destroyed == ["exec", "graph"]
