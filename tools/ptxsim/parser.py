"""PTX text -> entries made of raw statements (syntax only; semantics are decoded in decode.py).

Comments are blanked (newlines kept) so every statement keeps its source line.  Anything at module
or entry level outside docs/PTX_SUBSET.md is a SimError naming the line.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import SimError


# ----------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class PType:
    name: str
    bits: int
    kind: str          # 'b' bits, 'u' unsigned, 's' signed, 'f' float, 'pred'
    np: np.dtype


_UINT = {8: np.dtype(np.uint8), 16: np.dtype(np.uint16), 32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_SINT = {8: np.dtype(np.int8), 16: np.dtype(np.int16), 32: np.dtype(np.int32), 64: np.dtype(np.int64)}
UINT = _UINT
TYPES: dict[str, PType] = {"pred": PType("pred", 1, "pred", np.dtype(bool))}
for _b in (8, 16, 32, 64):
    TYPES[f"b{_b}"] = PType(f"b{_b}", _b, "b", _UINT[_b])
    TYPES[f"u{_b}"] = PType(f"u{_b}", _b, "u", _UINT[_b])
    TYPES[f"s{_b}"] = PType(f"s{_b}", _b, "s", _SINT[_b])
TYPES["f16"] = PType("f16", 16, "f", np.dtype(np.float16))
TYPES["f32"] = PType("f32", 32, "f", np.dtype(np.float32))
TYPES["f64"] = PType("f64", 64, "f", np.dtype(np.float64))
TYPES["f16x2"] = PType("f16x2", 32, "b", _UINT[32])     # only moved around as 32 bits

# register declarations the subset allows
REG_TYPES = {"b16", "b32", "b64", "u16", "u32", "u64", "s16", "s32", "s64", "f16", "f32", "f64",
             "pred", "f16x2"}


# ---------------------------------------------------------------------------------- structures
@dataclass
class Stmt:
    line: int
    text: str
    guard: tuple | None          # (pred register name, negated)
    opcode: str                  # e.g. "mma"
    mods: list[str]              # e.g. ["sync", "aligned", ...]
    operands: list               # parsed operand trees (see parse_operand)


@dataclass
class SharedVar:
    name: str
    align: int
    size: int | None             # None: .extern (dynamic) shared
    line: int


@dataclass
class Entry:
    name: str
    line: int
    params: list[tuple[str, PType]]
    regs: list[tuple[str, PType]] = field(default_factory=list)
    shared: list[SharedVar] = field(default_factory=list)
    body: list = field(default_factory=list)   # Stmt or ("label", name, line)
    reqntid: tuple | None = None


@dataclass
class ParsedModule:
    filename: str
    version: str
    target: str
    entries: dict[str, Entry]
    shared: list[SharedVar]      # module-level shared variables (visible to every entry)


# -------------------------------------------------------------------------------------- parsing
_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_LABEL_RE = re.compile(r"([A-Za-z_$][\w$]*)\s*:(?!:)")
_INSTR_RE = re.compile(r"(?:@(!?)\s*([%\w$.]+)\s+)?([a-z][\w.:]*)\s*(.*)$", re.S)
_IDENT_RE = re.compile(r"[%A-Za-z_$][\w$.]*$")
_REGDECL_RE = re.compile(r"\.reg\s+\.(\w+)\s+(.+)$", re.S)
_SHARED_RE = re.compile(
    r"(\.extern\s+)?\.shared\s+(?:\.align\s+(\d+)\s+)?\.(b8|u8|b32|u32|b64|u64|f32)\s+([\w$]+)\s*\[\s*(\d*)\s*\]$", re.S)
_ENTRY_RE = re.compile(r"(?:\.visible\s+)?\.entry\s+([\w$]+)\s*\((.*?)\)\s*(.*)$", re.S)
_PARAM_RE = re.compile(r"\.param\s+\.(u32|s32|u64|s64|f32|f64|b32|b64)\s+([\w$]+)$")


class _Src:
    def __init__(self, filename: str, text: str):
        self.filename = filename
        self.text = _COMMENT_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
        self.nl = [i for i, c in enumerate(self.text) if c == "\n"]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.nl, pos) + 1

    def err(self, pos_or_line: int, msg: str, is_line=False) -> SimError:
        ln = pos_or_line if is_line else self.line(pos_or_line)
        return SimError(f"{self.filename}:{ln}: {msg}")


def split_top(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/braces."""
    out, depth, cur = [], 0, []
    for c in s:
        if c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        if c == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    last = "".join(cur).strip()
    if last or out:
        out.append(last)
    return out


_NUM_RE = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|\d+)[uU]?$")
_FLT_RE = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


def parse_operand(s: str):
    """Operand tree: ('reg'|'name', str) ('imm', int) ('fimm', float, bits|None, width)
    ('vec', [ops]) ('addr', base|None, offset) ('pair', a, b) ('not', op)."""
    s = s.strip()
    if not s:
        raise ValueError("empty operand")
    if s.startswith("{"):
        if not s.endswith("}"):
            raise ValueError(f"bad vector operand {s!r}")
        return ("vec", [parse_operand(x) for x in split_top(s[1:-1])])
    if s.startswith("["):
        if not s.endswith("]"):
            raise ValueError(f"bad address operand {s!r}")
        inner = s[1:-1].replace(" ", "")
        m = re.match(r"([%A-Za-z_$][\w$.]*)?(?:([+-])?(0[xX][0-9a-fA-F]+|\d+))?$", inner)
        if not m or (m.group(1) is None and m.group(3) is None):
            raise ValueError(f"bad address {s!r}")
        off = int(m.group(3), 0) if m.group(3) else 0
        if m.group(2) == "-":
            off = -off
        elif m.group(1) and m.group(3) and not m.group(2):
            raise ValueError(f"bad address {s!r}")
        return ("addr", m.group(1), off)
    if "|" in s:
        a, b = s.split("|", 1)
        return ("pair", parse_operand(a), parse_operand(b))
    if s.startswith("!"):
        return ("not", parse_operand(s[1:]))
    if re.match(r"[-+]?0[fF][0-9a-fA-F]{8}$", s):
        neg = s.startswith("-")
        bits = int(s.lstrip("+-")[2:], 16) ^ (0x80000000 if neg else 0)
        return ("fimm", float(np.array([bits], np.uint32).view(np.float32)[0]), bits, 32)
    if re.match(r"[-+]?0[dD][0-9a-fA-F]{16}$", s):
        neg = s.startswith("-")
        bits = int(s.lstrip("+-")[2:], 16) ^ (1 << 63 if neg else 0)
        return ("fimm", float(np.array([bits], np.uint64).view(np.float64)[0]), bits, 64)
    if _NUM_RE.match(s):
        t = s.rstrip("uU")
        neg = t.startswith("-")
        v = int(t.lstrip("+-"), 0)
        return ("imm", -v if neg else v)
    if _FLT_RE.match(s):
        return ("fimm", float(s), None, None)
    if _IDENT_RE.match(s):
        return ("reg", s) if s.startswith("%") else ("name", s)
    raise ValueError(f"cannot parse operand {s!r}")


def _expand_regs(spec: str) -> list[str]:
    names = []
    for part in split_top(spec):
        m = re.match(r"([%\w$]+)\s*<\s*(\d+)\s*>$", part)
        if m:
            names += [f"{m.group(1)}{i}" for i in range(int(m.group(2)))]
        elif re.match(r"[%A-Za-z_$][\w$]*$", part):
            names.append(part)
        else:
            raise ValueError(f"bad register declaration {part!r}")
    return names


def _statements(src: _Src, start: int, end: int):
    """Yield ('{'|'}'|'label'|'stmt', text, pos) between start and end."""
    t = src.text
    pos = start
    while pos < end:
        while pos < end and t[pos].isspace():
            pos += 1
        if pos >= end:
            return
        c = t[pos]
        if c in "{}":
            yield (c, c, pos)
            pos += 1
            continue
        m = _LABEL_RE.match(t, pos, end)
        if m:
            yield ("label", m.group(1), pos)
            pos = m.end()
            continue
        semi = t.find(";", pos, end)
        if semi < 0:
            raise src.err(pos, f"missing ';' after {t[pos:end].strip()[:60]!r}")
        yield ("stmt", t[pos:semi].strip(), pos)
        pos = semi + 1


def _parse_shared(src, text, pos) -> SharedVar:
    m = _SHARED_RE.match(text)
    if not m:
        raise src.err(pos, f"unsupported shared declaration {text!r}")
    ext, align, _ty, name, size = m.groups()
    if bool(ext) != (size == ""):
        raise src.err(pos, f"shared array {name}: .extern needs [] and static arrays need a size")
    al = int(align) if align else {"b8": 1, "u8": 1, "b32": 4, "u32": 4, "f32": 4, "b64": 8, "u64": 8}[_ty]
    elem = {"b8": 1, "u8": 1, "b32": 4, "u32": 4, "f32": 4, "b64": 8, "u64": 8}[_ty]
    return SharedVar(name, al, None if ext else int(size) * elem, src.line(pos))


def _parse_body(src: _Src, ent: Entry, start: int, end: int):
    for kind, text, pos in _statements(src, start, end):
        line = src.line(pos)
        if kind in "{}":
            continue                       # nested scopes: names are function-wide here
        if kind == "label":
            ent.body.append(("label", text, line))
            continue
        if text.startswith(".reg"):
            m = _REGDECL_RE.match(text)
            if not m or m.group(1) not in REG_TYPES:
                raise src.err(pos, f"unsupported register declaration {text!r}")
            try:
                names = _expand_regs(m.group(2))
            except ValueError as e:
                raise src.err(pos, str(e)) from None
            ent.regs += [(n, TYPES[m.group(1)]) for n in names]
            continue
        if text.startswith(".shared") or text.startswith(".extern"):
            ent.shared.append(_parse_shared(src, text, pos))
            continue
        if text.startswith("."):
            raise src.err(pos, f"unsupported directive {text.split()[0]!r} in entry {ent.name}")
        m = _INSTR_RE.match(text)
        if not m:
            raise src.err(pos, f"cannot parse instruction {text!r}")
        neg, guard, opc, rest = m.groups()
        parts = opc.split(".")
        try:
            ops = [parse_operand(o) for o in split_top(rest)] if rest.strip() else []
        except ValueError as e:
            raise src.err(pos, f"{e} in `{text}`") from None
        ent.body.append(Stmt(line, " ".join(text.split()), (guard, bool(neg)) if guard else None,
                             parts[0], parts[1:], ops))


def parse(text: str, filename: str = "<ptx>") -> ParsedModule:
    src = _Src(filename, text)
    t = src.text
    n = len(t)
    pos = 0
    version = target = None
    entries: dict[str, Entry] = {}
    shared: list[SharedVar] = []
    while True:
        while pos < n and t[pos].isspace():
            pos += 1
        if pos >= n:
            break
        if t.startswith((".version", ".target", ".address_size"), pos):
            eol = t.find("\n", pos)
            eol = n if eol < 0 else eol
            stmt = " ".join(t[pos:eol].split()).rstrip(";").strip()
            key, _, val = stmt.partition(" ")
            val = val.strip()
            if key == ".version":
                version = val
                try:
                    major, minor = (int(x) for x in val.split("."))
                except ValueError:
                    raise src.err(pos, f"bad .version {val!r}") from None
                if (major, minor) > (9, 0):
                    raise src.err(pos, f".version {val} is above 9.0")
            elif key == ".target":
                target = val
                if not re.match(r"sm_(8\d|9\d|1\d\d)a?$", val.split(",")[0].strip()):
                    raise src.err(pos, f"unsupported .target {val}")
            elif val != "64":
                raise src.err(pos, "only .address_size 64 is supported")
            pos = eol
            continue
        semi, brace = t.find(";", pos), t.find("{", pos)
        if semi < 0 and brace < 0:
            raise src.err(pos, f"unexpected text {t[pos:pos + 40].strip()!r}")
        if brace >= 0 and (semi < 0 or brace < semi):
            head = t[pos:brace].strip()
            m = _ENTRY_RE.match(head)
            if not m:
                raise src.err(pos, f"unsupported module-level block {head[:60]!r} (only .entry)")
            name, plist, tail = m.groups()
            ent = Entry(name, src.line(pos), [])
            for p in split_top(plist):
                pm = _PARAM_RE.match(" ".join(p.split()))
                if not pm:
                    raise src.err(pos, f"unsupported parameter declaration {p!r} in {name}")
                ent.params.append((pm.group(2), TYPES[pm.group(1)]))
            for d in re.findall(r"\.(\w+)\s*([\d,\s]*)", tail):
                if d[0] in ("reqntid", "maxntid"):
                    dims = tuple(int(x) for x in d[1].replace(" ", "").split(",") if x)
                    if d[0] == "reqntid":
                        ent.reqntid = dims
                else:
                    raise src.err(pos, f"unsupported entry directive .{d[0]} in {name}")
            depth, q = 1, brace + 1
            while q < n and depth:
                depth += {"{": 1, "}": -1}.get(t[q], 0)
                q += 1
            if depth:
                raise src.err(brace, f"unterminated body of entry {name}")
            _parse_body(src, ent, brace + 1, q - 1)
            if name in entries:
                raise src.err(pos, f"duplicate entry {name}")
            entries[name] = ent
            pos = q
            continue
        stmt = " ".join(t[pos:semi].split())
        if stmt.startswith(".shared") or stmt.startswith(".extern"):
            shared.append(_parse_shared(src, stmt, pos))
        else:
            raise src.err(pos, f"unsupported module-level statement {stmt[:60]!r}")
        pos = semi + 1
    if version is None or target is None:
        raise SimError(f"{filename}: missing .version or .target directive")
    return ParsedModule(filename, version, target, entries, shared)
