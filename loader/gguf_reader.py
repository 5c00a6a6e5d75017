"""GGUF (llama.cpp) file -> `SourceModel`, for the decoder architectures of loader/gguf_config.py.

The header (metadata and tensor table) is parsed here with bounds checks on every read, because a
malformed file must give a `FormatError` that names the problem, never an IndexError from deep inside a
library. (The `gguf` package's GGUFReader trusts the header and also takes ~2 s on a 49k-token vocab;
tests/test_gguf_reader.py checks that this parser reads the same fields and tensors as GGUFReader.)
Tensor data is mapped, not read: each `SourceTensor.load()` dequantizes one tensor with
`gguf.quants.dequantize`, and `blocks()` hands out the raw fields of the types that import exactly (EXACT_TYPES).

GGUF stores a matrix with ne[0] = K (inner, contiguous) first; NumPy shape is the reverse, (N, K),
which is already the internal orientation. Q/K rows stay as llama.cpp permuted them ("adjacent" RoPE)
in llama files; the other architectures are stored in rotate-half order.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from loader.errors import FormatError
from loader.gguf_config import check_architecture, gguf_config, internal_names
from loader.kquant import KQ_TYPES, decode as kq_decode
from loader.source import SourceModel, SourceTensor, expected_shapes, finite
from loader.validate import check_gguf_meta

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NESTING = 16          # levels of arrays of arrays (real files use 1)

# value type id -> (struct format, size); 8 = string, 9 = array are handled apart
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# types with raw block access (exact import): Q4_0 / Q4_1 / Q8_0 as their fields, the rest of KQ_TYPES as
# (codes, SubScales) in the two-level form (loader/kquant.py)
EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0") + tuple(KQ_TYPES)


class _Cursor:
    """Sequential reads over the mapped header; every read checks that the bytes exist."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                              f"file has {self.size}")

    def scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            # arrays of arrays recurse: a file nesting thousands of levels must not exhaust the stack
            if depth >= MAX_NESTING:
                raise FormatError(f"{self.path}: {what}: arrays nested more than {MAX_NESTING} levels deep")
            etype = self.scalar(4, what)
            count = self.scalar(10, what)
            if etype in _SCALARS:
                # numeric arrays in one slice (token types, scores)
                n = count * _SCALARS[etype][1]
                self.need(n, what)
                arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[etype], count=count, offset=self.pos).copy()
                self.pos += n
                return arr.tolist()
            if etype not in (_STRING, _ARRAY):
                raise FormatError(f"{self.path}: {what}: unknown array element type {etype}")
            # each element takes at least 8 bytes: reject absurd counts before looping
            self.need(min(count, self.size) * 8, what)
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise FormatError(f"{self.path}: {what}: unknown metadata value type {vtype}")


def _type_name(raw: int) -> str:
    try:
        return GGMLQuantizationType(raw).name
    except ValueError:
        return f"unknown type id {raw}"


_DEQUANT_OK: set[int] | None = None


def dequantizable_types() -> set[int]:
    """ggml types this installation can turn into float32 (probed once on a zero block)."""
    global _DEQUANT_OK
    if _DEQUANT_OK is None:
        ok = {int(GGMLQuantizationType.F64)}            # handled here, not by gguf
        for t, (_block, tsize) in GGML_QUANT_SIZES.items():
            if t.name.startswith("I") and not t.name.startswith("IQ"):
                continue                                 # I8..I64 are integers, not weights
            try:
                gguf_quants.dequantize(np.zeros((1, tsize), np.uint8), t)
                ok.add(int(t))
            except Exception:                            # NotImplementedError and friends
                pass
        _DEQUANT_OK = ok
    return _DEQUANT_OK


class GGUFFile:
    """The parsed header of a GGUF file plus a read-only map of its bytes."""

    def __init__(self, path):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                if size < 24:
                    raise FormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self.size = size
        c = _Cursor(self.mm, self.path)
        if bytes(self.mm[:4]) != MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (magic {bytes(self.mm[:4])!r}, expected b'GGUF')")
        c.pos = 4
        version = c.scalar(4, "version")
        if version not in (2, 3):
            if version & 0xFFFF == 0:
                raise FormatError(f"{self.path}: big-endian GGUF is not supported")
            raise FormatError(f"{self.path}: GGUF version {version} not supported (2 and 3 are)")
        n_tensors = c.scalar(10, "tensor count")
        n_kv = c.scalar(10, "metadata count")
        # every entry takes > 8 bytes, so counts beyond the file size are lies
        if n_tensors > size // 8 or n_kv > size // 8:
            raise FormatError(f"{self.path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                              f"impossible in {size} bytes")
        self.meta: dict = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.scalar(4, f"type of {key!r}")
            if key in self.meta:
                raise FormatError(f"{self.path}: duplicate metadata key {key!r}")
            self.meta[key] = c.value(vtype, f"metadata {key!r}")
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            n_dims = c.scalar(4, f"tensor {name!r} dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise FormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = [c.scalar(10, f"tensor {name!r} shape") for _ in range(n_dims)]
            raw_type = c.scalar(4, f"tensor {name!r} type")
            offset = c.scalar(10, f"tensor {name!r} offset")
            infos.append((name, dims, raw_type, offset))
        align = self.meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise FormatError(f"{self.path}: general.alignment {align!r} is not a power of two")
        self.data_start = -(-c.pos // align) * align
        self.tensors: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
        spans = []
        for name, dims, raw_type, offset in infos:
            if name in self.tensors:
                raise FormatError(f"{self.path}: duplicate tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, tsize = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise FormatError(f"{self.path}: tensor {name!r} has {_type_name(raw_type)}") from None
            if any(d <= 0 for d in dims) or dims[0] % block:
                raise FormatError(f"{self.path}: tensor {name!r} shape {dims} invalid for {qtype.name} "
                                  f"(blocks of {block})")
            nbytes = int(np.prod(dims, dtype=object)) // block * tsize
            start = self.data_start + offset
            if offset % align or start + nbytes > size:
                raise FormatError(f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) lies outside "
                                  f"the file ({size} bytes) or is misaligned")
            spans.append((start, start + nbytes, name))
            self.tensors[name] = (tuple(int(d) for d in reversed(dims)), raw_type, start, nbytes)
        spans.sort()
        for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(f"{self.path}: tensors {n0!r} and {n1!r} overlap")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8, (rows, bytes per row) for matrices."""
        shape, raw_type, start, nbytes = self.tensors[name]
        data = np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=start)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return data.reshape(rows, nbytes // rows) if len(shape) > 1 else data

    def load(self, name: str) -> np.ndarray:
        """float32 copy in NumPy (internal) shape."""
        shape, raw_type, _start, _n = self.tensors[name]
        if raw_type not in dequantizable_types():
            raise FormatError(f"{self.path}: tensor {name!r} has ggml type {_type_name(raw_type)}, "
                              f"which cannot be dequantized")
        raw = self.raw(name)
        if raw_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F64):
            # a copy, never a view of the map: callers may write to it, and the file may be closed
            out = raw.view("<f4" if raw_type == GGMLQuantizationType.F32 else "<f8").astype(np.float32)
        else:
            with np.errstate(invalid="ignore", over="ignore"):     # non-finite results are refused below
                out = gguf_quants.dequantize(raw, GGMLQuantizationType(raw_type))
        return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)

    def blocks(self, name: str) -> tuple:
        """Raw fields of Q4_0 (d, q), Q4_1 (d, m, q), Q8_0 (d, q); see loader/source.py. The types of
        loader/kquant.py: (codes, SubScales)."""
        shape, raw_type, _s, _n = self.tensors[name]
        qtype = GGMLQuantizationType(raw_type)
        if qtype.name not in EXACT_TYPES:
            raise FormatError(f"{self.path}: tensor {name!r} is {qtype.name}; blocks() exists for "
                              f"{', '.join(EXACT_TYPES)} only")
        n, k = (shape if len(shape) == 2 else (1, shape[0]))
        if qtype.name in KQ_TYPES:
            return kq_decode(self.raw(name), qtype.name, n, k)
        nb = k // 32
        b = self.raw(name).reshape(n, nb, -1)

        def f16(lo):
            return np.ascontiguousarray(b[:, :, lo:lo + 2]).view("<f2")[:, :, 0].astype(np.float32)

        def nibbles(lo):
            qs = b[:, :, lo:lo + 16]
            # element j of a block is the low nibble of byte j, element j + 16 its high nibble
            return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)

        if qtype == GGMLQuantizationType.Q4_0:
            return f16(0), nibbles(2)
        if qtype == GGMLQuantizationType.Q4_1:
            return f16(0), f16(2), nibbles(4)
        return f16(0), np.ascontiguousarray(b[:, :, 2:34]).view(np.int8).reshape(n, k)   # Q8_0


def _tokenizer_fields(g: GGUFFile) -> dict:
    tokens = g.meta.get("tokenizer.ggml.tokens") or []
    bos = g.meta.get("tokenizer.ggml.bos_token_id")
    # gpt2-style BPE vocabularies add no BOS unless the file says so; SentencePiece ones do
    add_bos = g.meta.get("tokenizer.ggml.add_bos_token", g.meta.get("tokenizer.ggml.model") == "llama")
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if isinstance(g.meta.get(key), int) and g.meta[key] not in eos_ids:
            eos_ids.append(g.meta[key])
    for end in ("<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot_id|>"):
        if end in tokens and tokens.index(end) not in eos_ids:
            eos_ids.append(tokens.index(end))
    return dict(bos_id=int(bos) if (add_bos and isinstance(bos, int)) else None, eos_ids=eos_ids,
                chat_template=g.meta.get("tokenizer.chat_template"))


def _source_tensor(g: GGUFFile, name: str, internal: str, rows: slice | None, shape: tuple) -> SourceTensor:
    """A lazy tensor: the whole of GGUF tensor `name`, or its rows `rows` (a part of a fused tensor)."""
    tname = GGMLQuantizationType(g.tensors[name][1]).name
    where = f"{g.path}: tensor {name!r}"
    if rows is None:
        load, blocks, raw = (lambda: finite(g.load(name), where)), (lambda: g.blocks(name)), (lambda: g.raw(name))
    else:
        load = lambda: finite(np.ascontiguousarray(g.load(name)[rows]), where)          # noqa: E731
        blocks = lambda: tuple(np.ascontiguousarray(a[rows]) for a in g.blocks(name))   # noqa: E731
        raw = lambda: np.ascontiguousarray(g.raw(name)[rows])                            # noqa: E731
    matrix = len(shape) == 2
    return SourceTensor(name=internal, shape=shape, ggml_type=tname, load=load,
                        blocks=blocks if tname in EXACT_TYPES and matrix else None, raw=raw if matrix else None)


def read_gguf(path, with_tokenizer: bool = True) -> SourceModel:
    """Parse and validate a GGUF file of a supported architecture (loader/gguf_config.py); tensors stay lazy.
    with_tokenizer=False leaves tokenizer_json empty (weights and config only, e.g. for a reference forward)."""
    from loader.tokenizer import tokenizer_json_from_gguf

    g = GGUFFile(path)
    check_gguf_meta(g.meta, g.path)         # every key read below has the type the spec gives it
    arch = check_architecture(g)
    if "token_embd.weight" not in g.tensors:
        raise FormatError(f"{g.path}: missing tensor 'token_embd.weight'")
    tied = "output.weight" not in g.tensors
    vocab_size = g.tensors["token_embd.weight"][0][0]
    cfg = gguf_config(g, arch, tied, vocab_size, _tokenizer_fields(g))
    # before building per-layer tables from a lying count (phi3 fuses q|k|v and gate|up: 6 per layer)
    if cfg.n_layers * (6 if arch == "phi3" else 9) > len(g.tensors):
        raise FormatError(f"{g.path}: block_count {cfg.n_layers} but only {len(g.tensors)} tensors")
    expected = expected_shapes(cfg)
    tensors: dict[str, SourceTensor] = {}
    ok_types = dequantizable_types()
    for name, (shape, raw_type, _s, _n) in g.tensors.items():
        parts = internal_names(name, shape, cfg, g.path)
        if parts and raw_type not in ok_types:
            raise FormatError(f"{g.path}: tensor {name!r} has ggml type {_type_name(raw_type)}, which cannot be "
                              f"dequantized by the installed gguf package")
        for internal, rows in parts:
            if internal not in expected:
                raise FormatError(f"{g.path}: tensor {name!r} does not belong to a {cfg.n_layers}-layer {arch} "
                                  f"model with this configuration")
            if internal in tensors:
                raise FormatError(f"{g.path}: tensor {name!r} duplicates {internal!r}")
            part = shape if rows is None else (len(range(*rows.indices(shape[0]))),) + shape[1:]
            if rows is not None and rows.stop > shape[0] or part != expected[internal]:
                raise FormatError(f"{g.path}: tensor {name!r} has shape {shape}, expected "
                                  f"{expected[internal] if rows is None else 'rows for ' + internal}")
            tensors[internal] = _source_tensor(g, name, internal, rows, part)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FormatError(f"{g.path}: missing tensors {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    tok_json = tokenizer_json_from_gguf(g.meta, source=g.path) if with_tokenizer else ""
    return SourceModel(config=cfg, tensors=tensors, tokenizer_json=tok_json, source=g.path)


def read_gguf_metadata(path) -> dict:
    """Metadata only (for tools and tests)."""
    return GGUFFile(Path(path)).meta
