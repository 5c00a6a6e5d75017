"""PoolAllocator policy against a simulated address space and fake events (no GPU)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import OutOfMemoryError
from runtime.memory import (ALIGN, DeviceArray, PoolAllocator, UpstreamExhausted,
                            round_up)

MiB = 1 << 20


class FakeUpstream:
    """A simulated device address space: allocations are placed with gaps at distinct bases, bytes
    are stored so host copies round-trip, and `capacity` / `fail_next` inject failures."""

    def __init__(self, capacity=None):
        self.capacity, self.fail_next = capacity, 0
        self.live = {}              # base -> size
        self.next_base = 0x7000_0000_0000
        self.mem = {}               # base -> bytearray
        self.n_alloc = self.n_free = 0

    @property
    def in_use(self):
        return sum(self.live.values())

    def alloc(self, size):
        if self.fail_next:
            self.fail_next -= 1
            raise UpstreamExhausted("injected failure")
        if self.capacity is not None and self.in_use + size > self.capacity:
            raise UpstreamExhausted(f"fake device full: {self.in_use} + {size} > {self.capacity}")
        base = self.next_base
        self.next_base += round_up(size, 1 << 21) + (1 << 21)   # a gap: segments never touch
        self.live[base] = size
        self.mem[base] = bytearray(size)
        self.n_alloc += 1
        return base

    def free(self, addr):
        assert addr in self.live, f"free of unknown upstream block {addr:#x}"
        del self.live[addr], self.mem[addr]
        self.n_free += 1

    def _locate(self, addr, n):
        for base, size in self.live.items():
            if base <= addr and addr + n <= base + size:
                return self.mem[base], addr - base
        raise AssertionError(f"access {addr:#x}+{n} outside every upstream allocation")

    def htod(self, dst, src, stream=None):
        buf, off = self._locate(dst, src.nbytes)
        buf[off:off + src.nbytes] = src.tobytes()

    def dtoh(self, dst, src, stream=None):
        buf, off = self._locate(src, dst.nbytes)
        dst.view(np.uint8).reshape(-1)[:] = np.frombuffer(bytes(buf[off:off + dst.nbytes]), np.uint8)


class FakeEvents:
    def __init__(self):
        self.log, self.n, self.live = [], 0, set()

    def record(self, stream):
        self.n += 1
        ev = f"ev{self.n}@{stream}"
        self.live.add(ev)
        self.log.append(("record", stream, ev))
        return ev

    def wait(self, stream, ev):
        assert ev in self.live, f"wait on destroyed event {ev}"
        self.log.append(("wait", stream, ev))

    def synchronize(self, ev):
        assert ev in self.live
        self.log.append(("sync", ev))

    def destroy(self, ev):
        self.live.remove(ev)
        self.log.append(("destroy", ev))


def make(limit=None, capacity=None, chunk=2 * MiB):
    up, ev = FakeUpstream(capacity), FakeEvents()
    return PoolAllocator(up, limit=limit, chunk=chunk, events=ev), up, ev


def check_invariants(pool, up, live):
    """live: {addr: requested size}. Checks no overlap, alignment, containment, exact stats."""
    blocks = pool.blocks()
    segs = up.live
    # blocks tile every segment exactly, in address order, without gaps or overlap
    for base, size in segs.items():
        mine = [b for b in blocks if b[3] == base]
        pos = base
        for addr, bsize, _free, _ in mine:
            assert addr == pos and addr % ALIGN == 0 and bsize % ALIGN == 0 and bsize > 0
            pos += bsize
        assert pos == base + size
        # coalescing is complete: no two adjacent free blocks in a segment
        assert not any(a[2] and b[2] for a, b in zip(mine, mine[1:]))
    assert sum(b[1] for b in blocks) == sum(segs.values())
    used = {b[0]: b[1] for b in blocks if not b[2]}
    assert set(used) == set(live)
    for a, n in live.items():
        assert used[a] == round_up(n, ALIGN)
    s = pool.stats()
    assert s.used == sum(used.values()) and s.reserved == up.in_use
    assert s.cached == s.reserved - s.used and s.n_upstream_blocks == len(segs)
    free_sizes = [b[1] for b in blocks if b[2]]
    largest = max(free_sizes, default=0)
    assert s.largest_free == largest
    total_free = sum(free_sizes)
    assert s.fragmentation == pytest.approx(0.0 if total_free == 0 else 1 - largest / total_free)


ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, 3 * MiB)),
    st.tuples(st.just("alloc"), st.integers(1, 4096)),
    st.tuples(st.just("free"), st.integers(0, 10**6)),
), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_sequences_against_model(seq):
    pool, up, _ = make()
    live, peak = {}, 0
    for op, arg in seq:
        if op == "alloc":
            a = pool.alloc(arg)
            assert a not in live
            live[a] = arg
            peak = max(peak, sum(round_up(n, ALIGN) for n in live.values()))
        elif live:
            a = sorted(live)[arg % len(live)]
            pool.free(a)
            del live[a]
        check_invariants(pool, up, live)
        assert pool.stats().peak == peak
    for a in list(live):
        pool.free(a)
    check_invariants(pool, up, {})
    # everything freed -> exactly one free block per upstream allocation
    assert len(pool.blocks()) == len(up.live)
    assert pool.stats().fragmentation == 0.0 or len(up.live) > 1
    reserved = pool.stats().reserved
    assert pool.trim() == reserved
    assert up.live == {} and up.n_alloc == up.n_free and pool.stats().reserved == 0


def test_best_fit_split_and_coalesce():
    pool, up, _ = make()
    a = pool.alloc(1000)              # rounds to 1024
    b = pool.alloc(3000)              # 3072
    c = pool.alloc(512)
    assert (b - a, c - b) == (1024, 3072) and len(up.live) == 1
    pool.free(a)
    pool.free(c)                      # c merges with the tail of the segment
    # best fit: a 1024 request takes the 1024 hole, not the big tail
    assert pool.alloc(1024) == a
    pool.free(a)
    pool.free(b)                      # a + b + tail coalesce into one block
    assert pool.blocks() == [(a, 2 * MiB, True, a)]


def test_never_merges_across_upstream_allocations():
    pool, up, _ = make(chunk=4096)
    x = pool.alloc(4096)
    y = pool.alloc(4096)
    assert len(up.live) == 2
    up.next_base = 0  # irrelevant afterwards; bases were already distinct
    pool.free(x)
    pool.free(y)
    assert len(pool.blocks()) == 2 and pool.stats().fragmentation == pytest.approx(0.5)
    with pytest.raises(Exception):
        pool.free(x)
    assert pool.trim() == 8192 and up.live == {}


def test_large_request_rounds_to_chunks():
    pool, up, _ = make()
    a = pool.alloc(5 * MiB + 1)
    assert list(up.live.values()) == [6 * MiB] and pool.size_of(a) == round_up(5 * MiB + 1, ALIGN)


def test_limit_and_oom_retry_after_trim():
    pool, up, _ = make(limit=5 * MiB)
    a = pool.alloc(2 * MiB)
    b = pool.alloc(1 * MiB)
    pool.free(a)                          # a's segment is now cached, fully free
    assert pool.stats().reserved == 4 * MiB
    c = pool.alloc(3 * MiB)               # needs a new segment: over the limit until a is trimmed
    assert up.n_free == 1 and sorted(up.live.values()) == [2 * MiB, 3 * MiB]
    assert pool.stats().reserved == 5 * MiB
    pool.free(b), pool.free(c)


def test_limit_smaller_than_a_chunk_takes_exact_size():
    pool, up, _ = make(limit=3 * MiB)
    pool.alloc(2 * MiB)
    pool.alloc(512 * 1024)                # a full chunk would exceed the limit: exact size instead
    assert sorted(up.live.values()) == [512 * 1024, 2 * MiB]


def test_oom_error_has_sizes_in_human_units():
    pool, up, _ = make(limit=4 * MiB)
    pool.alloc(3 * MiB)
    with pytest.raises(OutOfMemoryError) as ei:
        pool.alloc(2 * MiB)
    e = ei.value
    assert (e.size, e.used, e.limit) == (2 * MiB, 3 * MiB, 4 * MiB)
    assert "requested 2.00 MiB, 3.00 MiB in use, limit 4.00 MiB" in str(e)


def test_upstream_failure_frees_cache_then_succeeds():
    pool, up, _ = make(capacity=8 * MiB)
    a = pool.alloc(3 * MiB)               # a 4 MiB segment
    pool.free(a)
    b = pool.alloc(5 * MiB)               # 6 MiB more does not fit the device -> trim a's, retry
    assert up.n_free == 1 and list(up.live.values()) == [6 * MiB]
    assert pool.stats().used == 5 * MiB and pool.size_of(b) == 5 * MiB


def test_upstream_failure_without_cache_raises():
    pool, up, _ = make()
    up.fail_next = 2                      # the first try and the retry both fail
    with pytest.raises(OutOfMemoryError, match="no limit"):
        pool.alloc(100)
    up.fail_next = 1                      # only the first try fails: the retry after trim succeeds
    assert pool.alloc(100) % ALIGN == 0


def test_cross_stream_reuse_waits_same_stream_does_not():
    pool, up, ev = make()
    a = pool.alloc(4096, stream="A")
    pool.free(a, stream="A")
    rec = [e for e in ev.log if e[0] == "record"]
    assert rec == [("record", "A", "ev1@A")]
    b = pool.alloc(4096, stream="A")      # same stream: ordered by the stream itself
    assert b == a and not [e for e in ev.log if e[0] == "wait"]
    pool.free(b, stream="A")
    c = pool.alloc(4096, stream="B")      # other stream: must wait for A's work on that memory
    assert c == a
    assert ("wait", "B", "ev2@A") in ev.log
    # the rest of the segment (split off each time) still references both events
    assert ev.live == {"ev1@A", "ev2@A"}
    pool.free(c)                          # stream=None: idle memory, no new event
    assert pool.trim() == 2 * MiB
    assert ev.live == set() and ("sync", "ev1@A") in ev.log  # trim waits before giving memory back


def test_split_tail_keeps_pending_event_until_trim():
    pool, up, ev = make()
    a = pool.alloc(2 * MiB, stream="A")
    pool.free(a, stream="A")
    b = pool.alloc(4096, stream="B")      # splits the block; the tail still carries ev1
    assert ("wait", "B", "ev1@A") in ev.log and "ev1@A" in ev.live
    c = pool.alloc(8192, stream="C")      # the tail is reused on C: waits on the same event
    assert ("wait", "C", "ev1@A") in ev.log and "ev1@A" in ev.live   # still referenced by the rest
    pool.free(b), pool.free(c)
    pool.trim()
    assert ("sync", "ev1@A") in ev.log and ev.live == set() and up.live == {}


def test_free_errors():
    pool, up, _ = make()
    with pytest.raises(ValueError, match="not an address allocated by this pool"):
        pool.free(12345)
    with pytest.raises(ValueError, match="positive int"):
        pool.alloc(0)
    a = pool.alloc(10)
    pool.free(a)
    with pytest.raises(ValueError, match="double free"):
        pool.free(a)
    nopool = PoolAllocator(FakeUpstream())
    b = nopool.alloc(10)
    with pytest.raises(ValueError, match="events"):
        nopool.free(b, stream="A")


def test_device_array_roundtrip_and_close():
    pool, up, _ = make()
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with DeviceArray.from_host(pool, x) as d:
        assert d.nbytes == 96 and d.ptr % ALIGN == 0
        np.testing.assert_array_equal(d.to_host(), x)
        with pytest.raises(ValueError, match="does not match"):
            d.copy_from_host(x.astype(np.float64))
    assert pool.stats().used == 0


def test_device_array_views_share_memory_and_never_free():
    pool, up, _ = make()
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    d = DeviceArray.from_host(pool, x)
    row = d.view(48, (3, 4))                            # the second row, bytes 48..96
    np.testing.assert_array_equal(row.to_host(), x[1])
    flat = row.view(16, (2, 4), np.int32)              # a view of a view: offsets add up
    assert flat.ptr == d.ptr + 64 and flat._base is d
    row.copy_from_host(np.full((3, 4), 7, np.float32))
    np.testing.assert_array_equal(d.to_host()[1], 7)
    used = pool.stats().used
    row.close()
    flat.close()
    assert pool.stats().used == used                   # views give nothing back
    with pytest.raises(ValueError, match="outside"):
        d.view(64, (3, 4))
    with pytest.raises(ValueError, match="outside"):
        d.view(-4, (1,))
    d.close()
    assert pool.stats().used == 0
    with pytest.raises(ValueError, match="closed"):
        d.view(0, (1,))


class FaultedUpstream(FakeUpstream):
    """After a device fault every driver call fails with the same error (CUDA_ERROR_ILLEGAL_ADDRESS)."""

    def __init__(self):
        super().__init__()
        self.faulted, self.tried = False, []

    def free(self, addr):
        self.tried.append(addr)
        if self.faulted:
            from runtime.errors import CudaError
            raise CudaError(700, "CUDA_ERROR_ILLEGAL_ADDRESS", f"cuMemFree({addr:#x})")
        super().free(addr)


def test_close_after_a_fault_tries_every_segment_and_raises_the_first_error():
    from runtime.errors import CudaError
    up, ev = FaultedUpstream(), FakeEvents()
    pool = PoolAllocator(up, chunk=2 * MiB, events=ev)
    a, b, c = pool.alloc(4 * MiB), pool.alloc(4 * MiB), pool.alloc(100)   # three segments, all full
    pool.free(c, stream="S")                      # a pending event too
    up.faulted = True
    with pytest.raises(CudaError, match="cuMemFree") as ei:
        pool.close()
    assert len(up.tried) == 3 and ei.value.call == f"cuMemFree({up.tried[0]:#x})"   # the first one
    assert pool.stats().reserved == 0 and pool.blocks() == []                       # nothing kept
    pool.close()                                  # and a second close has nothing left to do
