"""Property-based fuzzing of the GGUF reader: mutations of a small valid file either load or raise
FormatError; never another exception, a crash or a hang.

The tiny llama GGUF of tests/data_gen is parsed here by an independent typed walker (not the reader
under test), mutated at the level of the format's structure (a metadata value replaced by one of any
type, including NaN, huge counts and thousands of nested arrays; keys deleted or duplicated; tensor
dims, types and offsets changed; header counts and version lied about) or of its bytes (flips,
truncation, insertion), and written back. The default run tries FAST_EXAMPLES cases; the slow-marked
run (CI runs everything) tries CI_EXAMPLES, within the two-minute budget of issue 18 together with
the safetensors and packed-config suites.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.errors import FormatError
from tests.data_gen.tiny_models import write_tiny_gguf

from tests.fuzz_common import CI_EXAMPLES, FAST_EXAMPLES, no_hang

HANG_S = 10

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}



# ---- an independent typed GGUF walker and writer ---------------------------------------------------

def _read_value(buf, pos, vtype):
    if vtype in _FMT:
        v = struct.unpack_from(_FMT[vtype], buf, pos)[0]
        return v, pos + struct.calcsize(_FMT[vtype])
    if vtype == 8:
        n = struct.unpack_from("<Q", buf, pos)[0]
        return bytes(buf[pos + 8:pos + 8 + n]), pos + 8 + n
    assert vtype == 9
    et, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    out = []
    for _ in range(n):
        v, pos = _read_value(buf, pos, et)
        out.append(v)
    return (et, out), pos


def parse(raw: bytes):
    version, n_t, n_kv = struct.unpack_from("<IQQ", raw, 4)
    pos, kvs, tensors = 24, [], []
    for _ in range(n_kv):
        v, pos = _read_value(raw, pos, 8)
        vtype = struct.unpack_from("<I", raw, pos)[0]
        val, pos = _read_value(raw, pos + 4, vtype)
        kvs.append([v, vtype, val])
    for _ in range(n_t):
        name, pos = _read_value(raw, pos, 8)
        nd = struct.unpack_from("<I", raw, pos)[0]
        dims = list(struct.unpack_from(f"<{nd}Q", raw, pos + 4))
        pos += 4 + 8 * nd
        ttype, off = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        tensors.append([name, dims, ttype, off])
    start = -(-pos // 32) * 32
    return version, kvs, tensors, raw[start:]


def _write_value(vtype, v) -> bytes:
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], v)
    if vtype == 8:
        return struct.pack("<Q", len(v)) + v
    if vtype == 9 and isinstance(v, bytes):
        return v            # pre-serialized (deep nesting, written without recursion)
    if vtype == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(_write_value(et, x) for x in items)
    return v            # an unknown type id: raw bytes follow


def serialize(version, kvs, tensors, data, counts=None) -> bytes:
    n_t, n_kv = counts or (len(tensors), len(kvs))
    out = [b"GGUF", struct.pack("<IQQ", version, n_t, n_kv)]
    for k, vt, v in kvs:
        out += [_write_value(8, k), struct.pack("<I", vt), _write_value(vt, v)]
    for name, dims, tt, off in tensors:
        out += [_write_value(8, name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", tt, off)]
    head = b"".join(out)
    return head + bytes(-len(head) % 32) + data


# ---- mutations ----------------------------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)
SMALL = st.sampled_from([0, 1, 2, 3, 31, 32, 64, 127, 128, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -1.0, 1e-5, float("nan"), float("inf"), -float("inf")]))


def _scalar(vtype):
    fmt = _FMT[vtype]
    if fmt[-1] in "fd":
        return FLOATS if fmt == "<f" else st.floats(allow_nan=True, allow_infinity=True)
    if fmt == "<?":
        return st.booleans()
    bits = struct.calcsize(fmt) * 8
    signed = fmt[-1].islower()
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, 2, 64]))


STRINGS = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
                    st.sampled_from([b"llama", b"gpt2", b"bert", b"", b"\xff\xfe", b"<|im_end|>", b"none", b"linear"]))


@st.composite
def typed_value(draw, depth=0):
    vtype = draw(st.sampled_from(list(_FMT) + [8, 8, 9, 9, 13, 255]))
    if vtype in _FMT:
        return vtype, draw(_scalar(vtype))
    if vtype == 8:
        return 8, draw(STRINGS)
    if vtype == 9 and depth < 2:
        et, first = draw(typed_value(depth + 1))
        n = draw(st.integers(0, 6))
        items = [first] * n
        if et in _FMT or et == 8 or et == 9:
            return 9, (et, items)
        return 9, (8, [b"x"] * n)
    return vtype, draw(st.binary(max_size=16))


def nested(depth: int):
    """An array of one array of ... (depth levels) of one u32."""
    return 9, struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQI", 4, 1, 7)


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["kv_value", "kv_value", "kv_value", "kv_delete", "kv_dup", "kv_key", "nested",
                                 "tensor_dims", "tensor_type", "tensor_offset", "tensor_name", "counts",
                                 "version", "flip", "truncate", "insert", "alignment", "tensor_delete"]))
    return kind, draw(st.data())


def apply(raw: bytes, kind: str, data) -> bytes:
    version, kvs, tensors, blob = parse(raw)
    i = data.draw(st.integers(0, len(kvs) - 1))
    j = data.draw(st.integers(0, len(tensors) - 1))
    counts = None
    if kind == "kv_value":
        kvs[i][1], kvs[i][2] = data.draw(typed_value())
    elif kind == "kv_delete":
        del kvs[i]
    elif kind == "kv_dup":
        kvs.append(list(kvs[i]))
    elif kind == "kv_key":
        kvs[i][0] = data.draw(STRINGS)
    elif kind == "nested":
        kvs[i][1], kvs[i][2] = nested(data.draw(st.sampled_from([2, 16, 17, 100, 5000])))
    elif kind == "tensor_dims":
        tensors[j][1] = data.draw(st.lists(st.one_of(SMALL, U64), min_size=0, max_size=6))
    elif kind == "tensor_type":
        tensors[j][2] = data.draw(st.one_of(st.integers(0, 45), st.integers(0, 2**32 - 1)))
    elif kind == "tensor_offset":
        tensors[j][3] = data.draw(st.one_of(SMALL, U64, st.integers(0, len(blob) + 64)))
    elif kind == "tensor_name":
        tensors[j][0] = data.draw(st.one_of(STRINGS, st.just(tensors[0][0])))
    elif kind == "tensor_delete":
        del tensors[j]
    elif kind == "counts":
        counts = (data.draw(st.one_of(SMALL, U64)), data.draw(st.one_of(SMALL, U64)))
    elif kind == "version":
        version = data.draw(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)))
    elif kind == "alignment":
        kvs.append([b"general.alignment", 4, data.draw(st.one_of(SMALL.filter(lambda v: v < 2**32),
                                                                 st.integers(0, 2**32 - 1)))])
    out = serialize(version, kvs, tensors, blob, counts)
    head = len(out) - len(blob)
    if kind == "flip":
        b = bytearray(out)
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, head - 1))] = data.draw(st.integers(0, 255))
        out = bytes(b)
    elif kind == "truncate":
        out = out[:data.draw(st.integers(0, len(out) - 1))]
    elif kind == "insert":
        at = data.draw(st.integers(0, head))
        out = out[:at] + data.draw(st.binary(min_size=1, max_size=16)) + out[at:]
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz_gguf") / "tiny.gguf"
    write_tiny_gguf(p, default_type="Q8_0")
    return p.read_bytes()


def check_contract(path) -> None:
    from loader.gguf_reader import read_gguf
    with no_hang(HANG_S):
        try:
            src = read_gguf(path)
            src.tensors["layers.0.wq"].load()       # readable tensors, or a FormatError naming the tensor
        except FormatError as e:
            assert str(e) and "\n" not in str(e).strip()


def _run(base, tmp_path_factory, examples):
    d = tmp_path_factory.mktemp("gguf_cases")
    seen = {"n": 0}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutation())
    def case(m):
        kind, data = m
        raw = apply(base, kind, data)
        p = d / "case.gguf"
        p.write_bytes(raw)
        seen["n"] += 1
        check_contract(p)
    case()
    assert seen["n"] >= examples


def test_walker_reads_the_base_back(base):
    version, kvs, tensors, blob = parse(base)
    assert serialize(version, kvs, tensors, blob) == base


def test_fuzz_gguf_fast(base, tmp_path_factory):
    _run(base, tmp_path_factory, FAST_EXAMPLES)


@pytest.mark.slow
def test_fuzz_gguf_ci(base, tmp_path_factory):
    _run(base, tmp_path_factory, CI_EXAMPLES)


def test_5000_nested_arrays_is_a_format_error(base, tmp_path):
    version, kvs, tensors, blob = parse(base)
    kvs.append([b"evil.nested", *nested(5000)])
    p = tmp_path / "nested.gguf"
    p.write_bytes(serialize(version, kvs, tensors, blob))
    from loader.gguf_reader import read_gguf
    with pytest.raises(FormatError, match="nested more than"):
        read_gguf(p)
