"""GpuLayoutOps: reshapes and row views of device arrays, column splits and the block Hadamard rotation
(ptx/rows.ptx), for the device-resident forward of runtime/gpu_program.py. A mixin of GpuBackend: it
uses the backend's _dev, empty, _launch and _finish."""
from __future__ import annotations

import numpy as np

from runtime.driver import cdiv


class GpuLayoutOps:
    def reshape(self, x, shape):
        """The same elements in another shape: a view for a device array, np.reshape for a host one."""
        if not self._is_dev(x):
            return np.reshape(x, shape)
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            raise ValueError(f"cannot reshape {x.shape} to {shape}")
        return x.view(0, shape)

    def rows(self, x, r0: int, n: int):
        """Rows r0 .. r0+n-1 of a device array (a view) or a host array (a slice)."""
        if not self._is_dev(x):
            return x[r0:r0 + n]
        row = int(np.prod(x.shape[1:])) * x.dtype.itemsize
        return x.view(r0 * row, (n,) + tuple(x.shape[1:]))

    def columns(self, x, col0: int, width: int):
        """x[:, col0:col0+width] as a new contiguous (M, width) array (splits the product of fused weights)."""
        xd, host = self._dev(x)
        M, cols = xd.shape
        if col0 < 0 or width <= 0 or col0 + width > cols:
            raise ValueError(f"columns {col0}..{col0 + width} outside {cols}")
        out = self.empty((M, width))
        self._launch("rows.ptx", "copy_cols_f32", (cdiv(M * width, 256), 1, 1), (256, 1, 1),
                     [out, xd, M, cols, col0, width])
        return self._finish(out, host, [xd] if host else [])

    def hadamard(self, x, block: int):
        """x R of loader/rotation.py (block Hadamard over the last axis), bitwise hadamard_blocks."""
        from loader.rotation import check_block
        xd, host = self._dev(x)
        K = xd.shape[-1]
        b = check_block(block, K)
        rows = int(np.prod(xd.shape[:-1]))
        out = self.empty(xd.shape)
        self._launch("rows.ptx", "hadamard_f32", (K // b, rows, 1), (256, 1, 1),
                     [out, xd, K, b, float(np.float32(1.0 / np.sqrt(b)))], smem=4 * b)
        return self._finish(out, host, [xd] if host else [])
