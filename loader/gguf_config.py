"""GGUF metadata and tensor names -> `ModelConfig` and internal names, per architecture.

Keys are llama.cpp's: `{arch}.attention.*`, `{arch}.rope.*`, `{arch}.final_logit_softcapping`. What a
key means is what llama.cpp does with it (llama.cpp is the producer and the oracle of these files):
- RoPE: llama GGUFs hold q/k rows permuted for adjacent pairs ("adjacent"); the converter leaves the other
  architectures in rotate-half order ("half", llama.cpp's NEOX rope type).
- `rope.scaling.type` linear (or absent) with `rope.scaling.factor` divides positions by the factor;
  `rope_freqs.weight` (Llama 3.x) divides each pair's angle by its factor; YaRN and LongRoPE are refused.
- Gemma 3: `attention.sliding_window` with `attention.sliding_window_pattern` (a number n: every n-th
  layer global, default 6; or one bool per layer, true = sliding), local layers on `rope.freq_base_swa`
  (default 10000) without scaling; norm weights are stored with the +1 already added; q is scaled by
  1/sqrt(head_dim), except on the 62-layer model (27B) by 1/sqrt(d / n_heads).
- Sliding windows of qwen2/qwen3/phi3 are ignored, as llama.cpp ignores them; a llama file's window
  (Mistral) applies to every layer.
"""
from __future__ import annotations

import math
import re

from loader.errors import FormatError
from loader.source import DECODERS, ModelConfig

NEOX = ("qwen2", "qwen3", "gemma3", "phi3")       # rotate-half RoPE in the file
# GGUF layer tensor -> internal name (".weight"/".bias" included)
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_output.bias": "bo", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "attn_post_norm", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
    "post_ffw_norm.weight": "ffn_post_norm"}
FUSED = {"attn_qkv.weight": ("wq", "wk", "wv"), "attn_qkv.bias": ("bq", "bk", "bv")}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+\.(?:weight|bias))$")


def _meta(g, key: str, kind, default=None, required=True):
    v = g.meta.get(key)
    if v is None:
        if required and default is None:
            raise FormatError(f"{g.path}: missing metadata {key!r}")
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise FormatError(f"{g.path}: metadata {key!r} should be an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise FormatError(f"{g.path}: metadata {key!r} should be a number, got {v!r}")
    return kind(v)


def check_architecture(g) -> str:
    """The file's architecture, or one FormatError naming what is unsupported."""
    arch = g.meta.get("general.architecture")
    if g.meta.get("general.type") == "mmproj" or arch == "clip":
        raise FormatError(f"{g.path}: multimodal projector files (mmproj) are not supported")
    if arch not in DECODERS:
        raise FormatError(f"{g.path}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(DECODERS)})")
    n_exp = g.meta.get(f"{arch}.expert_count", 0)
    if n_exp:
        raise FormatError(f"{g.path}: mixture-of-experts models are not supported ({arch}.expert_count = {n_exp})")
    return arch


def _rope(g, a: str, head_dim: int) -> dict:
    out = {"rope_theta": _meta(g, f"{a}.rope.freq_base", float, default=10000.0)}
    rot = _meta(g, f"{a}.rope.dimension_count", int, required=False)
    if rot is not None and rot != head_dim:
        if a == "llama":
            raise FormatError(f"{g.path}: {a}.rope.dimension_count {rot} differs from the head size {head_dim}")
        out["rope_dim"] = rot
    kind = g.meta.get(f"{a}.rope.scaling.type")
    factor = g.meta.get(f"{a}.rope.scaling.factor", g.meta.get(f"{a}.rope.scale_linear"))
    if kind not in (None, "none", "linear"):
        raise FormatError(f"{g.path}: RoPE scaling {kind!r} ({a}.rope.scaling.type) is not supported "
                          f"(none, linear and Llama 3 rope_freqs are)")
    if factor is not None and kind != "none":
        factor = _meta(g, f"{a}.rope.scaling.factor" if f"{a}.rope.scaling.factor" in g.meta
                       else f"{a}.rope.scale_linear", float)
        if factor not in (0.0, 1.0):         # llama.cpp reads 0 as "no scaling"
            if factor < 0:
                raise FormatError(f"{g.path}: {a}.rope.scaling.factor {factor} is negative")
            out.update(rope_scaling="linear", rope_scale=factor)
    if "rope_freqs.weight" in g.tensors:
        if a != "llama":
            raise FormatError(f"{g.path}: rope_freqs.weight in a {a!r} file is not supported")
        shape = g.tensors["rope_freqs.weight"][0]
        if shape != ((rot or head_dim) // 2,):
            raise FormatError(f"{g.path}: rope_freqs.weight has shape {shape}, expected ({head_dim // 2},)")
        out.update(rope_scaling="llama3" if out.get("rope_scaling", "none") == "none" else out["rope_scaling"],
                   rope_freq_factors=[float(v) for v in g.load("rope_freqs.weight")])
    for t in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if t in g.tensors:
            raise FormatError(f"{g.path}: LongRoPE ({t}) is not supported")
    return out


def _sliding(g, a: str, n_layers: int) -> dict:
    if a not in ("llama", "gemma3"):
        return {}                            # llama.cpp runs these without their window
    window = _meta(g, f"{a}.attention.sliding_window", int, required=False) or 0
    if window <= 0:
        return {}
    if a == "llama":
        return {"sliding_window": window, "swa_layers": list(range(n_layers))}
    pattern = g.meta.get(f"{a}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(b, (bool, int)) for b in pattern):
            raise FormatError(f"{g.path}: {a}.attention.sliding_window_pattern has {len(pattern)} entries, "
                              f"expected one bool per layer ({n_layers})")
        layers = [i for i, b in enumerate(pattern) if b]
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        # llama.cpp: layer i slides when i % n < n - 1 (every n-th layer global); n = 0: all slide
        layers = [i for i in range(n_layers) if pattern == 0 or i % pattern < pattern - 1]
    else:
        raise FormatError(f"{g.path}: {a}.attention.sliding_window_pattern {pattern!r} is not a layer count "
                          f"or a list of bools")
    return {"sliding_window": window, "swa_layers": layers,
            "rope_local_theta": _meta(g, f"{a}.rope.freq_base_swa", float, default=10000.0)}


def gguf_config(g, arch: str, tied: bool, vocab_size: int, tokenizer_fields: dict) -> ModelConfig:
    """ModelConfig of a GGUF file whose architecture passed `check_architecture`."""
    a = arch
    n_heads = _meta(g, f"{a}.attention.head_count", int)
    n_layers = _meta(g, f"{a}.block_count", int)
    dim = _meta(g, f"{a}.embedding_length", int)
    if any(isinstance(g.meta.get(f"{a}.{k}"), list) for k in ("attention.head_count_kv", "feed_forward_length")):
        raise FormatError(f"{g.path}: per-layer head counts or FFN sizes are not supported")
    head_dim = _meta(g, f"{a}.attention.key_length", int, required=False) or 0
    v_len = _meta(g, f"{a}.attention.value_length", int, required=False)
    hd = head_dim or (dim // n_heads if n_heads else 0)
    if v_len is not None and v_len != hd:
        raise FormatError(f"{g.path}: {a}.attention.value_length {v_len} differs from key_length {hd}")
    t = g.tensors
    opts = dict(qkv_bias="blk.0.attn_q.bias" in t or "blk.0.attn_qkv.bias" in t,
                o_bias="blk.0.attn_output.bias" in t, qk_norm=a in ("qwen3", "gemma3"))
    if a == "gemma3":
        attn_scale = (dim / n_heads) ** -0.5 if n_layers == 62 and n_heads else 0.0
        opts.update(post_norms=True, ffn_act="gelu_tanh", embed_scale=math.sqrt(dim), attn_scale=attn_scale,
                    logit_softcap=_meta(g, f"{a}.final_logit_softcapping", float, default=0.0))
    try:
        return ModelConfig(
            arch=a, dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=_meta(g, f"{a}.attention.head_count_kv", int, default=n_heads),
            ffn_dim=_meta(g, f"{a}.feed_forward_length", int), vocab_size=vocab_size,
            max_seq_len=_meta(g, f"{a}.context_length", int),
            norm_eps=_meta(g, f"{a}.attention.layer_norm_rms_epsilon", float),
            rope_style="half" if a in NEOX else "adjacent", tied_embeddings=tied, head_dim=head_dim,
            **_rope(g, a, hd), **_sliding(g, a, n_layers), **opts, **tokenizer_fields)
    except FormatError as e:
        raise FormatError(str(e) if str(e).startswith(g.path) else f"{g.path}: {e}") from None


def internal_names(name: str, shape: tuple, cfg: ModelConfig, path: str) -> list[tuple[str, slice | None]]:
    """GGUF tensor -> [(internal name, row slice or None)]: fused tensors (attn_qkv; phi3's gate|up in
    ffn_up) become several internal tensors, each a slice of the file's rows. [] for tensors consumed
    by the config (rope_freqs)."""
    if name == "token_embd.weight":
        return [("output" if cfg.tied_embeddings else "tok_embeddings", None)]
    if name == "output.weight":
        return [("output", None)]
    if name == "output_norm.weight":
        return [("norm", None)]
    if name == "rope_freqs.weight":
        return []
    m = _LAYER_RE.match(name)
    if m:
        p, leaf = f"layers.{m.group(1)}.", m.group(2)
        qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if leaf in FUSED:
            q, k, v = FUSED[leaf]
            return [(p + q, slice(0, qd)), (p + k, slice(qd, qd + kd)), (p + v, slice(qd + kd, qd + 2 * kd))]
        if leaf == "ffn_up.weight" and cfg.arch == "phi3" and shape[0] == 2 * cfg.ffn_dim:
            # gate first, then up (llama.cpp's swiglu on the fused rows: silu(first half) * second half)
            return [(p + "w_gate", slice(0, cfg.ffn_dim)), (p + "w_up", slice(cfg.ffn_dim, 2 * cfg.ffn_dim))]
        if leaf in LAYER_NAMES:
            return [(p + LAYER_NAMES[leaf], None)]
    raise FormatError(f"{path}: unexpected tensor {name!r} for a {cfg.arch} model")
