"""PTX header parsing, cross-checks against .entry, argument packing (no GPU)."""
import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest

from runtime.module import (SignatureError, _dim3, pack_args, parse_entries,
                            parse_signatures)

SAMPLES = Path(__file__).parent / "data" / "ptx_samples"


def sig_args():
    return parse_signatures((SAMPLES / "args_all.ptx").read_text())["sample_args"]


def test_parse_sample_headers():
    s = sig_args()
    assert s.params == (("out", "ptr"), ("a", "u32"), ("b", "s32"), ("c", "u64"), ("d", "s64"),
                        ("e", "f32"), ("f", "f64"))
    assert s.launch.startswith("grid=(1,1,1)")
    two = parse_signatures((SAMPLES / "axpy_smem.ptx").read_text())
    assert set(two) == {"sample_axpy", "sample_block_sum"}
    assert two["sample_axpy"].types == ("ptr", "ptr", "f32", "u32")
    assert parse_entries((SAMPLES / "axpy_smem.ptx").read_text())["sample_block_sum"] == [
        ("out", "u64"), ("x", "u64"), ("n", "u32")]


def test_every_sample_header_matches_its_entries():
    for f in SAMPLES.glob("*.ptx"):
        assert parse_signatures(f.read_text(), f.name)


PTX = """// anybit-kernel: k
// params: {params}
.visible .entry k(
    .param .u64 out,
    .param .u32 n
)
{{ ret; }}
"""


@pytest.mark.parametrize("params, msg", [
    ("out:ptr", "header lists 1 params"),
    ("out:ptr, n:u32, extra:f32", "header lists 3 params"),
    ("out:ptr, m:u32", "'m' in the header but 'n' in .entry"),
    ("out:ptr, n:f64", "n is f64 in the header but .u32"),
    ("out:ptr, n:int", "bad parameter 'n:int'"),
    ("out:ptr, n", "bad parameter 'n'"),
])
def test_header_disagreements_are_errors(params, msg):
    with pytest.raises(SignatureError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace(".", r"\.")):
        parse_signatures(PTX.format(params=params), "t.ptx")


def test_missing_and_extra_header_blocks():
    no_header = PTX.format(params="out:ptr, n:u32").replace("// anybit-kernel: k\n", "")
    no_header = no_header.replace("// params: out:ptr, n:u32\n", "")
    with pytest.raises(SignatureError, match="has no '// anybit-kernel:' header"):
        parse_signatures(no_header, "t.ptx")
    extra = "// anybit-kernel: ghost\n// params: x:ptr\n" + PTX.format(params="out:ptr, n:u32")
    with pytest.raises(SignatureError, match="header names kernel ghost"):
        parse_signatures(extra, "t.ptx")


class Buf:
    ptr = 0x7F00_0000_1000


def test_pack_args_layout_matches_hand_computed_bytes():
    vals = [Buf(), 4_000_000_000, -5, 2**63 + 3, -(2**62), 1.5, -2.25]
    packed = pack_args(sig_args(), vals)
    # natural alignment: ptr@0 u32@8 s32@12 u64@16 s64@24 f32@32 (pad) f64@40
    expect = struct.pack("<QIiQqf4xd", Buf.ptr, 4_000_000_000, -5, 2**63 + 3, -(2**62), 1.5, -2.25)
    assert packed.raw()[:len(expect)] == expect
    base = ctypes.addressof(packed.buffer)
    assert [packed.pointers[i] - base for i in range(7)] == [0, 8, 12, 16, 24, 32, 40]
    assert packed.address == ctypes.addressof(packed.pointers)


def test_pack_args_accepts_numpy_scalars():
    vals = [np.uint64(256), np.uint32(7), np.int32(-1), np.int64(5), np.int64(-5), np.float32(0.5),
            np.float64(3.0)]
    raw = pack_args(sig_args(), vals).raw()
    assert struct.unpack_from("<QIi", raw) == (256, 7, -1)


@pytest.mark.parametrize("index, value, exc, msg", [
    (0, -1, OverflowError, "'out' \\(ptr\\): -1 is outside"),
    (0, "0x10", TypeError, "'out' \\(ptr\\): expected an integer"),
    (1, -1, OverflowError, "'a' \\(u32\\): -1 is outside \\[0, 4294967295\\]"),
    (1, 2**32, OverflowError, "'a' \\(u32\\)"),
    (1, 1.0, TypeError, "'a' \\(u32\\): expected an integer, got float"),
    (1, True, TypeError, "'a' \\(u32\\): got a bool"),
    (2, 2**31, OverflowError, "'b' \\(s32\\)"),
    (4, 2**63, OverflowError, "'d' \\(s64\\)"),
    (5, "1.0", TypeError, "'e' \\(f32\\): expected a float"),
    (5, 1e39, OverflowError, "'e' \\(f32\\): 1e\\+39 does not fit in float32"),
    (6, False, TypeError, "'f' \\(f64\\): expected a float"),
])
def test_pack_args_errors_name_kernel_and_parameter(index, value, exc, msg):
    vals = [0, 0, 0, 0, 0, 0.0, 0.0]
    vals[index] = value
    with pytest.raises(exc, match=f"kernel sample_args, parameter {index} " + msg):
        pack_args(sig_args(), vals)


def test_pack_args_wrong_count():
    with pytest.raises(TypeError, match=r"kernel sample_args takes 7 arguments .*got 2"):
        pack_args(sig_args(), [0, 1])


def test_dim3_validation():
    assert _dim3(5, "grid") == (5, 1, 1)
    assert _dim3((2, 3), "grid") == (2, 3, 1)
    for bad in (0, (1, 0), (1, 1, 1, 1), (1.0,), (True,)):
        with pytest.raises(ValueError):
            _dim3(bad, "grid")
