"""Hugging Face decoder directories: config.json and tensor names -> `ModelConfig` and internal names.

model_type llama, mistral, qwen2, qwen3, gemma3_text, phi3. All use rotate-half RoPE ("half") in HF
order. What each field means is what transformers' modeling code does with it:
- `rope_scaling` linear: positions divided by `factor`; llama3: each frequency divided by a factor from
  (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), computed here into
  `rope_freq_factors` (the same numbers llama.cpp's converter stores as rope_freqs.weight).
- Gemma 3 stores RMSNorm weights as w - 1 (the norm multiplies by 1 + w): the loader adds the 1, so
  internal norms are plain. Its local layers (`layer_types` or every `sliding_window_pattern`-th layer
  global) use `rope_local_base_freq` without scaling; q.k is scaled by query_pre_attn_scalar ** -0.5.
- Phi-3 fuses q|k|v (qkv_proj) and gate|up (gate_up_proj): split by rows at load.
- Qwen2/Qwen3/Phi-3 windows are not applied (llama.cpp does not apply them either); a Qwen config that
  asks for its window (`use_sliding_window`) is refused.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from loader.errors import FormatError
from loader.source import ModelConfig

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
MULTIMODAL_TYPES = ("gemma3", "qwen2_vl", "qwen2_5_vl", "llava", "mllama", "phi3_v", "mistral3")
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
         "phi3": "phi3"}
_LAYER = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
          "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo", "self_attn.q_proj.bias": "bq",
          "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv", "self_attn.o_proj.bias": "bo",
          "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
          "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "w_gate",
          "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down"}
# Gemma 3 has four norms per layer: its post_attention_layernorm follows the attention
_GEMMA_LAYER = dict(_LAYER, **{"post_attention_layernorm.weight": "attn_post_norm",
                               "pre_feedforward_layernorm.weight": "ffn_norm",
                               "post_feedforward_layernorm.weight": "ffn_post_norm"})
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")
NORMS = ("attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm", "q_norm", "k_norm", "norm")


def llama3_freq_factors(head_dim: int, base: float, factor: float, low: float, high: float, orig: int) -> list[float]:
    """Per-frequency divisors of Llama 3.x RoPE scaling: long wavelengths (beyond orig / low) are slowed by
    `factor`, short ones (below orig / high) kept, and those between blended linearly in orig / wavelength."""
    if not (factor > 0 and high > low > 0 and orig > 0):
        raise FormatError(f"llama3 rope_scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
                          f"original_max_position_embeddings > 0 (got {factor}, {low}, {high}, {orig})")
    inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    # smooth = 1: frequency kept; 0: divided by factor; the new frequency is the blend of the two
    return [float(v) for v in 1.0 / ((1 - smooth) / factor + smooth)]


def _rope_scaling(cfg: dict, p: Path, rot: int, base: float) -> dict:
    rs = cfg.get("rope_scaling")
    if not rs:
        return {}
    if not isinstance(rs, dict):
        raise FormatError(f"{p}: rope_scaling {rs!r} is not an object")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return {}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_scale": float(rs["factor"])}
    if kind == "llama3":
        try:
            f = llama3_freq_factors(rot, base, float(rs["factor"]), float(rs["low_freq_factor"]),
                                    float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
        except KeyError as e:
            raise FormatError(f"{p}: llama3 rope_scaling lacks {e.args[0]!r}") from None
        return {"rope_scaling": "llama3", "rope_freq_factors": f}
    raise FormatError(f"{p}: rope_scaling type {kind!r} is not supported (linear and llama3 are)")


def _get(cfg: dict, key: str, p: Path):
    v = cfg.get(key)
    if v is None:
        raise FormatError(f"{p}: config.json lacks {key!r}")
    return v


def check_model_type(cfg: dict, p: Path) -> str:
    mtype = cfg.get("model_type")
    if mtype in MULTIMODAL_TYPES or "vision_config" in cfg:
        raise FormatError(f"{p}: multimodal model_type {mtype!r} is not supported (a text-only checkpoint is)")
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        raise FormatError(f"{p}: mixture-of-experts models are not supported")
    return mtype


def hf_decoder_config(cfg: dict, p: Path, names: set, special: dict) -> ModelConfig:
    """ModelConfig of a decoder config.json (model_type in DECODER_TYPES); `special` holds bos/eos/template."""
    mtype = cfg["model_type"]
    arch = _ARCH[mtype]
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    want_act = "gelu_pytorch_tanh" if arch == "gemma3" else "silu"
    if act != want_act and not (arch == "gemma3" and act == "gelu_tanh"):
        raise FormatError(f"{p}: hidden_act {act!r} is not supported ({mtype} uses {want_act})")
    if cfg.get("mlp_bias"):
        raise FormatError(f"{p}: mlp_bias is not supported")
    if cfg.get("use_sliding_window"):
        raise FormatError(f"{p}: use_sliding_window (Qwen windowed layers) is not supported")
    if cfg.get("attn_logit_softcapping"):
        raise FormatError(f"{p}: attn_logit_softcapping is not supported")
    n_heads, dim = _get(cfg, "num_attention_heads", p), _get(cfg, "hidden_size", p)
    n_layers = _get(cfg, "num_hidden_layers", p)
    hd = cfg.get("head_dim") or dim // n_heads
    rot = hd
    if cfg.get("partial_rotary_factor") not in (None, 1, 1.0):
        rot = int(hd * float(cfg["partial_rotary_factor"]))
        if arch == "llama":
            raise FormatError(f"{p}: partial_rotary_factor is not supported for {mtype}")
    theta = float(cfg.get("rope_theta", 10000.0))
    opts = dict(rope_theta=theta, rope_dim=rot, **_rope_scaling(cfg, p, rot, theta))
    bias = bool(cfg.get("attention_bias"))
    opts.update(qkv_bias=bias or arch == "qwen2", o_bias=bias, qk_norm=arch in ("qwen3", "gemma3"))
    window = cfg.get("sliding_window") or 0
    if mtype == "mistral" and window:
        opts.update(sliding_window=int(window), swa_layers=list(range(n_layers)))
    if arch == "gemma3":
        types = cfg.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or len(types) != n_layers:
                raise FormatError(f"{p}: layer_types must list {n_layers} layer kinds")
            swa = [i for i, t in enumerate(types) if t == "sliding_attention"]
        else:
            n = int(cfg.get("sliding_window_pattern", 6))
            swa = [i for i in range(n_layers) if n == 0 or (i + 1) % n]
        if window:
            opts.update(sliding_window=int(window), swa_layers=swa,
                        rope_local_theta=float(cfg.get("rope_local_base_freq", 10000.0)))
        opts.update(post_norms=True, ffn_act="gelu_tanh", embed_scale=math.sqrt(dim),
                    attn_scale=float(cfg.get("query_pre_attn_scalar") or hd) ** -0.5,
                    logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0))
    # tied when the config says so or when there is no separate output matrix
    tied = bool(cfg.get("tie_word_embeddings", arch == "gemma3")) or "lm_head.weight" not in names
    return ModelConfig(
        arch=arch, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, ffn_dim=_get(cfg, "intermediate_size", p),
        vocab_size=_get(cfg, "vocab_size", p), max_seq_len=_get(cfg, "max_position_embeddings", p),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_style="half", tied_embeddings=tied,
        head_dim=cfg.get("head_dim") or 0, **opts, **special)


def hf_internal_names(name: str, c: ModelConfig) -> list[tuple[str, slice | None]] | None:
    """HF tensor -> [(internal name, row slice or None)]; None: not used (tied lm_head, buffers);
    []: unknown to this architecture."""
    if name == "model.embed_tokens.weight":
        return [("output" if c.tied_embeddings else "tok_embeddings", None)]
    if name == "lm_head.weight":
        return None if c.tied_embeddings else [("output", None)]
    if name == "model.norm.weight":
        return [("norm", None)]
    m = _LAYER_RE.match(name)
    if not m:
        return []
    p, leaf = f"layers.{m.group(1)}.", m.group(2)
    if leaf.endswith("rotary_emb.inv_freq"):
        return None
    qd, kd, F = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
    if c.arch == "phi3" and leaf == "self_attn.qkv_proj.weight":
        return [(p + "wq", slice(0, qd)), (p + "wk", slice(qd, qd + kd)), (p + "wv", slice(qd + kd, qd + 2 * kd))]
    if c.arch == "phi3" and leaf == "mlp.gate_up_proj.weight":
        return [(p + "w_gate", slice(0, F)), (p + "w_up", slice(F, 2 * F))]
    table = _GEMMA_LAYER if c.arch == "gemma3" else _LAYER
    return [(p + table[leaf], None)] if leaf in table else []


def norm_shift(c: ModelConfig, internal: str) -> float:
    """What the loader adds to a norm weight: 1 for Gemma's (1 + w) norms, else 0."""
    return 1.0 if c.arch == "gemma3" and internal.rsplit(".", 1)[-1] in NORMS else 0.0
