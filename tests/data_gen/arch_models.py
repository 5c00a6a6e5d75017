"""Random-weight models of every supported decoder architecture, as GGUF files (llama.cpp's metadata keys
and tensor names, loadable by llama.cpp) and as Hugging Face directories holding the same model.

CASES names each variant: llama3 (rope_freqs.weight / rope_scaling llama3), llama_linear (linear RoPE
scaling), mistral (sliding window on every layer), qwen2 (q/k/v biases, untied output), qwen3 (per-head
q/k norms, head_dim != d / heads), gemma3 (GeGLU, four norms per layer, 5 local layers then a global one,
two RoPE bases, sqrt(d) embedding scale, logit soft-cap), phi3 (fused qkv and gate|up, partial rotary).
Small dims (d = 64), the byte-level BPE vocabulary of tiny_models.

The HF directory is derived from the GGUF weights the way llama.cpp's converter relates them, inverted:
llama q/k rows un-permuted (GGUF pairs rows (2j, 2j+1) of a head, HF rows (j, j + hd/2)), Gemma norms
stored as w - 1, Phi-3 q|k|v and gate|up fused. A reader that gets any of that wrong gives different
logits for the two sources.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tests.data_gen.tiny_models import CHAT_TEMPLATE, _save, _tokenizer_json_bpe, tiny_vocab

DIM, HEADS, KV_HEADS, FFN = 64, 4, 2, 128
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "llama3": dict(arch="llama", layers=2, base=10000.0, llama3=True),
    "llama_linear": dict(arch="llama", layers=2, base=10000.0, linear=4.0, tied=False),
    "mistral": dict(arch="llama", layers=2, base=10000.0, window=64, tied=False),
    "qwen2": dict(arch="qwen2", layers=2, base=1000000.0, bias=True, tied=False),
    "qwen3": dict(arch="qwen3", layers=2, base=1000000.0, head_dim=32, qk_norm=True),
    "gemma3": dict(arch="gemma3", layers=6, base=1000000.0, qk_norm=True, window=6, softcap=15.0),
    "phi3": dict(arch="phi3", layers=2, base=10000.0, rope_dim=8, tied=False),
}


def llama3_divisors(hd: int, base: float, p: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling, element by element as Meta's reference writes it."""
    low_wl = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wl = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for j in range(hd // 2):
        freq = 1.0 / base ** (2 * j / hd)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            new = freq
        elif wavelen > low_wl:
            new = freq / p["factor"]
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            new = (1 - smooth) * freq / p["factor"] + smooth * freq
        out.append(freq / new)
    return np.array(out, np.float32)


def case_weights(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights of case `name` in NumPy (N, K) orientation (phi3: fused)."""
    c = CASES[name]
    rng = np.random.default_rng(seed)
    V = len(tiny_vocab()[0])
    hd = c.get("head_dim", DIM // HEADS)
    qd, kd = HEADS * hd, KV_HEADS * hd

    def mat(n, k, s=0.08):
        return (s * rng.standard_normal((n, k))).astype(np.float32)

    def norm(n):
        return (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    # scales chosen so that every option moves the logits: attention sharp enough for RoPE details to
    # matter, layer outputs comparable to the embedding (a tied table otherwise just predicts its input)
    w = {"token_embd.weight": (0.5 * rng.standard_normal((V, DIM))).astype(np.float32),
         "output_norm.weight": norm(DIM)}
    if not c.get("tied", True):
        w["output.weight"] = mat(V, DIM, 0.5)
    if c.get("llama3"):
        w["rope_freqs.weight"] = llama3_divisors(hd, c["base"], LLAMA3)
    for i in range(c["layers"]):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"], w[p + "ffn_norm.weight"] = norm(DIM), norm(DIM)
        if c["arch"] == "phi3":
            w[p + "attn_qkv.weight"] = np.concatenate([mat(qd + kd, DIM, 0.4), mat(kd, DIM, 0.2)])
            w[p + "ffn_up.weight"] = mat(2 * FFN, DIM, 0.15)
        else:
            w[p + "attn_q.weight"], w[p + "attn_k.weight"] = mat(qd, DIM, 0.4), mat(kd, DIM, 0.4)
            w[p + "attn_v.weight"] = mat(kd, DIM, 0.2)
            w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"] = mat(FFN, DIM, 0.15), mat(FFN, DIM, 0.15)
        w[p + "attn_output.weight"], w[p + "ffn_down.weight"] = mat(DIM, qd, 0.2), mat(DIM, FFN, 0.15)
        if c.get("bias"):
            for t, n in (("attn_q", qd), ("attn_k", kd), ("attn_v", kd)):
                w[p + t + ".bias"] = (0.3 * rng.standard_normal(n)).astype(np.float32)
        if c.get("qk_norm"):
            # normed q and k have unit rms: weights near 2 keep attention sharp, so RoPE bases matter
            w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"] = 2 * norm(hd), 2 * norm(hd)
        if c["arch"] == "gemma3":
            w[p + "post_attention_norm.weight"], w[p + "post_ffw_norm.weight"] = norm(DIM), norm(DIM)
    return w


def write_arch_gguf(path, name: str, seed: int = 0, ggml_type: str = "F32", extra_meta: dict | None = None,
                    drop_meta=()) -> dict[str, np.ndarray]:
    """Write case `name` as a GGUF file (matrices in `ggml_type`, vectors F32); returns its weights."""
    import gguf
    from gguf import GGMLQuantizationType as T

    c = CASES[name]
    a = c["arch"]
    hd = c.get("head_dim", DIM // HEADS)
    tokens, ttypes, merges = tiny_vocab()
    weights = case_weights(name, seed)
    w = gguf.GGUFWriter(str(path), a)
    meta = {f"{a}.block_count": c["layers"], f"{a}.context_length": 256, f"{a}.embedding_length": DIM,
            f"{a}.feed_forward_length": FFN, f"{a}.attention.head_count": HEADS,
            f"{a}.attention.head_count_kv": KV_HEADS, f"{a}.rope.freq_base": c["base"],
            f"{a}.attention.layer_norm_rms_epsilon": 1e-5, f"{a}.rope.dimension_count": c.get("rope_dim", hd)}
    if "head_dim" in c or a == "gemma3":
        meta[f"{a}.attention.key_length"] = meta[f"{a}.attention.value_length"] = hd
    if c.get("linear"):
        meta[f"{a}.rope.scaling.type"], meta[f"{a}.rope.scaling.factor"] = "linear", c["linear"]
    if c.get("window"):
        meta[f"{a}.attention.sliding_window"] = c["window"]
    if c.get("softcap"):
        meta[f"{a}.final_logit_softcapping"] = c["softcap"]
    meta.update(extra_meta or {})
    for k, v in meta.items():
        if k in drop_meta:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for tname, arr in weights.items():
        t = "F32" if arr.ndim == 1 else ggml_type
        q = gguf.quants.quantize(arr, T[t])
        w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=T[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF llama q/k rows -> HF rows: GGUF row 2j + e of a head is HF row e * hd/2 + j."""
    n, k = w.shape
    hd = n // n_heads
    return w.reshape(n_heads, hd // 2, 2, k).transpose(0, 2, 1, 3).reshape(n, k)


_HF_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
             "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
             "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
             "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
             "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
             "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
             "attn_qkv.weight": "self_attn.qkv_proj.weight"}
_HF_GEMMA = dict(_HF_LAYER, **{"post_attention_norm.weight": "post_attention_layernorm.weight",
                               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"})


def hf_weights(name: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    c = CASES[name]
    table = _HF_GEMMA if c["arch"] == "gemma3" else _HF_LAYER
    out = {}
    for k, v in weights.items():
        if k == "rope_freqs.weight":
            continue                                   # HF computes it from rope_scaling
        if c["arch"] == "gemma3" and k.endswith("norm.weight"):
            v = v - np.float32(1.0)                    # HF Gemma norms multiply by (1 + w)
        if k == "token_embd.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "output.weight":
            out["lm_head.weight"] = v
        elif k == "output_norm.weight":
            out["model.norm.weight"] = v
        else:
            _blk, i, leaf = k.split(".", 2)
            if c["arch"] == "llama" and leaf in ("attn_q.weight", "attn_k.weight"):
                v = unpermute_rows(v, HEADS if leaf == "attn_q.weight" else KV_HEADS)
            if c["arch"] == "phi3" and leaf == "ffn_up.weight":
                leaf = "gate_up"
            out[f"model.layers.{i}." + ("mlp.gate_up_proj.weight" if leaf == "gate_up" else table[leaf])] = v
    return out


def write_arch_hf(directory, name: str, seed: int = 0, **cfg_over) -> dict[str, np.ndarray]:
    """Write case `name` as an HF directory (the same model as write_arch_gguf with the same seed)."""
    c = CASES[name]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    hd = c.get("head_dim", DIM // HEADS)
    weights = hf_weights(name, case_weights(name, seed))
    mtype = {"llama": "mistral" if c.get("window") else "llama", "gemma3": "gemma3_text"}.get(c["arch"], c["arch"])
    cfg = {"model_type": mtype, "hidden_size": DIM, "num_hidden_layers": c["layers"], "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "intermediate_size": FFN, "vocab_size": len(tiny_vocab()[0]),
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": c["base"],
           "tie_word_embeddings": c.get("tied", True), "bos_token_id": 1, "eos_token_id": 0,
           "hidden_act": "gelu_pytorch_tanh" if c["arch"] == "gemma3" else "silu"}
    if "head_dim" in c or c["arch"] == "gemma3":
        cfg["head_dim"] = hd
    if c.get("llama3"):
        cfg["rope_scaling"] = dict(LLAMA3, rope_type="llama3")
    if c.get("linear"):
        cfg["rope_scaling"] = {"type": "linear", "factor": c["linear"]}
    if c.get("window"):
        cfg["sliding_window"] = c["window"]
    if c["arch"] == "gemma3":
        cfg.update(query_pre_attn_scalar=hd, final_logit_softcapping=c.get("softcap"), sliding_window_pattern=6,
                   rope_local_base_freq=10000.0)
    if c.get("rope_dim"):
        cfg["partial_rotary_factor"] = c["rope_dim"] / hd
    cfg.update(cfg_over)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text(_tokenizer_json_bpe())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    _save(weights, d, 1, "F32")
    return weights
