"""wbits "source" (issue 17): `engine.load(path, wbits="source")`, `engine.generate --wbits source` and the
other CLIs import each tensor at its own GGUF type's bits, as `tools.pack --wbits source` does; on a tiny
GGUF of mixed types the logits equal those of the tools.pack path bitwise and match a float64 forward of
the tensors dequantized by gguf.quants.dequantize (the format's reference)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from loader.precision import check_wbits, parse_wbits
from tests.data_gen.tiny_models import write_tiny_gguf

# a Q4_K_M-like mix on the tiny model's shapes (its rows of 64 lanes rule out the 256-lane K-quants)
TYPES = {"token_embd.weight": "Q5_0", "blk.0.attn_q.weight": "Q5_1", "blk.0.attn_k.weight": "Q5_0",
         "blk.0.attn_v.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_0", "blk.1.ffn_gate.weight": "Q4_1",
         "blk.1.ffn_up.weight": "Q5_0", "blk.1.attn_output.weight": "Q5_1"}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}
IDS = [1, 40, 7, 200, 12, 99]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    path = d / "mixed.gguf"
    write_tiny_gguf(path, types=TYPES, default_type="Q8_0")
    return path


def logits(m, ids=IDS) -> np.ndarray:
    return m.decoder.forward(ids, m.decoder.new_cache(), all_logits=True)


def gguf_reference(path):
    """float64 logits of the tiny model, every tensor dequantized by gguf.quants.dequantize."""
    import gguf

    from loader.gguf_config import internal_names
    from loader.gguf_reader import read_gguf
    from loader.source import SourceModel, SourceTensor
    from tests.reference_forward import reference_logits
    cfg = read_gguf(path, with_tokenizer=False).config
    tensors = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        for name, rows in internal_names(t.name, w.shape, cfg, str(path)):
            a = w if rows is None else w[rows]
            tensors[name] = SourceTensor(name, a.shape, (lambda a=a: a))
    return reference_logits(SourceModel(cfg, tensors, "", str(path)), IDS)


def test_parse_and_check():
    assert parse_wbits("source") == check_wbits("source") == check_wbits(0) == "source"
    assert parse_wbits("5") == check_wbits(5) == 5 and check_wbits(16) == 16
    for bad in ("9", "sauce", "0.5"):
        with pytest.raises(Exception, match="1..8, 16 or 'source'"):
            parse_wbits(bad)
    with pytest.raises(ValueError, match="1..8, 16 or 'source'"):
        check_wbits(12)


def test_load_source_equals_pack_source_and_the_gguf_reference(mixed, tmp_path):
    import engine
    from tools import pack
    m = engine.load(mixed, wbits="source", device="cpu", threads=1, progress=False)
    assert m.wbits == "source"
    src_types = {"output": "Q5_0", "layers.0.wq": "Q5_1", "layers.0.wk": "Q5_0", "layers.0.wv": "Q8_0",
                 "layers.0.w_down": "Q4_0", "layers.1.w_gate": "Q4_1", "layers.1.w_up": "Q5_0",
                 "layers.1.wo": "Q5_1", "layers.1.wq": "Q8_0"}
    for name, kind in src_types.items():
        assert m.packed.info[name]["bits"] == BITS[kind] and m.packed.info[name]["exact"], (name, m.packed.info[name])
    got = logits(m)
    m.close()
    # the same model through tools.pack --wbits source, then loaded at the bits it holds
    assert pack.main([str(mixed), str(tmp_path / "p"), "--wbits", "source"]) == 0
    p = engine.load(tmp_path / "p", wbits="source", device="cpu", threads=1, progress=False)
    np.testing.assert_array_equal(logits(p), got)
    p.close()
    ref = gguf_reference(mixed)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"worst relative error {rel:.2e}"
    # and a fixed precision still nests every tensor at most at that many bits (not the source path)
    w4 = engine.load(mixed, wbits=4, device="cpu", threads=1, progress=False)
    assert not np.array_equal(logits(w4), got)
    w4.close()


def test_generate_cli_source_and_a_bad_value(mixed, tmp_path):
    env_run = lambda *a: subprocess.run([sys.executable, "-m", "engine.generate", *a], capture_output=True,
                                        text=True, timeout=300)
    p = env_run("hello", "--raw", "--model", str(mixed), "--wbits", "source", "--max-tokens", "3", "--json",
                "--device", "cpu", "--threads", "1")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["wbits"] == "source" and out["generated_tokens"] == 3
    p = env_run("hello", "--model", str(mixed), "--wbits", "sauce")
    assert p.returncode == 2 and "1..8, 16 or 'source'" in p.stderr and "Traceback" not in p.stderr
