"""Arrays on the pool of runtime/memory.py: typed device arrays (and their views), pinned host buffers,
KV-cache blocks."""
from __future__ import annotations

import numpy as np

from runtime.errors import OutOfMemoryError
from runtime.memory import ALIGN, PoolAllocator, round_up


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


class PinnedBuffer:
    """Page-locked host memory (cuMemHostAlloc) for fast/async staging copies; `.array` views it."""

    def __init__(self, nbytes: int):
        import ctypes

        from runtime.driver import check, driver
        self.nbytes = int(nbytes)
        self.addr = int(check(driver().cuMemHostAlloc(self.nbytes, 0), "cuMemHostAlloc"))
        self._raw = (ctypes.c_char * self.nbytes).from_address(self.addr)

    def array(self, shape, dtype=np.float32) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        if n > self.nbytes:
            raise ValueError(f"view of {n} bytes exceeds pinned buffer of {self.nbytes} bytes")
        return np.frombuffer(self._raw, dtype=dt, count=n // dt.itemsize).reshape(shape)

    def close(self) -> None:
        if self.addr:
            from runtime.driver import check, driver
            a, self.addr, self._raw = self.addr, 0, None
            check(driver().cuMemFreeHost(a), "cuMemFreeHost")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class KVCacheBlocks:
    """Fixed-size KV blocks carved from the pool: one pool allocation per layer holding n_blocks
    blocks of (K, V) x block_tokens x n_kv_heads x head_dim; block ids are shared by all layers."""

    def __init__(self, pool: PoolAllocator, n_layers: int, n_blocks: int, block_tokens: int,
                 n_kv_heads: int, head_dim: int, dtype=np.float16):
        for nm, v in (("n_layers", n_layers), ("n_blocks", n_blocks), ("block_tokens", block_tokens),
                      ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if int(v) < 1:
                raise ValueError(f"KVCacheBlocks: {nm} must be >= 1, got {v}")
        self.pool, self.n_layers, self.n_blocks = pool, n_layers, n_blocks
        self.block_tokens, self.dtype = block_tokens, np.dtype(dtype)
        self.half_bytes = round_up(block_tokens * n_kv_heads * head_dim * self.dtype.itemsize, ALIGN)
        self.block_bytes = 2 * self.half_bytes
        self._layers: list[int] = []
        try:
            for _ in range(n_layers):
                self._layers.append(pool.alloc(n_blocks * self.block_bytes))
        except BaseException:
            self.close()
            raise
        self._free_ids = list(range(n_blocks - 1, -1, -1))

    @property
    def n_free(self) -> int:
        return len(self._free_ids)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free_ids):
            raise OutOfMemoryError(n * self.block_bytes * self.n_layers,
                                   (self.n_blocks - len(self._free_ids)) * self.block_bytes * self.n_layers,
                                   self.n_blocks * self.block_bytes * self.n_layers)
        return [self._free_ids.pop() for _ in range(n)]

    def release(self, ids) -> None:
        for i in ids:
            if not 0 <= i < self.n_blocks or i in self._free_ids:
                raise ValueError(f"KV block {i} is not allocated")
            self._free_ids.append(i)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_tokens)

    def k_ptr(self, layer: int, block: int) -> int:
        if not (0 <= layer < self.n_layers and 0 <= block < self.n_blocks):
            raise IndexError(f"KV block ({layer}, {block}) out of range "
                             f"({self.n_layers} layers, {self.n_blocks} blocks)")
        return self._layers[layer] + block * self.block_bytes

    def v_ptr(self, layer: int, block: int) -> int:
        return self.k_ptr(layer, block) + self.half_bytes

    def close(self) -> None:
        from runtime.driver import Releaser
        rel = Releaser()                   # every layer is returned even if one free fails
        layers, self._layers = self._layers, []
        for p in layers:
            rel(self.pool.free, p)
        rel.done()
