"""nvJitLink linking, info-log parsing, the ELF symbol reader, the cubin cache and tools.ptxcheck."""
import json
import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("cuda.bindings.nvjitlink")

from runtime import nvjitlink as nj  # noqa: E402
from tools import ptxcheck  # noqa: E402

SAMPLES = Path(__file__).parent / "data" / "ptx_samples"
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def link(name, arch, **kw):
    return nj.link_ptx((SAMPLES / name).read_text(), arch, name=name, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_and_popc_is_native_everywhere(arch):
    r = link("bmma_and.ptx", arch)
    assert r.ok and r.cubin[:4] == b"\x7fELF"
    assert r.emulated == ()
    st = r.kernels["sample_bmma_and"]
    assert 0 < st.registers <= 32 and st.spill_bytes == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_xor_popc_is_emulated_exactly_on_sm90(arch):
    # measured with nvJitLink 13.0: sm_80/86/89 run XOR.POPC natively; sm_90 calls a local emulation
    # routine __cuda_sm_9x_mma_bit_internal_xor_m16n8k256 (and needs about twice the registers)
    r = link("bmma_xor.ptx", arch)
    mma = [s for s in r.emulated if "mma" in s]
    if arch == "sm_90":
        assert mma == ["__cuda_sm_9x_mma_bit_internal_xor_m16n8k256"]
        sym = [s for s in nj.elf_symbols(r.cubin) if s.name == mma[0]][0]
        assert sym.type == "FUNC" and not sym.undefined
        assert r.kernels["sample_bmma_xor"].registers > link("bmma_and.ptx", arch).kernels[
            "sample_bmma_and"].registers
    else:
        assert mma == []


def test_spill_and_static_smem_are_reported():
    st = link("spill.ptx", "sm_80").kernels["sample_spill"]
    assert st.spill_stores > 0 and st.spill_loads > 0 and st.stack >= st.spill_stores
    k = link("axpy_smem.ptx", "sm_90").kernels
    assert k["sample_block_sum"].smem == 128 * 4        # the .shared .f32 buf[128] of the PTX
    assert k["sample_block_sum"].smem_linked >= 512     # sm_90 adds the system-reserved 1 KiB
    assert k["sample_axpy"].smem == 0 and k["sample_axpy"].barriers == 0
    assert k["sample_block_sum"].barriers == 1


def test_parse_info_log_synthetic():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kA' for 'sm_80'
ptxas info    : Function properties for kA
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'kB' for 'sm_80'
ptxas info    : Function properties for kB
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 360 bytes cmem[0]
info    : 0 bytes gmem
info    : Function properties for 'kA':
info    : used 48 registers, used 1 barriers, 24 stack, 3072 bytes smem, 380 bytes cmem[0], 4 bytes lmem
"""
    k = nj.parse_info_log(log)
    a, b = k["kA"], k["kB"]
    assert (a.registers, a.smem, a.smem_linked, a.stack, a.spill_stores, a.spill_loads, a.lmem,
            a.cmem, a.barriers) == (48, 2048, 3072, 24, 8, 16, 4, 380, 1)
    assert (b.registers, b.smem, b.spill_bytes, b.cmem) == (12, 0, 0, 360)


def _tiny_elf(symbols):
    """A hand-built ELF64 with .shstrtab, .strtab and .symtab: an oracle for the reader."""
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n, *_ in symbols)
    shstr = b"\0.shstrtab\0.strtab\0.symtab\0"
    syms = b"\0" * 24
    off = 1
    for name, bind, typ, shndx, size in symbols:
        syms += struct.pack("<IBBHQQ", off, (bind << 4) | typ, 0, shndx, 0, size)
        off += len(name) + 1
    data_off = 64
    blobs = [shstr, strtab, syms]
    offs = []
    cur = data_off
    for b in blobs:
        offs.append(cur)
        cur += len(b)
    shoff = cur
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 4, 1)
    sh = bytes(64)  # null section
    sh += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, offs[0], len(shstr), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 11, 3, 0, 0, offs[1], len(strtab), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 19, 2, 0, 0, offs[2], len(syms), 2, 1, 8, 24)
    return bytes(hdr) + b"".join(blobs) + sh


def test_elf_reader_against_hand_built_image():
    elf = _tiny_elf([("kern", 1, 2, 5, 384), ("__cuda_sm_9x_mma_x", 0, 2, 6, 96),
                     ("__cuda_sm20_div", 1, 0, 0, 0)])
    syms = {s.name: s for s in nj.elf_symbols(elf)}
    assert syms["kern"].bind == "GLOBAL" and syms["kern"].type == "FUNC" and syms["kern"].size == 384
    assert syms["__cuda_sm_9x_mma_x"].bind == "LOCAL" and not syms["__cuda_sm_9x_mma_x"].undefined
    assert syms["__cuda_sm20_div"].undefined
    assert nj.emulation_symbols(elf) == ("__cuda_sm20_div", "__cuda_sm_9x_mma_x")
    with pytest.raises(ValueError, match="not a 64-bit"):
        nj.elf_symbols(b"MZ" + bytes(100))


def test_elf_reader_on_real_cubin():
    r = link("axpy_smem.ptx", "sm_86")
    funcs = {s.name for s in nj.elf_symbols(r.cubin) if s.type == "FUNC" and s.bind == "GLOBAL"}
    assert funcs == {"sample_axpy", "sample_block_sum"}
    assert nj.static_smem_from_cubin(r.cubin) == {"sample_block_sum": 512}


def test_link_error_carries_log():
    with pytest.raises(nj.LinkError, match="frobnicate") as ei:
        link("jit_error.ptx", "sm_80")
    assert ei.value.arch == "sm_80"
    r = link("jit_error.ptx", "sm_90", check=False)
    assert not r.ok and "frobnicate" in r.error_log


def run_check(capsys, *args):
    rc = ptxcheck.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ptxcheck_passes_clean_samples(capsys):
    rc, out, err = run_check(capsys, "--no-default", str(SAMPLES / "bmma_and.ptx"),
                             str(SAMPLES / "args_all.ptx"), str(SAMPLES / "axpy_smem.ptx"))
    assert rc == 0, err
    assert re.search(r"^sample_bmma_and\s+sm_90\s+\d+\s+0\s+0\s+0\s+-\s*$", out, re.M)
    assert "ok:" in out and err == ""


@pytest.mark.parametrize("name, reason", [("bmma_xor.ptx", "emulated mma"), ("spill.ptx", "spills"),
                                          ("jit_error.ptx", "link failed")])
def test_ptxcheck_fails(capsys, name, reason):
    rc, out, err = run_check(capsys, "--no-default", str(SAMPLES / name))
    assert rc == 1 and reason in err


def test_ptxcheck_xor_only_fails_on_sm90(capsys):
    rc, _, _ = run_check(capsys, "--no-default", "--arch", "sm_80,sm_86,sm_89", str(SAMPLES / "bmma_xor.ptx"))
    assert rc == 0
    rc, _, err = run_check(capsys, "--no-default", "--arch", "sm_90", str(SAMPLES / "bmma_xor.ptx"))
    assert rc == 1 and "[sm_90]" in err


def test_ptxcheck_json(capsys):
    rc, out, _ = run_check(capsys, "--no-default", "--json", str(SAMPLES / "spill.ptx"))
    d = json.loads(out)
    assert rc == 1 and d["archs"] == list(ptxcheck.CHECK_ARCHS) and set(ARCHS) < set(d["archs"])
    assert {r["arch"] for r in d["kernels"]} == set(ptxcheck.CHECK_ARCHS)
    assert all(r["spill_bytes"] > 0 for r in d["kernels"])


def test_ptxcheck_empty_dir(capsys, tmp_path):
    rc, out, _ = run_check(capsys, "--ptx-dir", str(tmp_path))
    assert rc == 0 and "nothing to check" in out


def test_ptxcheck_header_mismatch_fails(capsys, tmp_path):
    bad = tmp_path / "bad.ptx"
    bad.write_text((SAMPLES / "args_all.ptx").read_text().replace("// params: out:ptr, a:u32",
                                                                 "// params: out:ptr, a:f32"))
    rc, _, err = run_check(capsys, "--no-default", "--arch", "sm_80", str(bad))
    assert rc == 1 and "header" in err


def test_markdown_table_lists_registers_per_arch():
    from tools.ptxcheck import markdown_table
    rows = [{"file": "a.ptx", "kernel": "k1", "arch": a, "ok": True, "registers": r, "smem": s, "spill_bytes": 0}
            for a, r, s in (("sm_80", 30, 64), ("sm_90", 28, 64))]
    rows.append({"file": "a.ptx", "kernel": "-", "arch": "sm_86", "ok": False})
    md = markdown_table(rows, ("sm_80", "sm_86", "sm_90"), "13.0").splitlines()
    assert md[2] == "| file | kernel | registers sm_80 / sm_86 / sm_90 | static smem (B) | spill (B) |"
    assert md[4] == "| a.ptx | `k1` | 30 / - / 28 | 64 | 0 |" and len(md) == 5


def test_blackwell_is_linked_and_its_emulated_b1_mma_is_a_note_not_a_failure(capsys):
    """nvJitLink 13.0 emulates every b1 mma on sm_100 / sm_120 (measured: __cuda_sm_10x_mma_bit_internal_*,
    .and.popc included): ptxcheck links those archs by default and names the kernels that pay for it."""
    assert {"sm_100", "sm_120"} <= set(ptxcheck.CHECK_ARCHS)
    rc = ptxcheck.main(["--no-default", str(SAMPLES / "bmma_and.ptx"), "--arch", "sm_90,sm_100,sm_120"])
    out = capsys.readouterr().out
    assert rc == 0
    for arch in ("sm_100", "sm_120"):
        assert f"note: bmma_and.ptx [{arch}]: b1 mma emulated (__cuda_sm_10x_mma_bit_internal_and_m16n8k256)" in out
        assert "sample_bmma_and run it" in out
    assert "[sm_90]" not in out                                  # native there: nothing to say
    assert ptxcheck.mma_kernels((SAMPLES / "args_all.ptx").read_text()) == []
