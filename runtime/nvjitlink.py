"""PTX -> cubin with nvJitLink (no GPU needed) and per-kernel resource usage.

nvJitLink runs the same ptxas as the driver's JIT, so linking every kernel for sm_80/86/89/90 on a
machine without a GPU tells us whether the PTX assembles, how many registers, how much shared and
local memory each kernel uses, whether ptxas spilled, and whether an instruction was replaced by a
software emulation routine (on sm_90, `mma ... .b1 .xor.popc` becomes a call to a local function
named `__cuda_sm_9x_mma_*`, visible in the cubin's ELF symbol table).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_OPTIONS = ("-O3",)


class LinkError(RuntimeError):
    """nvJitLink could not assemble/link a PTX file for an arch; carries the error log."""

    def __init__(self, name: str, arch: str, error_log: str, result: str = ""):
        self.name, self.arch, self.error_log = name, arch, error_log
        super().__init__(f"nvJitLink failed for {name} on {arch}{' (' + result + ')' if result else ''}:"
                         f"\n{error_log.strip()}")


def _nvjitlink():
    try:
        from cuda.bindings import nvjitlink
    except ImportError as e:
        raise LinkError("-", "-", f"cuda.bindings.nvjitlink is unavailable ({e}); install "
                        "cuda-python 13.x and nvidia-nvjitlink 13.0") from e
    return nvjitlink


def nvjitlink_version() -> tuple[int, int]:
    return tuple(_nvjitlink().version())


@dataclass(frozen=True)
class KernelStats:
    """Resource usage of one entry as reported by the linker (bytes unless noted)."""

    name: str
    registers: int = 0      # per thread, including emulation callees
    smem: int = 0           # static shared memory the PTX declares (ptxas)
    smem_linked: int = 0    # what the block occupies: on sm_90 + 1 KiB reserved by the system
    stack: int = 0          # stack frame
    spill_stores: int = 0
    spill_loads: int = 0
    lmem: int = 0           # local memory outside the stack frame
    cmem: int = 0           # constant bank 0 (parameters and driver constants)
    barriers: int = 0

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass
class LinkResult:
    arch: str
    cubin: bytes
    info_log: str
    error_log: str
    kernels: dict[str, KernelStats] = field(default_factory=dict)
    emulated: tuple[str, ...] = ()     # `__cuda_sm*` emulation routines found in the cubin

    @property
    def ok(self) -> bool:
        return bool(self.cubin)


def _read_log(nvj, handle, size_fn, get_fn) -> str:
    n = size_fn(handle)
    if not n:
        return ""
    buf = bytearray(n)
    get_fn(handle, buf)
    return bytes(buf).split(b"\0", 1)[0].decode(errors="replace")


def link_ptx(ptx_text: str | bytes, arch: str, *, name: str = "input.ptx",
             options: tuple[str, ...] = DEFAULT_OPTIONS, check: bool = True) -> LinkResult:
    """Assemble one PTX text for `arch` ("sm_90"). Raises LinkError unless check=False, in which
    case a failed link returns a LinkResult with an empty cubin and the error log."""
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    nvj = _nvjitlink()
    data = ptx_text.encode() if isinstance(ptx_text, str) else bytes(ptx_text)
    if not data.endswith(b"\0"):
        data += b"\0"  # ptxas wants a NUL-terminated string
    opts = [f"-arch={arch}", "-verbose", *options]
    handle = nvj.create(len(opts), opts)
    failure = ""
    try:
        try:
            nvj.add_data(handle, nvj.InputType.PTX, data, len(data), name)
            nvj.complete(handle)
        except nvj.nvJitLinkError as e:
            failure = str(e)
        info = _read_log(nvj, handle, nvj.get_info_log_size, nvj.get_info_log)
        err = _read_log(nvj, handle, nvj.get_error_log_size, nvj.get_error_log)
        cubin = b""
        if not failure:
            buf = bytearray(nvj.get_linked_cubin_size(handle))
            nvj.get_linked_cubin(handle, buf)
            cubin = bytes(buf)
    finally:
        nvj.destroy(handle)
    if failure and check:
        raise LinkError(name, arch, err or failure, failure)
    res = LinkResult(arch=arch, cubin=cubin, info_log=info, error_log=err or failure)
    if cubin:
        res.kernels = parse_info_log(info)
        for k, size in static_smem_from_cubin(cubin).items():
            # the cubin's .nv.shared.<kernel> section is authoritative for the occupied size
            if k in res.kernels:
                res.kernels[k] = _replace(res.kernels[k], smem_linked=size)
        res.emulated = emulation_symbols(cubin)
    return res


def _replace(stats: KernelStats, **kw) -> KernelStats:
    d = stats.__dict__.copy()
    d.update(kw)
    return KernelStats(**d)


# ptxas: "Function properties for NAME" then "N bytes stack frame, N bytes spill stores, N bytes spill
# loads"; the linker's own summary: "Function properties for 'NAME':" then "used N registers, used N
# barriers, N stack, N bytes smem, N bytes cmem[0], N bytes lmem". The linker's register count includes
# called emulation routines, so it wins over ptxas's "Used N registers".
_RE_PTXAS_FN = re.compile(r"^ptxas info\s*: Function properties for (\S+)\s*$")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_PTXAS_USED = re.compile(r"^ptxas info\s*: Used (\d+) registers(.*)$")
_RE_LINK_FN = re.compile(r"^info\s*: Function properties for '([^']+)':\s*$")
_RE_LINK_USED = re.compile(r"^info\s*: used (\d+) registers, used (\d+) barriers, (\d+) stack, "
                           r"(\d+) bytes smem, (\d+) bytes cmem\[0\](?:, (\d+) bytes lmem)?")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_CMEM = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_info_log(log: str) -> dict[str, KernelStats]:
    """Per-kernel resource usage from an nvJitLink `-verbose` info log."""
    acc: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        line = line.rstrip()
        m = _RE_PTXAS_FN.match(line) or _RE_LINK_FN.match(line)
        if m:
            current = acc.setdefault(m.group(1), {"name": m.group(1)})
            continue
        if current is None:
            continue
        m = _RE_SPILL.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
            continue
        m = _RE_LINK_USED.match(line)
        if m:
            current.update(registers=int(m.group(1)), barriers=int(m.group(2)), stack=int(m.group(3)),
                           smem_linked=int(m.group(4)), cmem=int(m.group(5)),
                           lmem=int(m.group(6) or 0), _linked=True)
            current.setdefault("smem", int(m.group(4)))
            current = None
            continue
        m = _RE_PTXAS_USED.match(line)
        if m and not current.get("_linked"):
            current["registers"] = int(m.group(1))
            rest = m.group(2)
            s = _RE_SMEM.search(rest)
            current["smem"] = int(s.group(1)) if s else 0   # ptxas omits "0 bytes smem"
            if (c := _RE_CMEM.search(rest)):
                current["cmem"] = int(c.group(1))
            current = None
    out = {}
    for k, d in acc.items():
        d.pop("_linked", None)
        out[k] = KernelStats(**d)
    return out


# ---- a minimal ELF64 little-endian reader: section headers and the symbol table -------------------

@dataclass(frozen=True)
class ElfSymbol:
    name: str
    bind: str      # LOCAL | GLOBAL | WEAK | <n>
    type: str      # NOTYPE | OBJECT | FUNC | SECTION | FILE | <n>
    shndx: int     # 0 = undefined
    size: int

    @property
    def undefined(self) -> bool:
        return self.shndx == 0


_BINDS = {0: "LOCAL", 1: "GLOBAL", 2: "WEAK"}
_TYPES = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE"}


def _sections(elf: bytes) -> list[tuple[str, int, int, int, int]]:
    """[(name, type, offset, size, link)] of every section header."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF image (is this a cubin?)")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = raw[shstrndx][4]

    def cstr(off: int) -> str:
        return elf[off:elf.index(b"\0", off)].decode(errors="replace")

    return [(cstr(strtab_off + r[0]), r[1], r[4], r[5], r[6]) for r in raw]


def elf_symbols(elf: bytes) -> list[ElfSymbol]:
    secs = _sections(elf)
    out = []
    for _, typ, off, size, link in secs:
        if typ != 2:  # SHT_SYMTAB
            continue
        str_off = secs[link][2]
        for i in range(size // 24):
            st_name, st_info, _other, st_shndx, _val, st_size = struct.unpack_from("<IBBHQQ", elf,
                                                                                   off + 24 * i)
            name = elf[str_off + st_name:elf.index(b"\0", str_off + st_name)].decode(errors="replace")
            out.append(ElfSymbol(name, _BINDS.get(st_info >> 4, str(st_info >> 4)),
                                 _TYPES.get(st_info & 15, str(st_info & 15)), st_shndx, st_size))
    return out


def emulation_symbols(cubin: bytes) -> tuple[str, ...]:
    """Names of software-emulation routines (`__cuda_sm*`) in a cubin, defined or undefined.

    Measured with nvJitLink 13.0: on sm_90 the b1 `.xor.popc` mma is lowered to a call of the LOCAL
    FUNC `__cuda_sm_9x_mma_bit_internal_xor_m16n8k256`, so both bindings are looked at.
    """
    return tuple(sorted({s.name for s in elf_symbols(cubin) if s.name.startswith("__cuda_sm")}))


def static_smem_from_cubin(cubin: bytes) -> dict[str, int]:
    """Static shared memory per kernel: the size of its `.nv.shared.<kernel>` (NOBITS) section."""
    return {name[len(".nv.shared."):]: size for name, _t, _o, size, _l in _sections(cubin)
            if name.startswith(".nv.shared.")}
