"""Arrays on the pool of runtime/memory.py: typed device arrays and their views."""
from __future__ import annotations

import numpy as np

from runtime.memory import PoolAllocator


def _shape(shape) -> tuple:
    t = tuple(int(s) for s in np.atleast_1d(shape))
    if any(s < 0 for s in t):
        raise ValueError(f"negative dimension in shape {t}")
    return t


class DeviceArray:
    """An n-d array in pool memory. Host copies go through the pool's upstream (htod/dtoh), ordered
    on the array's stream. view() gives windows of it (reshapes, rows, arena slices) that never free."""

    _base = None            # set on views: the array that owns the memory

    def __init__(self, pool: PoolAllocator, shape, dtype=np.float32, stream=None):
        self.pool, self.shape, self.dtype = pool, _shape(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.stream = stream
        self.ptr = pool.alloc(max(self.nbytes, 1), stream)

    def view(self, offset: int, shape, dtype=None) -> "DeviceArray":
        """The bytes offset .. offset + size of this array as a new (shape, dtype) array. A view is valid
        while its owner is open; closing a view frees nothing."""
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        shape = _shape(shape)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if self.ptr is None:
            raise ValueError("view of a closed device array")
        if offset < 0 or offset + n > self.nbytes:
            raise ValueError(f"view of bytes {offset}..{offset + n} outside a device array of {self.nbytes} bytes")
        v = object.__new__(DeviceArray)
        v.pool, v.shape, v.dtype, v.nbytes, v.stream = self.pool, shape, dt, n, self.stream
        v.ptr, v._base = self.ptr + offset, (self._base or self)
        return v

    def copy_from_host(self, a: np.ndarray) -> "DeviceArray":
        a = np.ascontiguousarray(a)
        if a.shape != self.shape or a.dtype != self.dtype:
            raise ValueError(f"host array {a.shape} {a.dtype} does not match device array "
                             f"{self.shape} {self.dtype}")
        self.pool.upstream.htod(self.ptr, a, self.stream)
        return self

    def to_host(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.pool.upstream.dtoh(out, self.ptr, self.stream)
        return out

    @classmethod
    def from_host(cls, pool: PoolAllocator, a: np.ndarray, stream=None) -> "DeviceArray":
        a = np.ascontiguousarray(a)
        return cls(pool, a.shape, a.dtype, stream).copy_from_host(a)

    def close(self) -> None:
        if self.ptr is not None:
            p, self.ptr = self.ptr, None
            if self._base is None:
                self.pool.free(p, self.stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
