"""Shared memory of one CTA with the sanitizer's shadow state.

Per byte the shadow keeps: the last writer (thread id; -1 never written since launch, -3 atomics),
the barrier epoch of that write, the reader of the current epoch (a thread id, or -2 for "two or
more threads") and whether a cp.async copy into it is still in flight.  The epoch advances at every
CTA barrier release, so "same epoch" means "no bar.sync in between".

Checks (each a SanitizerError naming thread, shared address and PTX line):
- any access outside [0, static + dynamic size), or misaligned;
- a read of a byte nobody wrote since launch, or with a cp.async copy still pending into it (the
  copy is applied at cp.async.wait_group / wait_all, never earlier: reading before the wait is
  caught even when the buffer holds stale data from an earlier iteration);
- a race: two different threads touch the same byte in the same epoch and at least one writes
  (read-after-write, write-after-read, write-after-write).  Lanes of one warp storing to the same
  byte in one instruction race too, unless they store the same value.  Atomics do not race with
  each other but do with plain accesses.
"""
from __future__ import annotations

import numpy as np

NEVER, MANY, ATOMIC = -1, -2, -3


class SharedMemory:
    def __init__(self, size: int, sanitize: bool):
        self.size = size
        self.data = np.full(size, 0xCD, np.uint8)       # poison: unwritten bytes are not zero
        self.sanitize = sanitize
        self.epoch = 0
        if sanitize:
            self.w_tid = np.full(size, NEVER, np.int32)
            self.w_ep = np.full(size, -1, np.int32)
            self.r_tid = np.full(size, NEVER, np.int32)
            self.r_ep = np.full(size, -1, np.int32)
            self.pending = np.zeros(size, bool)
            self.pend_tid = np.full(size, -1, np.int32)

    # ------------------------------------------------------------------------------ addressing
    def offsets(self, addrs: np.ndarray, size: int, st, tids, what: str) -> np.ndarray:
        off = addrs.astype(np.int64)
        bad = (off < 0) | (off + size > self.size)
        if bad.any():
            k = int(np.argmax(bad))
            raise st.sanitizer_error(f"out-of-bounds shared {what} of {size} bytes (shared size "
                                     f"{self.size})", int(tids[k]), int(addrs[k]), shared=True)
        if size > 1 and (off % size).any():
            k = int(np.argmax(off % size != 0))
            raise st.sanitizer_error(f"misaligned shared {what} of {size} bytes", int(tids[k]),
                                     int(addrs[k]), shared=True)
        return off

    # ------------------------------------------------------------------------------- accesses
    def load(self, off, size, st, tids) -> np.ndarray:
        B = off[:, None] + np.arange(size)
        if self.sanitize:
            self._check_read(B, tids, st)
        return self.data[B]

    def store(self, off, data, st, tids) -> None:
        B = off[:, None] + np.arange(data.shape[1])
        if self.sanitize:
            self._check_write(B, tids, st, data)
            T = np.broadcast_to(tids[:, None], B.shape)
            self.w_tid[B] = T
            self.w_ep[B] = self.epoch
        self.data[B] = data

    def atomic_check(self, off, size, st, tids) -> None:
        if not self.sanitize:
            return
        B = off[:, None] + np.arange(size)
        T = np.broadcast_to(tids[:, None], B.shape)
        self._pending_and_unwritten(B, T, st)
        w = self.w_tid[B]
        bad = (self.w_ep[B] == self.epoch) & (w != T) & (w != ATOMIC)
        bad |= (self.r_ep[B] == self.epoch) & (self.r_tid[B] != T)
        if bad.any():
            self._race(B, T, bad, st, "atomic on shared memory accessed by another thread")
        self.w_tid[B] = ATOMIC
        self.w_ep[B] = self.epoch

    def async_issue(self, off, size, st, tids) -> None:
        """cp.async issued: the destination is in flight until the wait applies it."""
        if not self.sanitize:
            return
        B = off[:, None] + np.arange(size)
        T = np.broadcast_to(tids[:, None], B.shape)
        if self.pending[B].any():
            k = np.argwhere(self.pending[B])[0]
            raise st.sanitizer_error("cp.async into shared memory that already has a copy in flight",
                                     int(T[k[0], k[1]]), int(B[k[0], k[1]]), shared=True)
        self._write_conflicts(B, T, st)
        self.pending[B] = True
        self.pend_tid[B] = T

    def async_apply(self, off, data, tids) -> None:
        B = off[:, None] + np.arange(data.shape[1])
        self.data[B] = data
        if self.sanitize:
            self.pending[B] = False
            self.w_tid[B] = np.broadcast_to(tids[:, None], B.shape)
            self.w_ep[B] = self.epoch

    # --------------------------------------------------------------------------------- checks
    def _pending_and_unwritten(self, B, T, st):
        p = self.pending[B]
        if p.any():
            k = np.argwhere(p)[0]
            b = int(B[k[0], k[1]])
            raise st.sanitizer_error(
                f"read of shared memory while a cp.async copy into it (issued by thread "
                f"{st.fmt_tid(int(self.pend_tid[b]))}) is still pending: missing cp.async.wait_group?",
                int(T[k[0], k[1]]), b, shared=True)
        w = self.w_tid[B]
        if (w == NEVER).any():
            k = np.argwhere(w == NEVER)[0]
            raise st.sanitizer_error("read of shared memory that no thread has written since launch",
                                     int(T[k[0], k[1]]), int(B[k[0], k[1]]), shared=True)

    def _race(self, B, T, bad, st, what):
        k = np.argwhere(bad)[0]
        b = int(B[k[0], k[1]])
        other = int(self.w_tid[b]) if self.w_ep[b] == self.epoch and self.w_tid[b] >= 0 else int(self.r_tid[b])
        who = st.fmt_tid(other) if other >= 0 else "several threads"
        raise st.sanitizer_error(f"shared-memory race: {what} ({who}) with no bar.sync in between",
                                 int(T[k[0], k[1]]), b, shared=True)

    def _check_read(self, B, tids, st):
        T = np.broadcast_to(tids[:, None], B.shape)
        self._pending_and_unwritten(B, T, st)
        w = self.w_tid[B]
        bad = (self.w_ep[B] == self.epoch) & (w != T)
        if bad.any():
            self._race(B, T, bad, st, "read of a byte written by another thread")
        # record the readers of this epoch (MANY when two different threads read a byte)
        Bf, Tf = B.ravel(), T.ravel()
        order = np.argsort(Bf, kind="stable")
        Bs, Ts = Bf[order], Tf[order]
        first = np.flatnonzero(np.r_[True, Bs[1:] != Bs[:-1]])
        ub = Bs[first]
        tmin = np.minimum.reduceat(Ts, first)
        tmax = np.maximum.reduceat(Ts, first)
        newr = np.where(tmin == tmax, tmin, MANY).astype(np.int32)
        cur = self.r_ep[ub] == self.epoch
        self.r_tid[ub] = np.where(cur & (self.r_tid[ub] != newr), MANY, newr)
        self.r_ep[ub] = self.epoch

    def _write_conflicts(self, B, T, st):
        w = self.w_tid[B]
        bad = (self.w_ep[B] == self.epoch) & (w != T)
        if bad.any():
            self._race(B, T, bad, st, "write to a byte written by another thread")
        bad = (self.r_ep[B] == self.epoch) & (self.r_tid[B] != T)
        if bad.any():
            self._race(B, T, bad, st, "write to a byte read by another thread")

    def _check_write(self, B, tids, st, data):
        T = np.broadcast_to(tids[:, None], B.shape)
        p = self.pending[B]
        if p.any():
            k = np.argwhere(p)[0]
            raise st.sanitizer_error("write to shared memory while a cp.async copy into it is pending",
                                     int(T[k[0], k[1]]), int(B[k[0], k[1]]), shared=True)
        self._write_conflicts(B, T, st)
        # lanes of this very instruction writing the same byte with different values
        Bf, Tf, Vf = B.ravel(), T.ravel(), data.ravel()
        if np.unique(Bf).size != Bf.size:
            order = np.argsort(Bf, kind="stable")
            Bs, Ts, Vs = Bf[order], Tf[order], Vf[order]
            first = np.flatnonzero(np.r_[True, Bs[1:] != Bs[:-1]])
            dup = (np.minimum.reduceat(Ts, first) != np.maximum.reduceat(Ts, first)) & \
                  (np.minimum.reduceat(Vs, first) != np.maximum.reduceat(Vs, first))
            if dup.any():
                g = int(np.argmax(dup))
                b = int(Bs[first[g]])
                ts = sorted(set(Ts[Bs == b].tolist()))
                raise st.sanitizer_error(
                    f"shared-memory race: threads {st.fmt_tid(ts[0])} and {st.fmt_tid(ts[1])} store "
                    f"different values to the same byte in one instruction", ts[1], b, shared=True)
