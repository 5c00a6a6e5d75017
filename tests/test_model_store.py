"""Packed directories as model paths: the precision they run at, nested runs, refusals."""
import pytest

from engine.model_store import load_packed_model
from loader.errors import FormatError
from loader.pack import Recipe, quantize_model
from loader.packed import write_packed
from tests.test_pack import tiny_llama


def test_packed_dir_runs_at_its_layer_bits_whatever_the_head(tmp_path, capsys):
    pm = quantize_model(tiny_llama(), Recipe(wbits=2, group=32, head_bits=8))
    assert pm.info["output"]["bits"] == 8
    out = write_packed(pm, tmp_path / "w2")
    _, bits = load_packed_model(out, wbits=4)
    assert bits == 2 and "holds 2-bit weights" in capsys.readouterr().err
    _, bits = load_packed_model(out, wbits=1)          # nested: the top plane only
    assert bits == 1
    with pytest.raises(FormatError, match="cannot run unquantized"):
        load_packed_model(out, wbits=16)


@pytest.mark.parametrize("kind,wbits,abits,agroup,rotate,gptq", [
    ("decoder", 4, 16, None, 0, False),        # the default: exact import, nothing rewritten
    ("decoder", 8, 8, 32, 256, False),         # 8-bit weights re-round for free: rotate
    ("decoder", 4, 8, 32, 0, False),           # keep the exact W4 import
    ("decoder", 4, 8, "token", 256, False),    # one scale per token: rotate
    ("embedder", 4, 16, None, 256, True),      # W4A16 embedder: GPTQ on rotated inputs
    ("embedder", 8, 8, None, 0, False),
])
def test_default_recipe_policy(kind, wbits, abits, agroup, rotate, gptq):
    from engine.model_store import default_recipe
    r = default_recipe(kind, wbits, abits, None, agroup)
    assert (r.rotate, r.gptq, r.smooth) == (rotate, gptq, False)
