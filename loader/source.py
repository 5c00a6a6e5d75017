"""What a reader hands to the packer and the engine: a config, named tensors, a tokenizer.

Tensors are lazy (`SourceTensor.load()`), because a 7B model does not fit in memory as float32.
Names follow docs/DESIGN.md ("internal tensor names").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from loader.errors import FormatError
from loader.validate import check_model_config

ARCHITECTURES = ("llama", "bert")
ROPE_STYLES = ("adjacent", "half")


@dataclass
class ModelConfig:
    arch: str                      # "llama" | "bert"
    dim: int                       # d
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int                   # F
    vocab_size: int
    max_seq_len: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_style: str = "half"       # "adjacent" (GGUF) | "half" (HF)
    tied_embeddings: bool = False
    head_dim: int = 0              # 0 -> dim // n_heads
    type_vocab_size: int = 0       # BERT
    pooling: str = "mean"          # BERT: "mean" | "cls"
    normalize: bool = True         # BERT: L2-normalise embeddings
    truncate_len: int = 0          # BERT: inputs are cut to this many tokens (0 -> max_seq_len)
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None

    def __post_init__(self):
        # types, ranges (finite, positive epsilon and RoPE base) and relations: loader/validate.py
        check_model_config(self.__dict__)
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads

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
    for i in range(c.n_layers):
        p = f"layers.{i}."
        e.update({p + "attn_norm": (d,), p + "wq": (c.n_heads * hd, d), p + "wk": (c.n_kv_heads * hd, d),
                  p + "wv": (c.n_kv_heads * hd, d), p + "wo": (d, c.n_heads * hd), p + "ffn_norm": (d,),
                  p + "w_gate": (F, d), p + "w_up": (F, d), p + "w_down": (d, F)})
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
