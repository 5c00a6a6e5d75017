"""Where kernelcheck runs a kernel: the PTX interpreter (SimRunner, and SimDevice, which lets
runtime.gpu_backend run without a GPU) or the GPU through runtime.module (GpuRunner).

Every runner offers the same small surface: allocate (outputs poisoned first), copy in and out, and
launch a kernel of a ptx/ file by name with grid, block, arguments and dynamic shared memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PTX_DIR = Path(__file__).resolve().parents[1] / "ptx"
POISON_U32 = 0xDEADBEEF


def poisoned(shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return np.full(shape, np.nan, np.float32)
    if dtype.kind == "f":
        return np.full(shape, np.nan, dtype)
    bits = POISON_U32 & ((1 << (8 * dtype.itemsize)) - 1)
    return np.full(shape, bits, np.dtype(f"u{dtype.itemsize}")).view(dtype)


class SimRunner:
    """Kernels in the PTX interpreter. Pointers are addresses in one GlobalMemory."""
    name = "sim"

    def __init__(self):
        from tools.ptxsim import GlobalMemory, Module
        self._Module, self.mem, self._mods = Module, GlobalMemory(), {}

    def _module(self, file):
        if file not in self._mods:
            self._mods[file] = self._Module((PTX_DIR / file).read_text(), filename=file)
        return self._mods[file]

    def put(self, arr):
        return self.mem.alloc_from(np.ascontiguousarray(arr))

    def out(self, shape, dtype):
        return self.put(poisoned(shape, dtype))

    def get(self, addr, shape, dtype):
        return self.mem.read(addr, dtype, int(np.prod(shape))).reshape(shape)

    def launch(self, file, name, grid, block, args, smem=0):
        args = [0 if a is None else a for a in args]
        self._module(file).launch(name, grid=grid, block=block, args=args, smem=smem, mem=self.mem)

    def close(self):
        pass


class SimArray:
    """A device array of SimDevice: an address in the interpreter's memory plus shape and dtype."""

    def __init__(self, dev, ptr, shape, dtype):
        self.dev, self.ptr, self.shape, self.dtype = dev, ptr, tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def view(self, offset, shape, dtype=None):
        """runtime.memory.DeviceArray.view: a window of this array's bytes."""
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offset < 0 or offset + n > self.nbytes:
            raise ValueError(f"view of bytes {offset}..{offset + n} outside a device array of {self.nbytes} bytes")
        return SimArray(self.dev, self.ptr + offset, shape, dt)

    def to_host(self) -> np.ndarray:
        return self.dev.run.get(self.ptr, self.shape, self.dtype)

    def copy_from_host(self, a):
        a = np.ascontiguousarray(a)
        if a.shape != self.shape or a.dtype != self.dtype:
            raise ValueError(f"host array {a.shape} {a.dtype} does not match device array {self.shape} {self.dtype}")
        self.dev.run.mem.write(self.ptr, a)
        return self

    def close(self):
        pass                                            # the interpreter's memory is not reused


class SimDevice:
    """runtime.gpu_device.CudaDevice's interface over the interpreter: GpuBackend(dev=SimDevice()).

    Fresh outputs are poisoned (NaN / 0xDEADBEEF), so an op that forgets to write shows up.
    capture() records the launches fn() makes and replay() runs them again, like a CUDA graph.
    """
    arch = "sim"
    array_type = SimArray
    stream = None                                       # launches run in order as they are made

    def __init__(self):
        self.run = SimRunner()
        self._recording = None

    def upload(self, a):
        a = np.ascontiguousarray(a)
        return SimArray(self, self.run.put(a), a.shape, a.dtype)

    def empty(self, shape, dtype=np.float32):
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        return SimArray(self, self.run.out(shape, dtype), shape, dtype)

    def download(self, d):
        return d.to_host()

    def launch(self, file, name, grid, block, args, smem=0):
        if self._recording is not None:
            self._recording.append((file, name, grid, block, list(args), smem))
        self.run.launch(file, name, grid, block, args, smem)

    def capture(self, fn):
        self._recording = []
        try:
            fn()
            rec = self._recording
        finally:
            self._recording = None
        dev = self

        class _Replay:
            launches = rec

            def replay(self, stream=None):
                for launch in rec:
                    dev.run.launch(*launch)

            def close(self):
                pass
        return _Replay()

    def close(self):
        pass


class GpuRunner:
    """Kernels on the device through runtime.driver/module/memory."""
    name = "gpu"

    def __init__(self):
        from runtime import driver as drv
        from runtime.memory import DeviceArray, cuda_pool
        from runtime.module import Module
        drv.init()
        self.ctx = drv.Context(0)
        self._DA, self._Module, self.pool = DeviceArray, Module, cuda_pool()
        self._mods, self._arrays = {}, []

    def put(self, arr):
        a = self._DA.from_host(self.pool, np.ascontiguousarray(arr))
        self._arrays.append(a)
        return a.ptr

    def out(self, shape, dtype):
        return self.put(poisoned(shape, dtype))

    def get(self, addr, shape, dtype):
        self.ctx.synchronize()
        out = np.empty(shape, dtype)
        self.pool.upstream.dtoh(out, addr)
        return out

    def launch(self, file, name, grid, block, args, smem=0):
        if file not in self._mods:
            self._mods[file] = self._Module.load_ptx((PTX_DIR / file).read_text(), file)
        f = self._mods[file].function(name)
        if smem > 48 * 1024:
            f.set_max_dynamic_smem(smem)
        f.launch(grid, block, [0 if a is None else a for a in args], smem=smem)
        self.ctx.synchronize()          # surfaces a launch failure at the case that caused it

    def close(self):
        for a in self._arrays:
            a.close()
        for m in self._mods.values():
            m.close()
        self.ctx.close()
