"""Kernel modules: PTX header signatures, typed argument packing, module loading and launches.

Every file in ptx/ declares its kernels in a comment header (docs/DESIGN.md):

    // anybit-kernel: <entry name>
    // params: out:ptr, x:ptr, n:u32, eps:f32

`parse_signatures()` reads those blocks and cross-checks them against the `.entry name(.param ...)`
lists of the PTX itself, so a header that drifts from its kernel is an error at load time instead of
garbage at launch time. `pack_args()` is the one place where Python values become kernel parameters.
"""
from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass

from runtime import driver as _drv
from runtime.driver import Releaser, cdiv, check, driver, stream_handle  # noqa: F401  (cdiv re-exported)
from runtime.errors import CudaError

DEFAULT_SMEM_LIMIT = 48 * 1024   # dynamic shared memory allowed without the opt-in attribute


class SignatureError(ValueError):
    """A PTX header is malformed or disagrees with the `.entry` parameter list."""


# header type -> (ctypes type, PTX .param types that may carry it)
PARAM_TYPES = {
    "ptr": (ctypes.c_uint64, {"u64", "b64", "s64"}),
    "u32": (ctypes.c_uint32, {"u32", "b32"}),
    "s32": (ctypes.c_int32, {"s32", "b32"}),
    "u64": (ctypes.c_uint64, {"u64", "b64"}),
    "s64": (ctypes.c_int64, {"s64", "b64"}),
    "f32": (ctypes.c_float, {"f32", "b32"}),
    "f64": (ctypes.c_double, {"f64", "b64"}),
}
_INT_RANGE = {"u32": (0, 2**32 - 1), "s32": (-2**31, 2**31 - 1), "u64": (0, 2**64 - 1),
              "s64": (-2**63, 2**63 - 1), "ptr": (0, 2**64 - 1)}
_F32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class KernelSignature:
    name: str
    params: tuple[tuple[str, str], ...]     # ((param name, header type), ...) in .entry order
    launch: str = ""
    smem: str = ""
    computes: str = ""

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.params)


_RE_KERNEL = re.compile(r"^\s*//\s*anybit-kernel:\s*(\S+)\s*$")
_RE_FIELD = re.compile(r"^\s*//\s*(params|launch|smem|computes):\s*(.*?)\s*$")
_RE_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$]*)\s*\(([^)]*)\)", re.S)
_RE_PARAM = re.compile(r"^\s*\.param\s+(.*?)\s*$", re.S)


def parse_header(text: str) -> dict[str, KernelSignature]:
    """The `// anybit-kernel:` blocks of a PTX file, keyed by entry name."""
    blocks: dict[str, dict] = {}
    cur = None
    for ln, line in enumerate(text.splitlines(), 1):
        m = _RE_KERNEL.match(line)
        if m:
            name = m.group(1)
            if name in blocks:
                raise SignatureError(f"line {ln}: kernel {name!r} has two header blocks")
            cur = blocks[name] = {"name": name}
            continue
        m = _RE_FIELD.match(line)
        if m and cur is not None:
            key, val = m.groups()
            cur[key] = val
            if key == "params":
                cur["params_line"] = ln
    out = {}
    for name, b in blocks.items():
        if "params" not in b:
            raise SignatureError(f"kernel {name!r}: header block has no '// params:' line")
        params = []
        spec = b["params"].strip()
        for item in ([] if spec in ("", "none", "-") else spec.split(",")):
            pname, sep, ptype = item.strip().partition(":")
            pname, ptype = pname.strip(), ptype.strip()
            if not sep or not pname or ptype not in PARAM_TYPES:
                raise SignatureError(f"kernel {name!r}, line {b['params_line']}: bad parameter "
                                     f"{item.strip()!r}; expected name:type with type one of "
                                     f"{', '.join(PARAM_TYPES)}")
            params.append((pname, ptype))
        out[name] = KernelSignature(name, tuple(params), b.get("launch", ""), b.get("smem", ""),
                                    b.get("computes", ""))
    return out


def parse_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """`.entry` parameter lists of a PTX text: {name: [(param name, ptx type), ...]}."""
    body = re.sub(r"//[^\n]*", "", text)           # comments may mention .entry too
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    out = {}
    for m in _RE_ENTRY.finditer(body):
        params = []
        for raw in (p for p in m.group(2).split(",") if p.strip()):
            pm = _RE_PARAM.match(raw)
            if not pm:
                raise SignatureError(f".entry {m.group(1)}: cannot read parameter {raw.strip()!r}")
            toks = pm.group(1).split()
            types = [t[1:] for t in toks if t.startswith(".") and t[1:] in
                     {"u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "b8", "b16", "b32", "b64",
                      "f16", "f32", "f64"}]
            if not types or "[" in toks[-1]:
                raise SignatureError(f".entry {m.group(1)}: parameter {raw.strip()!r} is not a scalar "
                                     "(arrays/structs are not supported by pack_args)")
            params.append((toks[-1], types[0]))
        out[m.group(1)] = params
    return out


def parse_signatures(text: str, source: str = "<ptx>") -> dict[str, KernelSignature]:
    """Header signatures, verified against the PTX `.entry` lists (names, order, types, count)."""
    header, entries = parse_header(text), parse_entries(text)
    missing = sorted(set(entries) - set(header))
    extra = sorted(set(header) - set(entries))
    if missing:
        raise SignatureError(f"{source}: .entry {', '.join(missing)} has no '// anybit-kernel:' header")
    if extra:
        raise SignatureError(f"{source}: header names kernel {', '.join(extra)} but no such .entry")
    for name, sig in header.items():
        ent = entries[name]
        if len(ent) != len(sig.params):
            raise SignatureError(f"{source}: kernel {name}: header lists {len(sig.params)} params "
                                 f"({', '.join(p for p, _ in sig.params)}), .entry has {len(ent)} "
                                 f"({', '.join(p for p, _ in ent)})")
        for i, ((hname, htype), (ename, etype)) in enumerate(zip(sig.params, ent)):
            if hname != ename:
                raise SignatureError(f"{source}: kernel {name}: param {i} is {hname!r} in the header "
                                     f"but {ename!r} in .entry")
            if etype not in PARAM_TYPES[htype][1]:
                raise SignatureError(f"{source}: kernel {name}: param {hname} is {htype} in the header "
                                     f"but .{etype} in .entry")
    return header


@dataclass
class PackedArgs:
    """Argument storage plus the void* array cuLaunchKernel reads; keep it alive until the launch."""

    buffer: ctypes.Array
    pointers: ctypes.Array

    @property
    def address(self) -> int:
        return ctypes.addressof(self.pointers)

    def raw(self) -> bytes:
        return bytes(self.buffer)


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what}: got a bool")
    if hasattr(value, "ptr") and not isinstance(value, int):
        value = value.ptr
    if isinstance(value, int):
        return value
    if hasattr(value, "__index__"):  # numpy integers
        return int(value.__index__())
    raise TypeError(f"{what}: expected an integer, got {type(value).__name__}")


def pack_args(sig: KernelSignature, values) -> PackedArgs:
    """Pack `values` for kernel `sig`: count, type and range checked; errors name kernel and param.

    ptr accepts an int device address or any object with an int `.ptr` (DeviceArray, pool blocks).
    Each value sits at an offset aligned to its own size, as the kernel parameter ABI expects.
    """
    values = list(values)
    if len(values) != len(sig.params):
        raise TypeError(f"kernel {sig.name} takes {len(sig.params)} arguments "
                        f"({', '.join(f'{n}:{t}' for n, t in sig.params)}), got {len(values)}")
    offsets, size = [], 0
    for _, t in sig.params:
        align = ctypes.sizeof(PARAM_TYPES[t][0])
        size = -(-size // align) * align
        offsets.append(size)
        size += align
    buf = (ctypes.c_char * max(size, 8))()
    ptrs = (ctypes.c_void_p * max(len(values), 1))()
    base = ctypes.addressof(buf)
    for i, ((pname, t), v, off) in enumerate(zip(sig.params, values, offsets)):
        what = f"kernel {sig.name}, parameter {i} '{pname}' ({t})"
        ctype = PARAM_TYPES[t][0]
        if t in ("f32", "f64"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                raise TypeError(f"{what}: expected a float, got {type(v).__name__}")
            x = float(v)
            if t == "f32" and math.isfinite(x) and abs(x) > _F32_MAX:
                raise OverflowError(f"{what}: {x!r} does not fit in float32")
            cval = ctype(x)
        else:
            x = _as_int(v, what)
            lo, hi = _INT_RANGE[t]
            if not lo <= x <= hi:
                raise OverflowError(f"{what}: {x} is outside [{lo}, {hi}]")
            cval = ctype(x)
        ctypes.memmove(base + off, ctypes.addressof(cval), ctypes.sizeof(ctype))
        ptrs[i] = base + off
    return PackedArgs(buf, ptrs)


def _jit_options(log_size: int):
    d = driver()
    o = d.CUjit_option
    info, err = bytearray(log_size), bytearray(log_size)
    opts = [o.CU_JIT_INFO_LOG_BUFFER, o.CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES, o.CU_JIT_ERROR_LOG_BUFFER,
            o.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES, o.CU_JIT_LOG_VERBOSE]
    return opts, [info, log_size, err, log_size, 1], info, err


def _text(buf: bytearray) -> str:
    return bytes(buf).split(b"\0", 1)[0].decode(errors="replace")


class Module:
    """A loaded CUmodule with its kernel signatures and a cache of Function handles."""

    def __init__(self, handle, signatures: dict[str, KernelSignature], source: str, jit_log: str = ""):
        self.handle, self.signatures, self.source, self.jit_log = handle, signatures, source, jit_log
        self._functions: dict[str, Function] = {}

    @classmethod
    def load_ptx(cls, text: str, source: str = "<ptx>", log_size: int = 1 << 16) -> "Module":
        """JIT-compile PTX in the current context; a failure raises CudaError carrying the JIT log."""
        sigs = parse_signatures(text, source)
        d = driver()
        opts, vals, info, err = _jit_options(log_size)
        res = d.cuModuleLoadDataEx(text.encode() + b"\0", len(opts), opts, vals)
        try:
            handle = check(res, f"cuModuleLoadDataEx({source})")
        except CudaError as e:
            raise CudaError(e.code, e.name, e.call, f"JIT error log:\n{_text(err)}".rstrip()) from None
        return cls(handle, sigs, source, _text(info))

    @classmethod
    def load_cubin(cls, cubin: bytes, signatures: dict[str, KernelSignature],
                   source: str = "<cubin>") -> "Module":
        """Load a prebuilt cubin; its signatures come from the header of the PTX it was built from."""
        handle = check(driver().cuModuleLoadData(bytes(cubin)), f"cuModuleLoadData({source})")
        return cls(handle, dict(signatures), source)

    def function(self, name: str) -> "Function":
        f = self._functions.get(name)
        if f is None:
            if name not in self.signatures:
                raise KeyError(f"{self.source}: no kernel {name!r} (has {', '.join(self.signatures)})")
            h = check(driver().cuModuleGetFunction(self.handle, name.encode()),
                      f"cuModuleGetFunction({name})")
            f = self._functions[name] = Function(h, self.signatures[name])
        return f

    __getitem__ = function

    def close(self) -> None:
        if self.handle is not None:
            h, self.handle = self.handle, None
            self._functions.clear()
            check(driver().cuModuleUnload(h), "cuModuleUnload")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Hardware limits the interpreter does not enforce (it runs any grid): a launch past them fails on the
# device with CUDA_ERROR_INVALID_VALUE, far from the code that computed the geometry.
GRID_MAX = (2**31 - 1, 65535, 65535)
BLOCK_MAX = (1024, 1024, 64)


def _dim3(v, what: str, limits=None) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, int) else tuple(v)
    if not 1 <= len(t) <= 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in t):
        raise ValueError(f"{what} must be 1-3 positive ints, got {v!r}")
    t = t + (1,) * (3 - len(t))
    if limits is not None:
        for axis, n, lim in zip("xyz", t, limits):
            if n > lim:
                raise ValueError(f"{what} {t}: {axis} = {n} exceeds the hardware limit {lim}")
    return t


def check_geometry(name: str, grid, block) -> tuple[tuple, tuple]:
    """(grid, block) as 3-tuples, within the limits every CUDA device has; ValueError naming the kernel."""
    g, b = _dim3(grid, f"{name}: grid", GRID_MAX), _dim3(block, f"{name}: block", BLOCK_MAX)
    if b[0] * b[1] * b[2] > 1024:
        raise ValueError(f"{name}: block {b} has {b[0] * b[1] * b[2]} threads, limit 1024")
    return g, b


class Function:
    """One kernel: typed launches, dynamic shared memory opt-in."""

    def __init__(self, handle, signature: KernelSignature):
        self.handle, self.signature = handle, signature
        self.max_dynamic_smem = DEFAULT_SMEM_LIMIT

    @property
    def name(self) -> str:
        return self.signature.name

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        """Allow `nbytes` of dynamic shared memory (only needed above 48 KiB)."""
        if nbytes > DEFAULT_SMEM_LIMIT and nbytes > self.max_dynamic_smem:
            d = driver()
            attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(d.cuFuncSetAttribute(self.handle, attr, int(nbytes)),
                  f"cuFuncSetAttribute({self.name}, MAX_DYNAMIC_SHARED_SIZE_BYTES={nbytes})")
            self.max_dynamic_smem = int(nbytes)

    def attribute(self, name: str) -> int:
        d = driver()
        a = getattr(d.CUfunction_attribute, "CU_FUNC_ATTRIBUTE_" + name)
        return int(check(d.cuFuncGetAttribute(a, self.handle), f"cuFuncGetAttribute({name})"))

    def launch(self, grid, block, args, smem: int = 0, stream=None) -> None:
        g, b = check_geometry(self.name, grid, block)
        if smem > self.max_dynamic_smem:
            self.set_max_dynamic_smem(smem)
        packed = pack_args(self.signature, args)
        _drv.note_launch(self.name, g, b, smem, args)
        check(driver().cuLaunchKernel(self.handle, *g, *b, int(smem), stream_handle(stream),
                                      packed.address, 0), f"cuLaunchKernel({self.name})")
        if _drv.SYNC_LAUNCH:       # a fault then surfaces here, naming this kernel
            h = stream_handle(stream)
            check(driver().cuStreamSynchronize(h), f"cuStreamSynchronize after {self.name}")

    __call__ = launch
