"""The ptxsim test kernels are real PTX: each links with nvJitLink for sm_80 (no GPU needed)."""
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "ptxsim"
FILES = sorted(DATA.glob("*.ptx"))


def link_sm80(ptx: bytes, name: str) -> bytes:
    nvjitlink = pytest.importorskip("cuda.bindings.nvjitlink")
    h = nvjitlink.create(1, ["-arch=sm_80"])
    try:
        try:
            nvjitlink.add_data(h, nvjitlink.InputType.PTX, ptx, len(ptx), name)
            nvjitlink.complete(h)
        except Exception as e:   # the error log says what ptxas rejected
            size = nvjitlink.get_error_log_size(h)
            log = bytearray(size)
            nvjitlink.get_error_log(h, log)
            raise AssertionError(f"{name} does not link: {bytes(log).decode(errors='replace')}") from e
        cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
        nvjitlink.get_linked_cubin(h, cubin)
        return bytes(cubin)
    finally:
        nvjitlink.destroy(h)


def test_there_are_test_kernels():
    assert len(FILES) >= 5


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_links_for_sm80(path):
    cubin = link_sm80(path.read_bytes(), path.name)
    assert cubin[:4] == b"\x7fELF"
