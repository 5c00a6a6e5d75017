"""Link every kernel for every target arch with nvJitLink and report its resource usage (no GPU needed).

    python -m tools.ptxcheck [FILES...] [--arch sm_90 ...] [--ptx-dir ptx] [--no-default] [--json]

Checks ptx/*.ptx (unless --no-default) plus any FILES. For each file and arch it prints one row per
kernel: registers, static shared memory, spill bytes, local (stack + lmem) bytes, emulation routines.
Exit status 1 if a file does not link, a kernel spills, an emulated mma appears where the b1 mma is
native (sm_80..sm_90; on sm_90 the `.xor.popc` form is emulated by `__cuda_sm_9x_mma_*`), or a header
disagrees with its .entry list; 2 for bad usage; 0 otherwise.

Blackwell (sm_100, sm_120) is linked too: there nvJitLink 13.0 emulates every b1 mma, `.and.popc`
included (`__cuda_sm_10x_mma_bit_internal_*`), so an emulated mma there is reported as a note, with
the kernels it affects, not as a failure: no other b1 mma form exists to switch to.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.module import SignatureError, parse_signatures
from runtime.nvjitlink import DEFAULT_ARCHS, LinkError, link_ptx, nvjitlink_version

REPO = Path(__file__).resolve().parent.parent
CHECK_ARCHS = DEFAULT_ARCHS + ("sm_100", "sm_120")     # the cubin cache builds DEFAULT_ARCHS only
EMULATED_B1_ARCHS = ("sm_100", "sm_120")               # no native b1 mma: emulation is expected there


def _arch_num(arch: str) -> int:
    return int("".join(ch for ch in arch[3:] if ch.isdigit()))


def mma_kernels(text: str) -> list[str]:
    """Entries of a PTX text whose body has an mma instruction (comments ignored)."""
    import re
    body = re.sub(r"//[^\n]*", "", text)
    parts = re.split(r"\.entry\s+([A-Za-z_$][\w$]*)", body)
    return sorted(name for name, code in zip(parts[1::2], parts[2::2]) if re.search(r"\bmma\.", code))


def check_file(path: Path, archs, notes: list | None = None) -> tuple[list[dict], list[str]]:
    """Rows (one per kernel and arch) and problems for one PTX file; where the b1 mma is emulated by
    design (EMULATED_B1_ARCHS and newer) a line goes to `notes` instead of `problems`."""
    rows, problems = [], []
    text = path.read_text()
    try:
        parse_signatures(text, str(path))
    except SignatureError as e:
        problems.append(f"{path.name}: header: {e}")
    for arch in archs:
        res = link_ptx(text, arch, name=path.name, check=False)
        if not res.ok:
            problems.append(f"{path.name} [{arch}]: link failed:\n    "
                            + "\n    ".join(res.error_log.strip().splitlines()))
            rows.append({"file": path.name, "kernel": "-", "arch": arch, "ok": False})
            continue
        mma_emu = [s for s in res.emulated if "mma" in s]
        for name, st in sorted(res.kernels.items()):
            rows.append({"file": path.name, "kernel": name, "arch": arch, "ok": True,
                         "registers": st.registers, "smem": st.smem, "smem_linked": st.smem_linked,
                         "spill_bytes": st.spill_bytes, "spill_stores": st.spill_stores,
                         "spill_loads": st.spill_loads, "local_bytes": st.stack + st.lmem,
                         "emulated": list(res.emulated)})
            if st.spill_bytes:
                problems.append(f"{path.name} [{arch}] {name}: spills {st.spill_stores} B stored, "
                                f"{st.spill_loads} B loaded")
        if mma_emu:
            if _arch_num(arch) >= 100:
                uses = mma_kernels(text) or ["?"]
                msg = (f"{path.name} [{arch}]: b1 mma emulated ({', '.join(mma_emu)}); the file's kernels "
                       f"{', '.join(uses)} run it through that routine")
                if notes is not None:
                    notes.append(msg)
            else:
                problems.append(f"{path.name} [{arch}]: emulated mma ({', '.join(mma_emu)}); use the "
                                ".and.popc form, which is native on sm_80..sm_90")
    return rows, problems


def format_table(rows: list[dict]) -> str:
    # emulation routines are per cubin (per file), listed without their "__cuda_" prefix
    head = ("kernel", "arch", "regs", "smem", "spill", "local", "emulated (__cuda_*, per file)")
    body = []
    for r in rows:
        if not r["ok"]:
            body.append((f"{r['file']}:-", r["arch"], "LINK ERROR", "", "", "", ""))
            continue
        body.append((r["kernel"], r["arch"], str(r["registers"]), str(r["smem"]),
                     str(r["spill_bytes"]), str(r["local_bytes"]),
                     ",".join(e.removeprefix("__cuda_") for e in r["emulated"]) or "-"))
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda t: "  ".join(c.ljust(w[i]) if i in (0, 1, 6) else c.rjust(w[i]) for i, c in enumerate(t))
    return "\n".join([fmt(head), fmt(tuple("-" * n for n in w)), *map(fmt, body)])


def markdown_table(rows: list[dict], archs, version: str) -> str:
    """One row per kernel: registers per arch, static shared memory, spills (for ptx/README.md)."""
    kernels = list(dict.fromkeys((r["file"], r["kernel"]) for r in rows if r["ok"]))
    cell = {(r["file"], r["kernel"], r["arch"]): r for r in rows if r["ok"]}
    out = [f"_Generated by `python -m tools.ptxcheck --readme ptx/README.md` (nvJitLink {version})._", "",
           "| file | kernel | registers " + " / ".join(archs) + " | static smem (B) | spill (B) |",
           "|---|---|---|---|---|"]
    for f, k in kernels:
        rs = [cell.get((f, k, a)) for a in archs]
        regs = " / ".join(str(r["registers"]) if r else "-" for r in rs)
        smem = max((r["smem"] for r in rs if r), default=0)
        spill = max((r["spill_bytes"] for r in rs if r), default=0)
        out.append(f"| {f} | `{k}` | {regs} | {smem} | {spill} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.ptxcheck", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="extra PTX files to check")
    ap.add_argument("--arch", action="append", help=f"target arch (repeatable; default "
                    f"{' '.join(CHECK_ARCHS)})")
    ap.add_argument("--ptx-dir", type=Path, default=REPO / "ptx")
    ap.add_argument("--no-default", action="store_true", help="check only the given files")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--readme", type=Path, default=None,
                    help="also write the table between <!-- ptxcheck:begin/end --> in this file")
    args = ap.parse_args(argv)
    archs = tuple(a for spec in (args.arch or CHECK_ARCHS) for a in spec.split(",") if a)
    files = [] if args.no_default else sorted(args.ptx_dir.glob("*.ptx"))
    for f in args.files:
        if not f.is_file():
            print(f"ptxcheck: no such file: {f}", file=sys.stderr)
            return 2
        files.append(f)
    try:
        version = ".".join(map(str, nvjitlink_version()))
    except LinkError as e:
        print(f"ptxcheck: {e}", file=sys.stderr)
        return 1
    rows, problems, notes = [], [], []
    for f in files:
        r, p = check_file(f, archs, notes)
        rows += sorted(r, key=lambda x: (x["kernel"], archs.index(x["arch"])))
        problems += p
    if args.json:
        print(json.dumps({"nvjitlink": version, "archs": list(archs), "files": [str(f) for f in files],
                          "kernels": rows, "problems": problems, "notes": notes}, indent=1))
    else:
        if not files:
            print(f"ptxcheck: no PTX files in {args.ptx_dir} yet; nothing to check")
        else:
            print(f"nvJitLink {version}; {len(files)} file(s), archs {' '.join(archs)}")
            print(format_table(rows))
        for n in notes:
            print("note: " + n)
        for p in problems:
            print("FAIL: " + p, file=sys.stderr)
        if files and not problems:
            print("ok: every kernel links without spills, and without emulated mma where the b1 mma is native")
    if args.readme is not None and not problems:
        from tools.eval import replace_between
        text = args.readme.read_text()
        args.readme.write_text(replace_between(text, "<!-- ptxcheck:begin -->", "<!-- ptxcheck:end -->",
                                               markdown_table(rows, archs, version)))
        print(f"updated {args.readme}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
