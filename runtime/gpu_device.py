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
    """A linear weight on the device: planes (p, N, Kw) and its group parameters, in one of two forms:

    - float32 tables: scales / offsets (N, ngw), one entry per group of G lanes (G 16 or a multiple of
      32), code sums (N, Kw/4) for bgemm_b1;
    - two-level (an exact K-quant import, loader/kquant.py; kq != 0): scales = d and offsets = dmin
      float16 (N, ngw) per super-block of S lanes, sc int8 (or Q2_K's sc | m << 4, kq & 2) and m uint8
      (N, Kp/G) per sub-block of G = 16 or 32 lanes; the GEMVs rebuild s = d*sc/2 and o = c0*d*sc -
      dmin*m per sub-block (docs/DESIGN.md). No code sums: bgemm_b1 does not take these weights.
    """

    def __init__(self, be, lin: PackedLinear):
        if lin.group != 16 and lin.group % 32:
            raise ValueError(f"the GPU kernels need weight groups of 16 lanes or a multiple of 32, this weight "
                             f"has {lin.group}")
        gp = to_gpu_planes(lin.planes)
        self.lin, self.N, self.K, self.p, self.G = lin, lin.N, lin.K, lin.bits, lin.group
        self.Kw = gp.shape[2]
        self.planes = be.upload(gp)
        self.sc = self.m = self.csum = None
        sub = lin.sub
        if sub is not None:
            self.kq, self.S, self.c0 = 1 | (2 if sub.nib else 0), sub.S, float(sub.c0)
            self.ngw = sub.d.shape[1]
            self.scales = be.upload(np.ascontiguousarray(sub.d, np.float16))
            self.offsets = None if sub.dmin is None else be.upload(np.ascontiguousarray(sub.dmin, np.float16))
            self.sc = None if sub.sc is None else be.upload(np.ascontiguousarray(sub.sc))
            self.m = None if sub.m is None else be.upload(np.ascontiguousarray(sub.m, np.uint8))
        else:
            self.kq, self.S, self.c0 = 0, 0, 0.0
            self.ngw = lin.scales.shape[1]
            self.scales = be.upload(np.ascontiguousarray(lin.scales, np.float32))
            self.offsets = None if lin.offsets is None else be.upload(np.ascontiguousarray(lin.offsets, np.float32))
            self.csum = be.upload(chunk_code_sums(gp))
        self.smooth = None if lin.smooth is None else be.upload(np.ascontiguousarray(lin.smooth, np.float32))

    def kq_args(self) -> list:
        """The GEMVs' trailing arguments (sc, m, kq, S, c0): the two-level form, or kq = 0 (float32 tables)."""
        return [self.sc, self.m, self.kq, self.S, self.c0]

    @property
    def nbytes(self) -> int:
        """Device bytes of the weight (planes, parameters, code sums)."""
        return sum(a.nbytes for a in (self.planes, self.scales, self.offsets, self.sc, self.m, self.csum)
                   if a is not None)

    def close(self):
        from runtime.driver import Releaser
        rel = Releaser()                  # best effort: every array, the first error raised
        for a in (self.planes, self.scales, self.offsets, self.sc, self.m, self.csum, self.smooth):
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
