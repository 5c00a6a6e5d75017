"""CUDA driver API access: one `check()` for every call, device/context, streams, events, copies.

`cuda.bindings.driver` (cuda-python) is imported lazily, on first use, so that `import runtime` works on
machines without cuda-python or without an NVIDIA driver. Every way of "no GPU here" (package missing,
libcuda missing, no device) surfaces as `NoGpuError` with a sentence that says which; callers fall back
to the CPU backend. `available()` answers the question without ever raising.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from dataclasses import dataclass

from runtime.errors import CudaError, NoGpuError

_lock = threading.Lock()
_drv = None            # the cuda.bindings.driver module once imported
_initialized = False   # cuInit(0) succeeded in this process

# CUresult codes that mean "there is no usable GPU" rather than "a call went wrong".
_NO_GPU_CODES = {
    100: "no CUDA-capable device is present (CUDA_ERROR_NO_DEVICE)",
    35: "the NVIDIA driver is older than this cuda-python needs (CUDA_ERROR_INSUFFICIENT_DRIVER)",
    3: "the CUDA driver could not be initialized (CUDA_ERROR_NOT_INITIALIZED)",
    999: "the CUDA driver reported an unknown error during initialization (CUDA_ERROR_UNKNOWN)",
    34: "the CUDA driver stub library is installed, not the real driver (CUDA_ERROR_STUB_LIBRARY)",
    46: "all CUDA devices are busy or unavailable (CUDA_ERROR_DEVICES_UNAVAILABLE)",
}


def driver():
    """The `cuda.bindings.driver` module, imported on first use; NoGpuError if cuda-python is absent."""
    global _drv
    if _drv is None:
        try:
            from cuda.bindings import driver as mod
        except ImportError as e:  # cuda-python not installed, or a broken install
            raise NoGpuError(f"cuda-python is not installed ({e}); install cuda-python 13.x to use "
                             "the GPU backend, or run on the CPU") from e
        _drv = mod
    return _drv


def error_name(code: int) -> str:
    """Name of a CUresult: asks the driver (cuGetErrorName), else the binding's enum, else a number."""
    try:
        d = driver()
        res, name = d.cuGetErrorName(d.CUresult(code))
        if int(res) == 0 and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # no libcuda, or an unknown code: fall back to the enum table
        pass
    try:
        return driver().CUresult(code).name
    except Exception:
        return f"CUDA_ERROR_{int(code)}"


# CUresults after which the context is unusable (every later call returns the same code until it is
# destroyed): a kernel faulted. They surface asynchronously, at the next synchronizing call.
FAULT_CODES = {
    700: "CUDA_ERROR_ILLEGAL_ADDRESS", 702: "CUDA_ERROR_LAUNCH_TIMEOUT", 714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION", 716: "CUDA_ERROR_MISALIGNED_ADDRESS",
    717: "CUDA_ERROR_INVALID_ADDRESS_SPACE", 718: "CUDA_ERROR_INVALID_PC", 719: "CUDA_ERROR_LAUNCH_FAILED",
}
# ANYBIT_SYNC_LAUNCH=1: synchronize after every launch, so a fault names the very kernel that made it
# (tools.gpu_report sets it for its correctness steps); otherwise the fault is one of the recent ones.
SYNC_LAUNCH = os.environ.get("ANYBIT_SYNC_LAUNCH", "") not in ("", "0")
_recent_launches: deque = deque(maxlen=8)      # dicts: kernel, grid, block, smem, args
_first_fault: dict | None = None


def note_launch(kernel: str, grid, block, smem: int, args) -> None:
    """Remember a launch (cheaply: a tuple of its Python arguments) for the fault report."""
    _recent_launches.append({"kernel": kernel, "grid": list(grid), "block": list(block), "smem": int(smem),
                             "args": [a if isinstance(a, (int, float)) or a is None else repr(a) for a in args]})


def first_fault() -> dict | None:
    """The first device fault of this process: its error, the call that saw it and the launches
    before it (the last one is the kernel that faulted when ANYBIT_SYNC_LAUNCH=1), or None."""
    return _first_fault


def _record_fault(code: int, name: str, call: str) -> None:
    global _first_fault
    if _first_fault is None:
        last = list(_recent_launches)
        _first_fault = {"code": code, "error": name, "seen_at": call, "sync_launch": SYNC_LAUNCH,
                        "kernel": last[-1] if last else None, "recent_launches": last}


class Releaser:
    """Best-effort release: run every step even after one fails, then raise the first error only.

    Why: after a device fault every driver call fails with the same code; a close() that stopped at its
    first failing call would leak the rest and bury the fault under a cascade of follow-on errors.

        rel = Releaser()
        rel(stream.close); rel(pool.close); rel(ctx.close)
        rel.done()          # raises the first error, if any
    """

    def __init__(self):
        self.first: BaseException | None = None
        self.failed = 0

    def __call__(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:           # keep going; KeyboardInterrupt still stops us
            self.failed += 1
            if self.first is None:
                self.first = e

    def done(self) -> None:
        if self.first is not None:
            raise self.first


def check(result, call: str):
    """Turn a cuda-python return value into its payload, raising CudaError if the CUresult is not 0.

    cuda-python returns `(CUresult, value, ...)` or a bare CUresult. The payload is None, the single
    value, or the tuple of values.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    code = int(err)
    if code != 0:
        name = error_name(code)
        if code in FAULT_CODES:
            _record_fault(code, name, call)
        raise CudaError(code, name, call)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def init() -> None:
    """cuInit(0) once per process; NoGpuError for every flavour of 'no GPU here'."""
    global _initialized
    if _initialized:
        return
    with _lock:
        if _initialized:
            return
        d = driver()
        try:
            res = d.cuInit(0)
        except Exception as e:  # the binding could not load libcuda.so at all
            raise NoGpuError(f"the NVIDIA driver library (libcuda.so) could not be loaded: {e}") from e
        code = int(res[0] if isinstance(res, tuple) else res)
        if code in _NO_GPU_CODES:
            raise NoGpuError(f"cuInit failed: {_NO_GPU_CODES[code]}")
        check(res, "cuInit")
        count = check(d.cuDeviceGetCount(), "cuDeviceGetCount")
        if int(count) == 0:
            raise NoGpuError("the NVIDIA driver is loaded but reports zero CUDA devices")
        _initialized = True


def device_count() -> int:
    init()
    return int(check(driver().cuDeviceGetCount(), "cuDeviceGetCount"))


def available() -> bool:
    """True if a CUDA device can be used. Never raises."""
    try:
        init()
        return True
    except Exception:
        return False


def _reset_for_tests() -> None:
    """Forget the imported module, init state and fault record (tests swap in fake driver modules)."""
    global _drv, _initialized, _first_fault
    _drv, _initialized, _first_fault = None, False, None
    _recent_launches.clear()


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch geometry: cdiv(1000, 128) == 8."""
    return -(-int(a) // int(b))


@dataclass(frozen=True)
class DeviceProps:
    """What the planner and the backend need to know about one device."""

    ordinal: int
    name: str
    major: int
    minor: int
    sm_count: int
    max_threads_per_block: int
    max_smem_per_block: int        # without opt-in (48 KiB on every arch we target)
    max_smem_per_block_optin: int  # with cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)
    max_smem_per_sm: int
    regs_per_sm: int
    l2_bytes: int
    total_mem: int
    driver_version: int            # 1000*major + 10*minor, e.g. 13000

    @property
    def arch(self) -> str:
        return f"sm_{self.major}{self.minor}"


def _attr(d, dev, name: str) -> int:
    a = getattr(d.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_" + name)
    return int(check(d.cuDeviceGetAttribute(a, dev), f"cuDeviceGetAttribute({name})"))


def query_props(ordinal: int = 0) -> DeviceProps:
    init()
    d = driver()
    dev = check(d.cuDeviceGet(ordinal), "cuDeviceGet")
    raw = check(d.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
    return DeviceProps(
        ordinal=ordinal, name=name,
        major=_attr(d, dev, "COMPUTE_CAPABILITY_MAJOR"),
        minor=_attr(d, dev, "COMPUTE_CAPABILITY_MINOR"),
        sm_count=_attr(d, dev, "MULTIPROCESSOR_COUNT"),
        max_threads_per_block=_attr(d, dev, "MAX_THREADS_PER_BLOCK"),
        max_smem_per_block=_attr(d, dev, "MAX_SHARED_MEMORY_PER_BLOCK"),
        max_smem_per_block_optin=_attr(d, dev, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"),
        max_smem_per_sm=_attr(d, dev, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR"),
        regs_per_sm=_attr(d, dev, "MAX_REGISTERS_PER_MULTIPROCESSOR"),
        l2_bytes=_attr(d, dev, "L2_CACHE_SIZE"),
        total_mem=int(check(d.cuDeviceTotalMem(dev), "cuDeviceTotalMem")),
        driver_version=int(check(d.cuDriverGetVersion(), "cuDriverGetVersion")),
    )


class Context:
    """The primary context of one device, retained and made current; close() releases it."""

    def __init__(self, ordinal: int = 0):
        init()
        d = driver()
        n = device_count()
        if not 0 <= ordinal < n:
            raise NoGpuError(f"CUDA device {ordinal} requested but only {n} device(s) present")
        self.ordinal = ordinal
        self.device = check(d.cuDeviceGet(ordinal), "cuDeviceGet")
        self.handle = check(d.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self._open = True
        self.make_current()
        self.props = query_props(ordinal)

    def make_current(self) -> None:
        check(driver().cuCtxSetCurrent(self.handle), "cuCtxSetCurrent")

    def synchronize(self) -> None:
        check(driver().cuCtxSynchronize(), "cuCtxSynchronize")

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device bytes."""
        free, total = check(driver().cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    def close(self) -> None:
        if self._open:
            self._open = False
            check(driver().cuDevicePrimaryCtxRelease(self.device), "cuDevicePrimaryCtxRelease")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream_handle(stream) -> object:
    """Accept None (legacy default stream), a Stream, or a raw CUstream/int."""
    if stream is None:
        return driver().CUstream(0)
    return getattr(stream, "handle", stream)


class Stream:
    """A non-blocking CUDA stream."""

    def __init__(self):
        d = driver()
        flags = d.CUstream_flags.CU_STREAM_NON_BLOCKING
        self.handle = check(d.cuStreamCreate(flags), "cuStreamCreate")

    def synchronize(self) -> None:
        check(driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def wait(self, event: "Event") -> None:
        check(driver().cuStreamWaitEvent(self.handle, event.handle, 0), "cuStreamWaitEvent")

    def close(self) -> None:
        if self.handle is not None:
            h, self.handle = self.handle, None
            check(driver().cuStreamDestroy(h), "cuStreamDestroy")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Event:
    """A CUDA event; timing=False makes a cheaper event for ordering only."""

    def __init__(self, timing: bool = True):
        d = driver()
        flags = d.CUevent_flags.CU_EVENT_DEFAULT if timing else d.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self.handle = check(d.cuEventCreate(flags), "cuEventCreate")

    def record(self, stream=None) -> "Event":
        check(driver().cuEventRecord(self.handle, stream_handle(stream)), "cuEventRecord")
        return self

    def synchronize(self) -> None:
        check(driver().cuEventSynchronize(self.handle), "cuEventSynchronize")

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to `end` (both recorded and complete)."""
        return float(check(driver().cuEventElapsedTime(self.handle, end.handle), "cuEventElapsedTime"))

    def close(self) -> None:
        if self.handle is not None:
            h, self.handle = self.handle, None
            check(driver().cuEventDestroy(h), "cuEventDestroy")


def _host_ptr(buf) -> tuple[int, int]:
    """(address, nbytes) of a C-contiguous NumPy array or writable buffer."""
    if hasattr(buf, "ctypes") and hasattr(buf, "flags"):
        if not buf.flags["C_CONTIGUOUS"]:
            raise ValueError("host array must be C-contiguous for a device copy")
        return int(buf.ctypes.data), int(buf.nbytes)
    mv = memoryview(buf)
    c = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return ctypes.addressof(c), mv.nbytes


def memcpy_htod(dst: int, src, stream=None) -> None:
    addr, n = _host_ptr(src)
    d = driver()
    if stream is None:
        check(d.cuMemcpyHtoD(int(dst), addr, n), "cuMemcpyHtoD")
    else:
        check(d.cuMemcpyHtoDAsync(int(dst), addr, n, stream_handle(stream)), "cuMemcpyHtoDAsync")


def memcpy_dtoh(dst, src: int, stream=None) -> None:
    addr, n = _host_ptr(dst)
    d = driver()
    if stream is None:
        check(d.cuMemcpyDtoH(addr, int(src), n), "cuMemcpyDtoH")
    else:
        check(d.cuMemcpyDtoHAsync(addr, int(src), n, stream_handle(stream)), "cuMemcpyDtoHAsync")


def memset_d8(dst: int, value: int, nbytes: int, stream=None) -> None:
    check(driver().cuMemsetD8Async(int(dst), value & 0xFF, nbytes, stream_handle(stream)),
          "cuMemsetD8Async")
