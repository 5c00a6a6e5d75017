"""Device memory: a best-fit pool over an injected upstream (arrays on it: runtime/device_arrays.py).

The pool's policy (best fit, split, coalesce, limit, OOM retry, stream-ordered reuse) never touches
the driver itself: it talks to an `Upstream` (alloc/free of big chunks) and an `Events` interface
(record/wait/synchronize/destroy), so every rule is tested against fakes without a GPU.

Invariants:
- every block lies inside exactly one upstream allocation (a "segment"); neighbours are linked only
  within their segment, so coalescing can never merge memory from two cuMemAlloc calls;
- free blocks are indexed by (size, addr) in a sorted list: best fit is one bisect;
- a block freed on stream A carries the events recorded at free time; reusing it on another stream
  first makes that stream wait on them (same stream: nothing to do, the stream orders itself).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from loader.bipolar import round_up
from runtime.errors import CudaError, OutOfMemoryError

ALIGN = 256
DEFAULT_CHUNK = 2 << 20


class UpstreamExhausted(MemoryError):
    """Raised by an upstream that has no memory for the request (the pool then trims and retries)."""


class Upstream(Protocol):
    def alloc(self, size: int) -> int: ...          # raises UpstreamExhausted when out of memory
    def free(self, addr: int) -> None: ...


class Events(Protocol):
    def record(self, stream) -> object: ...
    def wait(self, stream, event) -> None: ...      # make `stream` wait for `event`
    def synchronize(self, event) -> None: ...       # host waits for `event`
    def destroy(self, event) -> None: ...




@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    segment: int                  # base address of the upstream allocation holding it
    free: bool = True
    prev: "_Block | None" = None  # address-order neighbours inside the same segment
    next: "_Block | None" = None
    pending: list = field(default_factory=list)   # [(stream, event)] recorded when freed


@dataclass(frozen=True)
class PoolStats:
    used: int               # bytes handed out (rounded to ALIGN)
    cached: int             # bytes held from upstream but free
    reserved: int           # bytes held from upstream
    peak: int               # highest `used` so far
    n_upstream_blocks: int
    n_allocations: int
    largest_free: int
    fragmentation: float    # 1 - largest_free / total free; 0 when nothing is free


class PoolAllocator:
    def __init__(self, upstream: Upstream, limit: int | None = None, chunk: int = DEFAULT_CHUNK,
                 events: Events | None = None):
        if chunk <= 0 or chunk % ALIGN:
            raise ValueError(f"chunk must be a positive multiple of {ALIGN}, got {chunk}")
        self.upstream, self.limit, self.chunk, self.events = upstream, limit, chunk, events
        self._blocks: dict[int, _Block] = {}          # addr -> block (free and used)
        self._free: list[tuple[int, int]] = []        # sorted (size, addr) of free blocks
        self._segments: dict[int, int] = {}           # base -> size
        self.used = self.reserved = self.peak = 0
        self._n_alloc = 0
        self._ev_refs: dict[int, list] = {}            # id(event) -> [event, blocks referencing it]

    # -- bookkeeping ----------------------------------------------------------------------------
    def _index(self, b: _Block) -> None:
        bisect.insort(self._free, (b.size, b.addr))

    def _unindex(self, b: _Block) -> None:
        i = bisect.bisect_left(self._free, (b.size, b.addr))
        del self._free[i]

    def _new_segment(self, size: int) -> _Block:
        base = int(self.upstream.alloc(size))
        if base % ALIGN:
            self.upstream.free(base)
            raise ValueError(f"upstream returned {base:#x}, not {ALIGN}-byte aligned")
        self._segments[base] = size
        self.reserved += size
        b = _Block(base, size, base)
        self._blocks[base] = b
        self._index(b)
        return b

    def _grow(self, size: int) -> _Block | None:
        """A new segment for `size`, or None when the limit or the upstream says no."""
        want = round_up(size, self.chunk)
        if self.limit is not None and self.reserved + want > self.limit:
            want = size  # a whole chunk does not fit under the limit: ask for just what is needed
            if self.reserved + want > self.limit:
                return None
        try:
            return self._new_segment(want)
        except UpstreamExhausted:
            return None

    # -- public API ------------------------------------------------------------------------------
    def alloc(self, nbytes: int, stream=None) -> int:
        """Device address of `nbytes` (>= 1), 256-byte aligned, usable in order on `stream`."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
            raise ValueError(f"allocation size must be a positive int, got {nbytes!r}")
        size = round_up(nbytes, ALIGN)
        i = bisect.bisect_left(self._free, (size, -1))
        if i < len(self._free):
            b = self._blocks[self._free[i][1]]
        else:
            b = self._grow(size)
            if b is None:
                self.trim()           # give cached segments back, then try once more
                b = self._grow(size)
            if b is None:
                raise OutOfMemoryError(size, self.used, self.limit)
        self._unindex(b)
        if b.size - size >= ALIGN:    # split: the tail stays free, keeps the same pending events
            tail = _Block(b.addr + size, b.size - size, b.segment, True, b, b.next, list(b.pending))
            for _, ev in tail.pending:   # both halves now reference the same events
                self._ev_refs[id(ev)][1] += 1
            if b.next is not None:
                b.next.prev = tail
            b.next, b.size = tail, size
            self._blocks[tail.addr] = tail
            self._index(tail)
        self._sync_pending(b, stream)
        b.free = False
        self.used += b.size
        self.peak = max(self.peak, self.used)
        self._n_alloc += 1
        return b.addr

    def _sync_pending(self, b: _Block, stream) -> None:
        for s, ev in b.pending:
            if s is not stream and s != stream:
                self.events.wait(stream, ev)
            self._drop(ev)            # the driver defers destruction until the wait is resolved
        b.pending = []

    def _drop(self, ev) -> None:
        ref = self._ev_refs[id(ev)]
        ref[1] -= 1
        if ref[1] == 0:
            del self._ev_refs[id(ev)]
            self.events.destroy(ev)

    def free(self, addr: int, stream=None) -> None:
        """Return a block. With `stream`, later users on other streams wait for the work queued on
        `stream` so far (an event is recorded now); stream=None means the memory is idle already."""
        b = self._blocks.get(int(addr))
        if b is None:
            raise ValueError(f"free of {int(addr):#x}: not an address allocated by this pool")
        if b.free:
            raise ValueError(f"double free of {int(addr):#x}")
        if stream is not None:
            if self.events is None:
                raise ValueError("free(ptr, stream) needs a pool built with an `events` interface")
            ev = self.events.record(stream)
            self._ev_refs[id(ev)] = [ev, 1]
            b.pending.append((stream, ev))
        b.free = True
        self.used -= b.size
        self._n_alloc -= 1
        for nb in (b.next, b.prev):   # coalesce with free neighbours of the same segment
            if nb is not None and nb.free:
                self._unindex(nb)         # b itself is not in the index yet
                lo, hi = (b, nb) if nb is b.next else (nb, b)
                lo.size += hi.size
                lo.next = hi.next
                if hi.next is not None:
                    hi.next.prev = lo
                lo.pending.extend(hi.pending)
                del self._blocks[hi.addr]
                b = lo
        self._index(b)

    def trim(self) -> int:
        """Release every segment that is entirely free; returns the bytes given back."""
        released = 0
        for base, size in list(self._segments.items()):
            b = self._blocks[base]
            if b.free and b.size == size:
                for _, ev in b.pending:        # work still queued on that memory must finish first
                    self.events.synchronize(ev)
                    self._drop(ev)
                self._unindex(b)
                del self._blocks[base], self._segments[base]
                self.upstream.free(base)
                self.reserved -= size
                released += size
        return released

    def close(self) -> None:
        """Give everything back to the upstream, including blocks still in use.

        Best effort: after a device fault every driver call fails, so each event and segment is released
        even when an earlier one failed, the pool ends empty either way, and the first error is raised."""
        from runtime.driver import Releaser
        rel = Releaser()
        for b in self._blocks.values():
            for _, ev in b.pending:
                rel(self.events.synchronize, ev)
                rel(self._drop, ev)
            b.pending = []
        for base in list(self._segments):
            rel(self.upstream.free, base)
        self._blocks.clear(), self._free.clear(), self._segments.clear(), self._ev_refs.clear()
        self.used = self.reserved = self._n_alloc = 0
        rel.done()

    def size_of(self, addr: int) -> int:
        b = self._blocks.get(int(addr))
        if b is None or b.free:
            raise ValueError(f"{int(addr):#x} is not a live allocation of this pool")
        return b.size

    def stats(self) -> PoolStats:
        free_total = self.reserved - self.used
        largest = self._free[-1][0] if self._free else 0
        frag = 0.0 if free_total == 0 else 1.0 - largest / free_total
        return PoolStats(self.used, free_total, self.reserved, self.peak, len(self._segments),
                         self._n_alloc, largest, frag)

    def blocks(self) -> list[tuple[int, int, bool, int]]:
        """(addr, size, free, segment) of every block in address order (for tests and debugging)."""
        return sorted((b.addr, b.size, b.free, b.segment) for b in self._blocks.values())


# ---- CUDA implementations of the injected interfaces ---------------------------------------------

class CudaUpstream:
    """cuMemAlloc / cuMemFree; CUDA_ERROR_OUT_OF_MEMORY becomes UpstreamExhausted."""

    def alloc(self, size: int) -> int:
        from runtime.driver import check, driver
        try:
            return int(check(driver().cuMemAlloc(size), "cuMemAlloc"))
        except CudaError as e:
            if e.code == 2:  # CUDA_ERROR_OUT_OF_MEMORY
                raise UpstreamExhausted(str(e)) from e
            raise

    def free(self, addr: int) -> None:
        from runtime.driver import check, driver
        check(driver().cuMemFree(addr), "cuMemFree")

    def htod(self, dst: int, src: np.ndarray, stream=None) -> None:
        """Copy in, ordered on `stream`. Why not the synchronous copy: it runs on the legacy stream,
        which does not order itself with the project's non-blocking streams, so a kernel queued on them
        could still read the memory being overwritten, or start before the copy has landed."""
        from runtime.driver import memcpy_htod
        memcpy_htod(dst, src, stream)

    def dtoh(self, dst: np.ndarray, src: int, stream=None) -> None:
        """Copy out after the work queued on `stream`; returns when the host array is filled."""
        from runtime.driver import memcpy_dtoh
        memcpy_dtoh(dst, src, stream)
        if stream is not None:
            stream.synchronize()


class CudaEvents:
    """Events for stream-ordered reuse (timing disabled: they only order work)."""

    def record(self, stream):
        from runtime.driver import Event
        return Event(timing=False).record(stream)

    def wait(self, stream, event) -> None:
        from runtime.driver import check, driver, stream_handle
        check(driver().cuStreamWaitEvent(stream_handle(stream), event.handle, 0), "cuStreamWaitEvent")

    def synchronize(self, event) -> None:
        event.synchronize()

    def destroy(self, event) -> None:
        event.close()


def cuda_pool(limit: int | None = None, chunk: int = DEFAULT_CHUNK) -> PoolAllocator:
    return PoolAllocator(CudaUpstream(), limit=limit, chunk=chunk, events=CudaEvents())


# the arrays built on the pool live in runtime/device_arrays.py; imported here for existing callers
from runtime.device_arrays import DeviceArray  # noqa: E402,F401
