"""The CPU thread pool (runtime/cpu/threadpool.c): every task of every call runs exactly once and a call
returns only after all of them, also with more threads than cores and workers that wake late."""
import pytest

from runtime.cpu import build


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_every_task_runs_exactly_once(threads):
    ffi, lib = build.load()
    pool = lib.ab_pool_create(threads)
    try:
        assert lib.ab_pool_threads(pool) == threads
        # 3,000 calls of 1..40 tasks back to back; one call in 16 has a task that sleeps 0.2 ms
        assert lib.ab_pool_check(pool, 3000, 40, 12345 + threads) == 0
    finally:
        lib.ab_pool_destroy(pool)


def test_pool_check_rejects_bad_arguments():
    ffi, lib = build.load()
    pool = lib.ab_pool_create(2)
    try:
        assert lib.ab_pool_check(pool, 1, 0, 1) == -3
    finally:
        lib.ab_pool_destroy(pool)


def _blocked_masks() -> dict[int, int]:
    """SigBlk of every thread of this process, from /proc (Linux)."""
    import os
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("SigBlk:"):
                        out[int(tid)] = int(line.split()[1], 16)
        except OSError:
            pass
    return out


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_workers_leave_signals_to_the_python_thread():
    """A Ctrl-C must interrupt the thread running Python (blocked reading a prompt, say), so the pool's
    workers block every signal; the creating thread's own mask is left as it was."""
    import signal
    ffi, lib = build.load()
    before = _blocked_masks()
    pool = lib.ab_pool_create(3)
    try:
        # calls that need the workers: they are past their start (a starting thread has every signal
        # blocked until the C library gives it its creator's mask)
        assert lib.ab_pool_check(pool, 200, 8, 7) == 0
        new = {t: m for t, m in _blocked_masks().items() if t not in before}
        sigint = 1 << (signal.SIGINT - 1)
        assert len(new) == 2 and all(m & sigint for m in new.values()), new
        assert _blocked_masks()[__import__("threading").get_native_id()] & sigint == 0
    finally:
        lib.ab_pool_destroy(pool)
