"""Slow: a random-weight Llama written as F32 GGUF, quantized by llama.cpp's own quantizer to each type,
then run by llama.cpp and by anybit (every linear imported exactly at its source's bits, `wbits 0`):
the next-token distributions agree to KL < 1e-3 (llama.cpp quantizes activations to 8 bits in its
K-quant dot products; anybit's A16 kernel to 16)."""
import json
import subprocess

import numpy as np
import pytest

from tools.bench.peers import find_llama

pytestmark = pytest.mark.slow

# llama.cpp file types (llama.h LLAMA_FTYPE_MOSTLY_*)
FTYPES = {"Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q4_K_S": 14}

ORACLE = r"""
import json, sys, numpy as np, llama_cpp
cfg = json.loads(sys.argv[1])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = cfg["ftype"]
params.nthread = 2
rc = llama_cpp.llama_model_quantize(cfg["src"].encode(), cfg["dst"].encode(), params)
assert rc == 0, rc
kw = dict(model_path=cfg["dst"], n_ctx=64, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
try:
    llm = llama_cpp.Llama(use_extra_bufts=False, **kw)
except TypeError:
    llm = llama_cpp.Llama(**kw)
llm.eval(cfg["ids"])
np.save(cfg["out"], np.array(llm.scores[:len(cfg["ids"])], np.float32))
"""


def write_f32_llama(path, monkeypatch):
    """tests/data_gen's tiny Llama at K-quant-friendly shapes (rows of 256 and 512 lanes), all F32."""
    from tests.data_gen import tiny_models as tm
    for k, v in dict(DIM=256, FFN=512, HEADS=4, KV_HEADS=2, HEAD_DIM=64).items():
        monkeypatch.setattr(tm, k, v)
    return tm.write_tiny_gguf(path, default_type="F32")


@pytest.fixture(scope="module")
def llama_python():
    py, note = find_llama()
    if py is None:
        pytest.skip(note)
    return py


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_llama_cpp_quantized_file_matches(tmp_path, monkeypatch, llama_python, ftype):
    from engine.decoder import Decoder
    from loader.gguf_reader import read_gguf
    from loader.pack import Recipe, quantize_model
    from runtime.cpu import CpuBackend

    src = tmp_path / "f32.gguf"
    write_f32_llama(src, monkeypatch)
    dst, out = tmp_path / f"{ftype}.gguf", tmp_path / "logits.npy"
    ids = [1, 17, 42, 99, 7, 123, 55, 201, 3, 64]
    cfg = dict(src=str(src), dst=str(dst), ftype=FTYPES[ftype], ids=ids, out=str(out))
    r = subprocess.run([llama_python, "-c", ORACLE, json.dumps(cfg)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    want = np.load(out).astype(np.float64)
    model = read_gguf(dst)
    types = {t.ggml_type for t in model.tensors.values() if t.ggml_type not in ("F32",)}
    pm = quantize_model(model, Recipe(wbits=0))
    exact = {n: m["exact"] for n, m in pm.info.items()}
    assert all(exact.values()), (types, exact)
    be = CpuBackend(threads=2)
    dec = Decoder(pm, be)
    got = dec.forward(ids, dec.new_cache(), all_logits=True).astype(np.float64)
    lp = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    kl = (np.exp(lp(want)) * (lp(want) - lp(got))).sum(-1)
    assert kl.max() < 1e-3, (ftype, types, kl)
