"""The Llama-with-q/k/v-biases builder (engine/archs/llama_bias.py) against llama.cpp on the same random
weights: a float32 GGUF written with gguf-py (llama.cpp's llama architecture takes optional attn_q/k/v
biases), run by llama-cpp-python in its own interpreter (tools/bench/peers.find_llama), its logits of
every prompt token compared with ours. Skipped cleanly where that interpreter is not available."""
import json
import subprocess

import numpy as np
import pytest

from engine.decoder import Decoder
from loader.pack import Recipe, quantize_model
from loader.source import ModelConfig, SourceModel, SourceTensor
from runtime.numpy_backend import NumpyBackend

pytestmark = pytest.mark.slow

D, L, H, HKV, F = 64, 2, 4, 2, 128
IDS = [1, 17, 230, 5, 999, 42, 7, 3000]

# run in the llama-cpp-python interpreter: argv = weights .npz, GGUF path, tokenizer template GGUF, ids
WRITE_AND_RUN = r'''
import json, sys
import numpy as np
import gguf
import llama_cpp
npz, out, template, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
W = dict(np.load(npz))
meta = gguf.GGUFReader(template)
w = gguf.GGUFWriter(out, "llama")
D, L, H, HKV, F = (int(W["shape"][i]) for i in range(5))
w.add_context_length(256); w.add_embedding_length(D); w.add_block_count(L); w.add_feed_forward_length(F)
w.add_head_count(H); w.add_head_count_kv(HKV); w.add_layer_norm_rms_eps(1e-5)
w.add_rope_dimension_count(D // H); w.add_rope_freq_base(10000.0); w.add_file_type(0)
for f in meta.fields.values():              # the template's tokenizer, so llama.cpp loads the file
    if f.name.startswith("tokenizer.") and f.name != "tokenizer.chat_template":
        v = f.contents()
        w.add_key_value(f.name, v, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
for name, a in W.items():
    if name != "shape":
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
llm = llama_cpp.Llama(model_path=out, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[:len(ids)], np.float32).tolist()))
'''


def _model(V: int, seed: int = 21):
    """Our source model and the same arrays under their GGUF names (llama.cpp's llama layout)."""
    rng = np.random.default_rng(seed)
    hd = D // H

    def lin(n, k):
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    ours = {"output": (rng.standard_normal((V, D)) * 0.5).astype(np.float32),
            "norm": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)}
    gg = {"token_embd.weight": ours["output"], "output_norm.weight": ours["norm"]}
    for i in range(L):
        p, b = f"layers.{i}.", f"blk.{i}."
        t = {"attn_norm": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32), "wq": lin(H * hd, D),
             "wk": lin(HKV * hd, D), "wv": lin(HKV * hd, D), "wo": lin(D, H * hd),
             "ffn_norm": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32), "w_gate": lin(F, D),
             "w_up": lin(F, D), "w_down": lin(D, F),
             "bq": (0.5 * rng.standard_normal(H * hd)).astype(np.float32),
             "bk": (0.5 * rng.standard_normal(HKV * hd)).astype(np.float32),
             "bv": (0.5 * rng.standard_normal(HKV * hd)).astype(np.float32)}
        names = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
                 "wv": "attn_v.weight", "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
                 "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
                 "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
        for k, a in t.items():
            ours[p + k] = a
            gg[b + names[k]] = a
    cfg = ModelConfig(arch="llama", dim=D, n_layers=L, n_heads=H, n_kv_heads=HKV, ffn_dim=F, vocab_size=V,
                      max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0, rope_style="adjacent",
                      tied_embeddings=True)
    tensors = {n: SourceTensor(n, a.shape, (lambda a=a: a)) for n, a in ours.items()}
    tok = '{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}'
    return SourceModel(cfg, tensors, tok, "bias"), gg


def test_llama_bias_builder_matches_llama_cpp(tmp_path, default_gguf):
    from loader.gguf_reader import GGUFFile
    from tools.bench.peers import find_llama
    py, note = find_llama()
    if py is None:
        pytest.skip(note)
    V = len(GGUFFile(default_gguf).meta["tokenizer.ggml.tokens"])
    src, gg = _model(V)
    npz = tmp_path / "w.npz"
    np.savez(npz, shape=np.array([D, L, H, HKV, F]), **gg)
    r = subprocess.run([py, "-c", WRITE_AND_RUN, str(npz), str(tmp_path / "bias.gguf"), str(default_gguf),
                        json.dumps(IDS)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"llama.cpp run failed:\n{r.stderr[-3000:]}")
    want = np.array(json.loads(r.stdout.strip().splitlines()[-1]), np.float32)
    pm = quantize_model(src, Recipe(wbits=16))
    backends = [NumpyBackend()]
    try:
        from runtime.cpu import CpuBackend
        backends.append(CpuBackend(threads=2))
    except ImportError:
        pass
    for be in backends:
        dec = Decoder(pm, be, arch="llama_bias")
        got = dec.forward(IDS, dec.new_cache(), all_logits=True)
        print(f"{be.name}: max |ours - llama.cpp| {np.abs(got - want).max():.2e} of max |logit| {np.abs(want).max():.2f}")
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=be.name)
        assert (got.argmax(-1) == want.argmax(-1)).all()
        plain = Decoder(pm, be)         # the plain Llama builder ignores the biases: far from llama.cpp
        assert np.abs(plain.forward(IDS, plain.new_cache(), all_logits=True) - want).max() > 0.05 * np.abs(want).max()
