"""The device layer under GpuBackend: CudaDevice (pool memory, one stream, PTX modules, launches, graph
capture) and GpuLinear (a packed linear uploaded once in the GPU layout of runtime/gpu_layout.py).

tools/kernel_runners.SimDevice implements CudaDevice's interface over the PTX interpreter, which lets
the tests run GpuBackend and runtime/gpu_program.py without a GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loader.bipolar import PackedLinear
from runtime.gpu_layout import chunk_code_sums, to_gpu_planes

PTX_DIR = Path(__file__).resolve().parents[1] / "ptx"


class GpuLinear:
    """A linear weight on the device: planes (p, N, Kw), scales/offsets (N, ngw), code sums (N, Kw/4)."""

    def __init__(self, be, lin: PackedLinear):
        if lin.group % 32:
            # two-level imports of Q6_K / Q3_K / Q2_K have 16-lane sub-blocks (loader/kquant.py); the GPU
            # kernels apply one scale per 32-lane word at least
            raise ValueError(f"the GPU kernels need weight groups of 32 lanes or more, this weight has {lin.group} "
                             "(a 16-lane GGUF sub-block): run it on the CPU, or pack with --wbits below the "
                             "source's bits to re-quantize at 32")
        gp = to_gpu_planes(lin.planes)
        self.lin, self.N, self.K, self.p, self.G = lin, lin.N, lin.K, lin.bits, lin.group
        self.Kw, self.ngw = gp.shape[2], lin.scales.shape[1]
        self.planes = be.upload(gp)
        self.scales = be.upload(np.ascontiguousarray(lin.scales, np.float32))
        self.offsets = None if lin.offsets is None else be.upload(np.ascontiguousarray(lin.offsets, np.float32))
        self.csum = be.upload(chunk_code_sums(gp))
        self.smooth = None if lin.smooth is None else be.upload(np.ascontiguousarray(lin.smooth, np.float32))

    def close(self):
        from runtime.driver import Releaser
        rel = Releaser()                  # best effort: every array, the first error raised
        for a in (self.planes, self.scales, self.offsets, self.csum, self.smooth):
            if a is not None:
                rel(a.close)
        rel.done()


class CudaDevice:
    """The device layer GpuBackend runs on: pool memory, one stream, PTX modules, launches.

    Arrays are runtime.memory.DeviceArray. The same small interface is implemented over the PTX
    interpreter by tools.kernelcheck.SimDevice, which lets the tests run GpuBackend without a GPU.
    """

    def __init__(self, device: int = 0, pool_limit: int | None = None):
        from runtime import driver as drv
        from runtime.memory import DeviceArray, cuda_pool
        drv.init()                                   # NoGpuError without a usable GPU
        self.ctx = drv.Context(device)
        self.arch = self.ctx.props.arch
        self.pool = cuda_pool(pool_limit)
        self.stream = drv.Stream()
        self.array_type = DeviceArray
        self._modules: dict[str, object] = {}

    def upload(self, a: np.ndarray):
        return self.array_type.from_host(self.pool, np.ascontiguousarray(a), self.stream)

    def empty(self, shape, dtype=np.float32):
        return self.array_type(self.pool, shape, dtype, self.stream)

    def download(self, d) -> np.ndarray:
        self.stream.synchronize()
        return d.to_host()

    def launch(self, file, name, grid, block, args, smem=0):
        from runtime.module import Module
        m = self._modules.get(file)
        if m is None:
            m = self._modules[file] = Module.load_ptx((PTX_DIR / file).read_text(), file)
        f = m.function(name)
        if smem > 48 * 1024:
            f.set_max_dynamic_smem(smem)
        f.launch(grid, block, args, smem=smem, stream=self.stream)

    def capture(self, fn):
        from runtime.graph import Graph
        return Graph.capture(self.stream, fn)

    def close(self):
        """Modules, stream, pool and context, each released even if an earlier release failed (after a
        device fault all of them fail); the first error is raised."""
        from runtime.driver import Releaser
        rel = Releaser()
        for m in self._modules.values():
            rel(m.close)
        self._modules.clear()
        rel(self.stream.close)
        rel(self.pool.close)
        rel(self.ctx.close)
        rel.done()
