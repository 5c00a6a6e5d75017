"""ptxsim control flow and memory model: divergent if/else reconverging, loops with per-thread trip
counts, bar.sync tree reduction, cp.async commit/wait pipelines, atomics."""
from pathlib import Path

import numpy as np
import pytest

from tools.ptxsim import GlobalMemory, Module

DATA = Path(__file__).parent / "data" / "ptxsim"


@pytest.fixture(scope="module")
def mod():
    return Module((DATA / "control.ptx").read_text(), "control.ptx")


def test_divergent_if_else_reconverges(mod):
    n = 64
    mem = GlobalMemory()
    out = mem.alloc(n * 8)
    mod.launch("diverge", block=(n, 1, 1), args=[out], mem=mem)
    got = mem.read(out, np.uint32, 2 * n).reshape(n, 2)
    x = [(3 * t if t % 2 else t + 100) + 1 for t in range(n)]
    assert got[:, 0].tolist() == x
    assert got[:, 1].tolist() == [x[t ^ 1] for t in range(n)]


def test_loop_per_thread_trip_counts(mod):
    n = 96
    cnt = (np.arange(n) * 7) % 11
    cnt = cnt.astype(np.uint32)
    mem = GlobalMemory()
    out = mem.alloc(n * 8)
    mod.launch("loop", block=(n, 1, 1), args=[out, mem.alloc_from(cnt)], mem=mem)
    got = mem.read(out, np.uint32, 2 * n).reshape(n, 2)
    sums = [int(c) * (int(c) + 1) // 2 for c in cnt]
    assert got[:, 0].tolist() == sums
    for t in range(n):
        w = t // 32
        ballot = sum(1 << l for l in range(32) if sums[w * 32 + l] > 10)
        assert got[t, 1] == ballot


@pytest.mark.parametrize("nt", [32, 128, 256])
def test_barrier_tree_reduction(mod, nt):
    rng = np.random.default_rng(nt)
    x = rng.integers(-50, 50, 3 * nt).astype(np.float32)      # integers: exact in any order
    mem = GlobalMemory()
    out = mem.alloc(3 * 4)
    mod.launch("reduce", grid=(3, 1, 1), block=(nt, 1, 1), args=[out, mem.alloc_from(x)], mem=mem)
    assert mem.read(out, np.float32, 3).tolist() == x.reshape(3, nt).sum(axis=1).tolist()


def test_cp_async_two_stage_pipeline(mod):
    nt = 64
    x = np.arange(2 * nt * 4, dtype=np.uint32) * 3 + 1
    mem = GlobalMemory()
    out = mem.alloc(x.nbytes)
    mod.launch("cpasync", block=(nt, 1, 1), args=[out, mem.alloc_from(x)], mem=mem)
    got = mem.read(out, np.uint32, x.size).reshape(2, nt, 4)
    xs = x.reshape(2, nt, 4)
    assert np.array_equal(got, np.roll(xs, -1, axis=1))


def test_atomics(mod):
    nt = 96
    rng = np.random.default_rng(5)
    x = rng.integers(-8, 8, nt).astype(np.float32)
    ix = rng.integers(-1000, 1000, nt).astype(np.int32)
    mem = GlobalMemory()
    init = np.zeros(4 + nt, np.uint32)
    init[2] = np.array([-(1 << 31)], np.int32).view(np.uint32)[0]
    out = mem.alloc_from(init)
    mod.launch("atomics", block=(nt, 1, 1), args=[out, mem.alloc_from(x), mem.alloc_from(ix)], mem=mem)
    got = mem.read(out, np.uint32, 4 + nt)
    assert got[0] == nt
    assert got[1:2].view(np.float32)[0] == x.sum()
    assert got[2:3].view(np.int32)[0] == ix.max()
    assert got[3:4].view(np.float32)[0] == x.sum()
    assert sorted(got[4:].tolist()) == list(range(nt))     # each thread saw a distinct old value
