"""ptxsim sanitizer: planted bugs must be reported (race, out-of-bounds write, missing barrier,
read before cp.async wait, divergence at a barrier / warp-synchronous instruction, unwritten shared
memory), the corrected kernels must pass, and unsupported PTX is rejected naming its line."""
from pathlib import Path

import numpy as np
import pytest

from tools.ptxsim import GlobalMemory, Module, SanitizerError, SimError

DATA = Path(__file__).parent / "data" / "ptxsim"


@pytest.fixture(scope="module")
def mod():
    return Module((DATA / "bugs.ptx").read_text(), "bugs.ptx")


def line_of(text):
    for i, ln in enumerate((DATA / "bugs.ptx").read_text().splitlines(), 1):
        if text in ln:
            return i
    raise AssertionError(text)


def test_race_same_word_one_instruction(mod):
    mem = GlobalMemory()
    with pytest.raises(SanitizerError, match=r"race.*bugs.ptx|bugs.ptx:\d+: shared-memory race") as e:
        mod.launch("race_same_word", block=(64, 1, 1), args=[0], mem=mem)
    assert f"bugs.ptx:{line_of('st.shared.u32 [sm], %r1;')}" in str(e.value)


def test_race_two_warps(mod):
    with pytest.raises(SanitizerError, match="race") as e:
        mod.launch("race_two_warps", block=(64, 1, 1), args=[0], mem=GlobalMemory())
    assert "tid=(40,0,0)" in str(e.value) and "tid=(0,0,0)" in str(e.value)
    assert "shared address 0x0" in str(e.value)


def test_oob_global_write(mod):
    mem = GlobalMemory()
    out = mem.alloc(32 * 4)
    with pytest.raises(SanitizerError, match="out-of-bounds global store") as e:
        mod.launch("oob_write", block=(64, 1, 1), args=[out, 32], mem=mem)
    msg = str(e.value)
    assert "tid=(32,0,0)" in msg and f"{out + 128:#x}" in msg
    assert f"bugs.ptx:{line_of('st.global.u32 [%rd2], %r1;')}" in msg


def test_missing_barrier(mod):
    mem = GlobalMemory()
    out = mem.alloc(64 * 4)
    mod.launch("neighbour", block=(64, 1, 1), args=[out, 1], mem=mem)        # correct version
    assert mem.read(out, np.uint32, 64).tolist() == [(t + 1) % 64 for t in range(64)]
    with pytest.raises(SanitizerError, match="race: read of a byte written by another thread"):
        mod.launch("neighbour", block=(64, 1, 1), args=[out, 0], mem=mem)


def test_read_before_cp_async_wait(mod):
    mem = GlobalMemory()
    x = np.arange(32, dtype=np.uint32)
    out = mem.alloc(128)
    mod.launch("cp_nowait", block=(32, 1, 1), args=[out, mem.alloc_from(x), 1], mem=mem)
    assert np.array_equal(mem.read(out, np.uint32, 32), x)
    with pytest.raises(SanitizerError, match="cp.async copy into it .* is still pending") as e:
        mod.launch("cp_nowait", block=(32, 1, 1), args=[out, mem.alloc_from(x), 0], mem=mem)
    assert f"bugs.ptx:{line_of('ld.shared.u32 %r4, [%r3];')}" in str(e.value)


def test_divergence_at_barrier(mod):
    with pytest.raises(SanitizerError, match="divergence at a barrier"):
        mod.launch("bar_diverge", block=(64, 1, 1), args=[0], mem=GlobalMemory())


def test_shfl_not_converged(mod):
    with pytest.raises(SanitizerError, match="not converged"):
        mod.launch("shfl_diverged", block=(32, 1, 1), args=[0], mem=GlobalMemory())


def test_uninitialised_shared_read(mod):
    mem = GlobalMemory()
    with pytest.raises(SanitizerError, match="no thread has written"):
        mod.launch("uninit_read", block=(32, 1, 1), args=[mem.alloc(4)], mem=mem)
    # without the sanitizer the kernel runs and sees the poison pattern
    out = mem.alloc(4)
    mod.launch("uninit_read", block=(32, 1, 1), args=[out], mem=mem, sanitize=False)
    assert mem.read(out, np.uint32, 1)[0] == 0xCDCDCDCD


HEADER = ".version 8.0\n.target sm_80\n.address_size 64\n"


def test_unknown_instruction_names_line():
    src = HEADER + (".visible .entry k(.param .u64 out)\n{\n  .reg .b32 %r<4>;\n"
                    "  mov.u32 %r1, 1;\n  frobnicate.b32 %r2, %r1;\n  ret;\n}\n")
    m = Module(src, "x.ptx")                   # decoded lazily: the error comes at first use
    with pytest.raises(SimError, match=r"x\.ptx:8: unsupported instruction 'frobnicate'"):
        m.launch("k", args=[0])
    assert "frobnicate" in m.check_decode()["k"]


@pytest.mark.parametrize("instr,what", [
    ("add.cc.u32 %r2, %r1, %r1;", "modifier .cc"),
    ("shfl.sync.bfly.b64 %r2, %r1, 1, 31, -1;", "modifier .b64"),
    ("ld.global.ca.u32 %r2, [%rd1];", "modifier .ca"),
    ("ld.u32 %r2, [%rd1];", "state space"),
    ("lop3.b32 %r2, %r1, %r1, %r1, 300;", "immLut"),
    ("cvt.f32.s32 %f1, %r1;", "needs .rn/.rz/.rm/.rp"),
    ("mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.xor.popc {%r0,%r1}, {%r0}, {%r1}, {%r0,%r1};", "only mma"),
])
def test_unsupported_forms_rejected(instr, what):
    src = HEADER + (".visible .entry k(.param .u64 out)\n{\n  .reg .b32 %r<4>;\n  .reg .f32 %f<2>;\n"
                    f"  .reg .b64 %rd<2>;\n  {instr}\n  ret;\n}}\n")
    with pytest.raises(SimError, match=r"y\.ptx:9: .*" + what.replace(".", r"\.")):
        Module(src, "y.ptx").launch("k", args=[0])


def test_one_unsupported_entry_leaves_the_others_usable():
    src = HEADER + (".visible .entry bad(.param .u64 out)\n{\n  .reg .b32 %r<4>;\n"
                    "  frobnicate.b32 %r2, %r1;\n  ret;\n}\n"
                    ".visible .entry good(.param .u64 out)\n{\n  .reg .b32 %r<4>;\n  .reg .b64 %rd<2>;\n"
                    "  ld.param.u64 %rd1, [out];\n  mov.u32 %r1, 42;\n  st.global.u32 [%rd1], %r1;\n  ret;\n}\n")
    m = Module(src, "two.ptx")
    mem = GlobalMemory()
    out = mem.alloc(4)
    m.launch("good", args=[out], mem=mem)
    assert mem.read(out, np.uint32, 1)[0] == 42
    assert list(m.check_decode()) == ["bad"]


def test_grid_past_the_hardware_limits_is_refused():
    src = HEADER + ".visible .entry k(.param .u64 out)\n{\n  ret;\n}\n"
    m = Module(src, "g.ptx")
    m.launch("k", grid=(1, 65535, 1), args=[0])
    for grid in [(1, 65536, 1), (1, 1, 65536), (2**31, 1, 1)]:
        with pytest.raises(SimError, match="hardware limits"):
            m.launch("k", grid=grid, args=[0])


def test_launch_argument_checks():
    src = HEADER + ".visible .entry k(.param .u64 out, .param .u32 n)\n{\n  ret;\n}\n"
    m = Module(src, "z.ptx")
    with pytest.raises(SimError, match="takes 2 arguments"):
        m.launch("k", args=[0])
    with pytest.raises(SimError, match="does not fit .u32"):
        m.launch("k", args=[0, -1])
    with pytest.raises(SimError, match="no entry named"):
        m.launch("nope", args=[])


def test_unaligned_view_of_x_avoids_the_vector_loads_of_gemv_a16_m1():
    """A caller's view 4 bytes into a device array: gemv_a16_m1's 16-byte loads of x would fault (the
    interpreter stops them as a GPU would); GpuBackend.linear routes such an x through gemv_a16."""
    from loader.bipolar import PackedLinear, quantize_weights, ref_linear_a16
    from runtime.gpu_backend import GpuBackend
    from tools.kernel_runners import SimDevice
    rng = np.random.default_rng(3)
    lin = PackedLinear.from_quant(quantize_weights(rng.standard_normal((8, 64)), 4, 32, asymmetric=True))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    be = GpuBackend(dev=SimDevice())
    h = be.prepare_linear(lin)
    whole = be.upload(np.concatenate([[0.0], x[0]]).astype(np.float32)[None, :])    # (1, 65)
    view = whole.view(4, (1, 64))
    assert view.ptr % 16 == 4
    got = be.download(be.linear(h, view))
    assert be.last_path == "gemv_a16"
    np.testing.assert_allclose(got, ref_linear_a16(lin, x), rtol=1e-5, atol=1e-5)
    y = be.empty((1, 8))
    with pytest.raises(SanitizerError, match="misaligned global load of 16 bytes"):
        be._launch("gemv.ptx", "gemv_a16_m1", (2, 1, 1), (128, 1, 1),
                   [y, view, h.planes, h.scales, h.offsets, 8, 64, h.Kw, h.p, h.G, h.ngw, None, *h.kq_args()])
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        be.linear(h, whole.view(2, (1, 64)))
