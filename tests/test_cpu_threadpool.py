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
