"""`python -m tools.pack` on the default model at 1, 2, 3, 4 and 8 bits; read back bit-exactly."""
import numpy as np
import pytest

from loader.bipolar import PackedLinear, quantize_weights
from loader.pack import exact_import
from loader.packed import read_packed
from loader.sources import read_source
from tools import pack


@pytest.fixture(scope="module")
def source(default_gguf):
    return read_source(default_gguf)


@pytest.mark.parametrize("bits", [pytest.param(b, marks=pytest.mark.slow) for b in (1, 2, 3)] + [4, 8])
def test_pack_default_model_and_read_back(tmp_path, default_gguf, source, bits, capsys):
    out = tmp_path / f"w{bits}"
    assert pack.main([str(default_gguf), str(out), "--wbits", str(bits), "--no-clip"]) == 0
    summary = capsys.readouterr().out
    assert f"W{bits} G" in summary and "MiB packed" in summary
    pm = read_packed(out)
    name = "layers.3.w_down"
    got = pm.tensors[name]
    assert isinstance(got, PackedLinear) and got.bits == bits
    t = source.tensors[name]
    if bits in (4, 8):                       # Q4_1 source: exact import at p >= 4, G = 32
        assert pm.info[name]["exact"] and got.group == 32
        want = exact_import(t.blocks(), t.ggml_type, bits)
        np.testing.assert_array_equal(got.dequantize(), want.dequantize())
        np.testing.assert_allclose(got.dequantize(), t.load(), rtol=0, atol=1e-6)
    else:
        # re-quantized in groups of the source's block (32), not 128 (issue 17)
        assert not pm.info[name]["exact"] and got.group == 32
        want = PackedLinear.from_quant(quantize_weights(t.load(), bits, 32, asymmetric=True, clip_search=False))
    np.testing.assert_array_equal(got.planes, want.planes if isinstance(want, PackedLinear)
                                  else PackedLinear.from_quant(want).planes)
    np.testing.assert_array_equal(got.scales, want.scales)


def test_pack_errors_are_one_line(tmp_path, capsys):
    assert pack.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert pack.main([str(bad), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
