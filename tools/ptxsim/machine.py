"""Global memory (NumPy-backed) and the per-CTA machine state.

Global memory is one flat uint8 heap; allocation i occupies [start_i, end_i) at address
BASE + start_i, and every allocation is followed by a red zone of at least RED bytes that belongs to
no allocation, so an access past the end of a buffer is reported even when the next buffer follows.
Lookup of the allocation holding an address is a vectorised binary search (np.searchsorted), which
plays the role of a dict of allocations with bisect lookup but works on all threads at once.
Addresses start at 2**32 so that a kernel that truncates a pointer to 32 bits faults.
"""
from __future__ import annotations

import numpy as np

from .errors import SanitizerError, SimError

BASE = 1 << 32
ALIGN = 256
RED = 256


class GlobalMemory:
    def __init__(self):
        self.heap = np.zeros(1 << 16, np.uint8)
        self.starts = np.zeros(0, np.int64)
        self.ends = np.zeros(0, np.int64)
        self._top = 0

    # ---------------------------------------------------------------------------- host side
    def alloc(self, nbytes: int) -> int:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"alloc: negative size {nbytes}")
        start = -(-self._top // ALIGN) * ALIGN
        end = start + nbytes
        self._top = end + RED
        if self._top > self.heap.size:
            new = np.zeros(max(self._top, 2 * self.heap.size), np.uint8)
            new[: self.heap.size] = self.heap
            self.heap = new
        # poison fresh memory so that a kernel reading what nobody wrote gets garbage, not zeros
        self.heap[start:end] = 0xCD
        self.starts = np.append(self.starts, start)
        self.ends = np.append(self.ends, end)
        return BASE + start

    def alloc_from(self, arr) -> int:
        a = np.ascontiguousarray(arr)
        addr = self.alloc(a.nbytes)
        self.write(addr, a)
        return addr

    def _host_range(self, addr: int, nbytes: int) -> int:
        off = int(addr) - BASE
        i = int(np.searchsorted(self.starts, off, "right")) - 1
        if i < 0 or off + nbytes > self.ends[i] or off < self.starts[i]:
            raise SimError(f"host access [{addr:#x}, +{nbytes}) is not inside one allocation")
        return off

    def read(self, addr: int, dtype, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        off = self._host_range(addr, dt.itemsize * int(count))
        return self.heap[off: off + dt.itemsize * int(count)].view(dt).copy()

    def write(self, addr: int, arr) -> None:
        b = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        off = self._host_range(addr, b.size)
        self.heap[off: off + b.size] = b

    # -------------------------------------------------------------------------- device side
    def offsets(self, addrs: np.ndarray, size: int, st, tids, what: str) -> np.ndarray:
        """Heap offsets of `size`-byte accesses at `addrs` (one per thread in tids); a
        SanitizerError names the first thread whose access is misaligned or outside every
        allocation."""
        off = addrs.astype(np.int64) - BASE
        i = np.searchsorted(self.starts, off, "right") - 1
        ic = np.maximum(i, 0)
        ok = (i >= 0) & (off + size <= self.ends[ic]) if self.ends.size else np.zeros(off.shape, bool)
        if not ok.all():
            k = int(np.argmin(ok))
            raise st.sanitizer_error(f"out-of-bounds global {what} of {size} bytes", int(tids[k]),
                                     int(addrs[k]))
        if size > 1 and (off % size).any():
            k = int(np.argmax(off % size != 0))
            raise st.sanitizer_error(f"misaligned global {what} of {size} bytes", int(tids[k]),
                                     int(addrs[k]))
        return off

    def gather(self, off: np.ndarray, size: int) -> np.ndarray:
        """(n, size) uint8 bytes at the given heap offsets."""
        return self.heap[off[:, None] + np.arange(size)]

    def scatter(self, off: np.ndarray, data: np.ndarray) -> None:
        """Write (n, size) bytes; for two threads hitting the same bytes the higher tid wins
        (global write races are not checked)."""
        self.heap[off[:, None] + np.arange(data.shape[1])] = data
