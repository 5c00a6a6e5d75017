"""GPU runtime on a real device (pytest -m gpu). Skipped cleanly where no GPU is available.

Not yet run on a GPU at the time of writing: the first run on a device is the real check.
"""
import struct
from pathlib import Path

import numpy as np
import pytest

from runtime import driver as drv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not drv.available(), reason="no CUDA GPU / driver available")]

SAMPLES = Path(__file__).parent / "data" / "ptx_samples"


def ctx_sync():
    drv.check(drv.driver().cuCtxSynchronize(), "cuCtxSynchronize")


@pytest.fixture(scope="module")
def ctx():
    c = drv.Context(0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pool(ctx):
    from runtime.memory import cuda_pool
    p = cuda_pool()
    yield p
    p.close()


@pytest.fixture(scope="module")
def mods(ctx):
    from runtime.module import Module
    out = {n: Module.load_ptx((SAMPLES / f"{n}.ptx").read_text(), f"{n}.ptx")
           for n in ("args_all", "axpy_smem", "bmma_and")}
    yield out
    for m in out.values():
        m.close()


def test_context_props(ctx):
    p = ctx.props
    assert p.arch.startswith("sm_") and p.major >= 8
    assert p.sm_count > 0 and p.total_mem > 0 and p.driver_version >= 12000
    assert p.max_smem_per_block == 48 * 1024 and p.max_smem_per_block_optin > 48 * 1024
    free, total = ctx.mem_info()
    assert 0 < free <= total


ARGS = [None, 4_000_000_000, -123456, 2**63 + 5, -(2**40), 1.25, -3.5]


def _check_args_record(raw):
    a, b, c, d, e, pad, f = struct.unpack("<IiQqfId", raw)
    assert (a, b, c, d, e, pad, f) == (ARGS[1], ARGS[2], ARGS[3], ARGS[4], ARGS[5], 0, ARGS[6])


def _run_args(module, pool):
    from runtime.memory import DeviceArray
    with DeviceArray(pool, (40,), np.uint8) as out:
        out.copy_from_host(np.full(40, 0xAB, np.uint8))          # poison
        module.function("sample_args").launch(1, 1, [out, *ARGS[1:]])
        ctx_sync()
        return out.to_host().tobytes()


def test_launch_every_parameter_type_from_ptx(mods, pool):
    _check_args_record(_run_args(mods["args_all"], pool))


def test_launch_from_cubin(ctx, pool):
    from runtime.module import Module, parse_signatures
    from runtime.nvjitlink import link_ptx
    text = (SAMPLES / "args_all.ptx").read_text()
    res = link_ptx(text, ctx.props.arch)
    with Module.load_cubin(res.cubin, parse_signatures(text), "args_all.cubin") as m:
        _check_args_record(_run_args(m, pool))


def test_jit_error_surfaces_log(ctx):
    from runtime.errors import CudaError
    from runtime.module import Module
    with pytest.raises(CudaError) as ei:
        Module.load_ptx((SAMPLES / "jit_error.ptx").read_text(), "jit_error.ptx")
    assert "frobnicate" in str(ei.value) and "cuModuleLoadDataEx" in str(ei.value)


def test_axpy_and_block_sum(mods, pool):
    from runtime.memory import DeviceArray
    rng = np.random.default_rng(1)
    n = 1000
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    f = mods["axpy_smem"]
    with DeviceArray.from_host(pool, x) as dx, DeviceArray.from_host(pool, y) as dy, \
            DeviceArray(pool, (drv.cdiv(n, 128),), np.float32) as ds:
        f["sample_axpy"].launch(drv.cdiv(n, 128), 128, [dy, dx, 0.5, n])
        f["sample_block_sum"].launch(drv.cdiv(n, 128), 128, [ds, dx, n])
        ctx_sync()
        np.testing.assert_allclose(dy.to_host(), 0.5 * x.astype(np.float64) + y, rtol=1e-6, atol=1e-6)
        ref = np.add.reduceat(np.pad(x, (0, 1024 - n)).astype(np.float64), np.arange(0, 1024, 128))
        np.testing.assert_allclose(ds.to_host(), ref, rtol=1e-5, atol=1e-5)


def test_bmma_and_popc_matches_numpy(mods, pool):
    """One m16n8k256 b1 AND.POPC against popcounts in NumPy (PTX ISA fragment layout)."""
    from runtime.memory import DeviceArray
    rng = np.random.default_rng(2)
    A = rng.integers(0, 2**32, (16, 8), dtype=np.uint64).astype(np.uint32)   # 16 rows x 256 bits
    B = rng.integers(0, 2**32, (8, 8), dtype=np.uint64).astype(np.uint32)    # 8 cols x 256 bits
    ref = np.zeros((16, 8), np.int64)
    for r in range(16):
        for c in range(8):
            ref[r, c] = sum(bin(int(A[r, w]) & int(B[c, w])).count("1") for w in range(8))
    afrag = np.zeros((32, 4), np.uint32)
    bfrag = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        afrag[lane] = [A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4]]
        bfrag[lane] = [B[g, t], B[g, t + 4]]
    with DeviceArray.from_host(pool, afrag) as da, DeviceArray.from_host(pool, bfrag) as db, \
            DeviceArray(pool, (32, 4), np.int32) as dd:
        dd.copy_from_host(np.full((32, 4), -1, np.int32))
        mods["bmma_and"]["sample_bmma_and"].launch(1, 32, [dd, da, db])
        ctx_sync()
        d = dd.to_host()
    got = np.zeros((16, 8), np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        got[g, 2 * t], got[g, 2 * t + 1], got[g + 8, 2 * t], got[g + 8, 2 * t + 1] = d[lane]
    np.testing.assert_array_equal(got, ref)


def test_dynamic_smem_opt_in(mods, ctx):
    f = mods["axpy_smem"]["sample_axpy"]
    want = min(ctx.props.max_smem_per_block_optin, 96 * 1024)
    f.set_max_dynamic_smem(want)
    assert f.attribute("MAX_DYNAMIC_SHARED_SIZE_BYTES") == want


def test_pool_on_real_memory_and_real_oom(ctx):
    from runtime.errors import OutOfMemoryError
    from runtime.memory import DeviceArray, cuda_pool
    p = cuda_pool()
    try:
        x = np.arange(1 << 16, dtype=np.float32)
        with DeviceArray.from_host(p, x) as d:
            np.testing.assert_array_equal(d.to_host(), x)
        _, total = ctx.mem_info()
        with pytest.raises(OutOfMemoryError) as ei:
            p.alloc(4 * total)            # no limit: the real cuMemAlloc fails, trim, retry, raise
        assert ei.value.limit is None and "GiB" in str(ei.value)
        p.trim()
        assert p.stats().reserved == 0 and p.stats().used == 0
    finally:
        p.close()


def test_cross_stream_reuse_on_real_streams(ctx):
    from runtime.memory import cuda_pool
    p = cuda_pool()
    with drv.Stream() as s1, drv.Stream() as s2:
        a = p.alloc(1 << 20, s1)
        drv.memset_d8(a, 7, 1 << 20, s1)
        p.free(a, s1)
        b = p.alloc(1 << 20, s2)             # the pool makes s2 wait on s1's event
        out = np.zeros(1 << 20, np.uint8)
        drv.memcpy_dtoh(out, b, s2)
        s2.synchronize()
        assert b == a and (out == 7).all()
        p.free(b, s2)
        s1.synchronize()
        s2.synchronize()
        p.close()


def test_events_time_work(ctx):
    with drv.Stream() as s:
        e0, e1 = drv.Event(), drv.Event()
        e0.record(s)
        e1.record(s)
        e1.synchronize()
        assert e0.elapsed_ms(e1) >= 0.0
        e0.close()
        e1.close()


def test_graph_capture_replay_equals_direct_launches(mods, pool):
    from runtime.graph import Graph
    from runtime.memory import DeviceArray
    f = mods["axpy_smem"]["sample_axpy"]
    n = 4096
    x = np.linspace(-1, 1, n).astype(np.float32)
    with drv.Stream() as s, DeviceArray.from_host(pool, x) as dx, \
            DeviceArray.from_host(pool, np.zeros(n, np.float32)) as y_direct, \
            DeviceArray.from_host(pool, np.zeros(n, np.float32)) as y_graph:

        def step(y):
            for alpha in (1.0, 2.0, 3.0):
                f.launch(drv.cdiv(n, 128), 128, [y, dx, alpha, n], stream=s)

        step(y_direct)
        step(y_direct)
        with Graph.capture(s, lambda: step(y_graph)) as g:
            s.synchronize()
            assert (y_graph.to_host() == 0).all()   # capture records, it does not run
            assert g.node_count() == 3
            g.replay(s)
            g.replay(s)
            s.synchronize()
        np.testing.assert_array_equal(y_graph.to_host(), y_direct.to_host())
        np.testing.assert_allclose(y_direct.to_host(), 12.0 * x.astype(np.float64), rtol=1e-6)
