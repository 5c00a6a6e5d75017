"""What a reader hands to the packer and the engine: a config, named tensors, a tokenizer.

Tensors are lazy (`SourceTensor.load()`), because a 7B model does not fit in memory as float32.
Names follow docs/DESIGN.md ("internal tensor names").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from loader.errors import FormatError
from loader.validate import ARCHITECTURES, check_model_config  # noqa: F401  (ARCHITECTURES re-exported)

DECODERS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
ROPE_STYLES = ("adjacent", "half")
ROPE_SCALINGS = ("none", "linear", "llama3")
FFN_ACTS = ("silu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Everything a forward pass needs besides the tensors. The decoder options below all default to
    plain Llama, so configs written before they existed (packed directories) read back unchanged.

    RoPE of layer i: position p, pair j < rope_dim/2 turns by
        p / rope_scale / rope_freq_factors[j] * base ** (-2j / rope_dim)
    with base = rope_theta, except on a sliding layer when rope_local_theta > 0: base = rope_local_theta,
    and neither rope_scale nor rope_freq_factors apply there (Gemma 3's local layers).
    Dims rope_dim..head_dim of each head pass unrotated (partial rotary).
    A sliding layer (i in swa_layers) lets position p see keys p - sliding_window + 1 .. p.
    Norm weights are always multiplicative: sources that store (w - 1) (HF Gemma) are shifted at load.
    """
    arch: str                      # one of ARCHITECTURES
    dim: int                       # d
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int                   # F
    vocab_size: int
    max_seq_len: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_style: str = "half"       # "adjacent" (GGUF llama: q/k rows permuted) | "half" (rotate-half)
    tied_embeddings: bool = False
    head_dim: int = 0              # 0 -> dim // n_heads
    type_vocab_size: int = 0       # BERT
    pooling: str = "mean"          # BERT: "mean" | "cls"
    normalize: bool = True         # BERT: L2-normalise embeddings
    truncate_len: int = 0          # BERT: inputs are cut to this many tokens (0 -> max_seq_len)
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    # ---- decoder options (qwen2/qwen3/gemma3/phi3, Llama 3.x, Mistral) ----
    qkv_bias: bool = False         # layers.i.bq|bk|bv added after wq|wk|wv (Qwen2)
    o_bias: bool = False           # layers.i.bo added after wo
    qk_norm: bool = False          # per-head RMSNorm of q and k (layers.i.q_norm|k_norm, (head_dim,)), before RoPE
    post_norms: bool = False       # RMSNorm of the attention and FFN outputs before each residual add (Gemma 3)
    ffn_act: str = "silu"          # gate activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
    embed_scale: float = 1.0       # token embeddings are multiplied by this (Gemma: sqrt(d))
    attn_scale: float = 0.0        # q.k multiplier; 0 -> 1/sqrt(head_dim)
    logit_softcap: float = 0.0     # logits -> c * tanh(logits / c) when > 0
    rope_dim: int = 0              # rotated dims per head; 0 -> head_dim
    rope_scaling: str = "none"     # "none" | "linear" | "llama3" (how rope_scale / rope_freq_factors came about)
    rope_scale: float = 1.0        # linear scaling: positions are divided by it
    rope_freq_factors: list[float] | None = None   # per pair j: its angle is divided by this (Llama 3.x)
    rope_local_theta: float = 0.0  # RoPE base of sliding layers (Gemma 3: 10000); 0 -> as global layers
    sliding_window: int = 0        # window of the sliding layers (0: none)
    swa_layers: list[int] = field(default_factory=list)   # indices of the sliding-window layers

    def __post_init__(self):
        # types, ranges (finite, positive epsilon and RoPE base) and relations: loader/validate.py
        check_model_config(self.__dict__)
        if self.rope_scaling not in ROPE_SCALINGS:
            raise FormatError(f"unknown rope_scaling {self.rope_scaling!r}; supported: {', '.join(ROPE_SCALINGS)}")
        if self.ffn_act not in FFN_ACTS:
            raise FormatError(f"unknown ffn_act {self.ffn_act!r}; supported: {', '.join(FFN_ACTS)}")
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.rope_dim == 0:
            self.rope_dim = self.head_dim
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise FormatError(f"model config: rope_dim {self.rope_dim} must be even and at most head_dim "
                              f"{self.head_dim}")
        if self.rope_dim != self.head_dim and self.rope_style == "adjacent":
            raise FormatError("model config: partial rotary with adjacent-pair RoPE is not supported")
        if not self.rope_scale > 0:
            raise FormatError(f"model config: rope_scale must be positive, got {self.rope_scale}")
        if self.rope_freq_factors is not None:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.rope_freq_factors):
                raise FormatError("model config: rope_freq_factors must be a list of numbers")
            f = [float(v) for v in self.rope_freq_factors]
            if len(f) != self.rope_dim // 2 or not all(0 < v < float("inf") for v in f):
                raise FormatError(f"model config: rope_freq_factors needs {self.rope_dim // 2} positive values, "
                                  f"got {len(f)}")
            self.rope_freq_factors = f
        if self.sliding_window < 0 or (self.swa_layers and self.sliding_window == 0):
            raise FormatError(f"model config: sliding_window {self.sliding_window} with sliding layers "
                              f"{self.swa_layers}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.swa_layers):
            raise FormatError(f"model config: swa_layers must be a list of layer indices, got {self.swa_layers!r:.60}")
        self.swa_layers = sorted(self.swa_layers)
        if any(not 0 <= i < self.n_layers for i in self.swa_layers):
            raise FormatError(f"model config: swa_layers {self.swa_layers} outside 0..{self.n_layers - 1}")
        if self.attn_scale < 0 or self.logit_softcap < 0 or self.embed_scale <= 0:
            raise FormatError("model config: attn_scale, logit_softcap must be >= 0 and embed_scale > 0")

    # ---- per-layer views for the forward builders ----
    def layer_window(self, i: int) -> int:
        """Sliding window of layer i (0: full causal attention)."""
        return self.sliding_window if i in self.swa_layers else 0

    def layer_rope(self, i: int) -> tuple[float, float, list[float] | None]:
        """(base, linear scale, frequency factors or None) of layer i's RoPE."""
        if self.rope_local_theta > 0 and i in self.swa_layers:
            return self.rope_local_theta, 1.0, None
        return self.rope_theta, self.rope_scale, self.rope_freq_factors

    @property
    def q_scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    def extras(self) -> list[str]:
        """The options this config uses beyond the plain Llama forward (empty for SmolLM2-style models):
        what a runtime without them must refuse rather than compute wrongly."""
        out = [] if self.arch in ("llama", "bert") else [f"architecture {self.arch!r}"]
        defaults = {"qkv_bias": False, "o_bias": False, "qk_norm": False, "post_norms": False, "ffn_act": "silu",
                    "embed_scale": 1.0, "attn_scale": 0.0, "logit_softcap": 0.0, "rope_scaling": "none",
                    "rope_scale": 1.0, "rope_freq_factors": None, "sliding_window": 0}
        for k, v in defaults.items():
            if getattr(self, k) != v:
                out.append(f"{k}={getattr(self, k)!r}" if k != "rope_freq_factors" else "rope_freq_factors")
        if self.rope_dim != self.head_dim:
            out.append(f"partial rotary ({self.rope_dim} of {self.head_dim} dims)")
        return out

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every internal tensor name of docs/DESIGN.md with its shape, for a config: readers check
    sources against it, so a missing or misshapen tensor is caught before anything is computed."""
    d, F, hd = c.dim, c.ffn_dim, c.head_dim
    if c.arch == "bert":
        e = {"tok_embeddings": (c.vocab_size, d), "pos_embeddings": (c.max_seq_len, d),
             "type_embeddings": (c.type_vocab_size, d), "emb_norm.weight": (d,), "emb_norm.bias": (d,)}
        for i in range(c.n_layers):
            p = f"layers.{i}."
            for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv"), ("wo", "bo")):
                e[p + w], e[p + b] = (d, d), (d,)
            e.update({p + "attn_norm.weight": (d,), p + "attn_norm.bias": (d,), p + "w_in": (F, d),
                      p + "b_in": (F,), p + "w_out": (d, F), p + "b_out": (d,), p + "ffn_norm.weight": (d,),
                      p + "ffn_norm.bias": (d,)})
        return e
    e = {"output": (c.vocab_size, d), "norm": (d,)}
    if not c.tied_embeddings:
        e["tok_embeddings"] = (c.vocab_size, d)
    qd, kd = c.n_heads * hd, c.n_kv_heads * hd
    for i in range(c.n_layers):
        p = f"layers.{i}."
        e.update({p + "attn_norm": (d,), p + "wq": (qd, d), p + "wk": (kd, d), p + "wv": (kd, d),
                  p + "wo": (d, qd), p + "ffn_norm": (d,), p + "w_gate": (F, d), p + "w_up": (F, d),
                  p + "w_down": (d, F)})
        if c.qkv_bias:
            e.update({p + "bq": (qd,), p + "bk": (kd,), p + "bv": (kd,)})
        if c.o_bias:
            e[p + "bo"] = (d,)
        if c.qk_norm:
            e.update({p + "q_norm": (hd,), p + "k_norm": (hd,)})
        if c.post_norms:
            e.update({p + "attn_post_norm": (d,), p + "ffn_post_norm": (d,)})
    return e


def finite(a: np.ndarray, where: str) -> np.ndarray:
    """a, after checking that every value is finite: NaN or Inf weights run and print garbage, so a
    source tensor is checked once, when it is loaded to be packed (the cost of one pass over it)."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise FormatError(f"{where}: {bad} of {a.size} values are NaN or infinite")
    return a


@dataclass
class SourceTensor:
    """One tensor of a source file. `load()` returns float32 in the internal (N, K) orientation.

    `ggml_type` is set for GGUF tensors; `blocks()` then returns the raw block fields for exact import:
    for Q4_0 / Q8_0 `(d, q)`, for Q4_1 `(d, m, q)`, with d, m float32 (N, K//32) and q int (N, K)
    (Q4_x: 0..15 unsigned; Q8_0: -128..127 signed).
    `raw()`, where set, returns the tensor's stored bytes as uint8 (rows, bytes per row), a view of the
    mapped file: the packer's C loops read GGUF blocks from it directly (loader/pack_ops.py).
    """
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    ggml_type: str | None = None
    blocks: Callable[[], tuple] | None = None
    raw: Callable[[], np.ndarray] | None = None


@dataclass
class SourceModel:
    config: ModelConfig
    tensors: dict[str, SourceTensor]
    tokenizer_json: str            # serialized tokenizers.Tokenizer (JSON text)
    source: str = ""               # path, for messages

    def __getitem__(self, name: str) -> SourceTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.source}: missing tensor {name!r}") from None
