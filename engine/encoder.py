"""BERT-family encoder (post-LN BERT, e.g. all-MiniLM-L6-v2) on packed weights, through a backend.

The model: token + position + type embeddings -> LayerNorm -> n_layers x [bidirectional self-attention,
residual, LayerNorm, GELU MLP, residual, LayerNorm] -> pooling (mean over real tokens, or [CLS]) ->
optional L2 normalisation. Tensor names are the internal BERT names of docs/DESIGN.md.

Padding: the sequences of a batch are concatenated token by token ("varlen" layout) instead of being
padded to a rectangle. Every per-token op (linears, norms, GELU) then runs on real tokens only, and
attention runs per sequence with a key mask that covers exactly that sequence's tokens. No pad token is
ever computed, so an embedding cannot depend on what else is in its batch.

The forward pass is a graph (engine/archs/bert.py) that the backend compiles (engine/graph.py). Linears
are whatever the packed model holds: a `PackedLinear` (wbits < 16) runs on the backend with the
requested activation precision; a float32 (N, K) array as a float product. Float weights with abits < 16
simulate activation quantization in NumPy (same per-token/per-group rule as the backends), so that
"A8 only" can be measured too.
"""
from __future__ import annotations

import numpy as np

from engine.archs import BUILDERS
from engine.decoder import Linear, compile_graph
from engine.graph import Step
from loader.bipolar import PackedLinear
from loader.errors import FormatError
from loader.precision import check_bits

_LINEARS = (("wq", "bq"), ("wk", "bk"), ("wv", "bv"), ("wo", "bo"), ("w_in", "b_in"), ("w_out", "b_out"))


class _Embedding:
    """Token + position (+ token type 0) rows: the graph's embed op for BERT."""

    def __init__(self, tok, pos, typ):
        self.tok, self.pos, self.typ = tok, pos, typ

    def rows(self, ids, pos) -> np.ndarray:
        x = self.tok[ids] + self.pos[pos]
        if self.typ is not None:
            x += self.typ[0]          # single-segment input: token type 0 everywhere
        return x


class _Sequence:
    """Marks the rows of one sequence in a step (engine.graph.Step.caches: attention stays inside it)."""


class Encoder:
    """A BERT encoder bound to one backend and one activation precision: the graph of
    engine/archs/bert.py, compiled by the backend.

    `tensors` maps internal names to float32 arrays or `PackedLinear`s (a `PackedModel.tensors`).
    """

    def __init__(self, config, tensors: dict, backend, *, abits: int = 16, agroup: int | str | None = None,
                 interpret: bool = False):
        if config.arch != "bert":
            raise FormatError(f"the encoder runs BERT models; this model's architecture is {config.arch!r}")
        if config.pooling not in ("mean", "cls"):
            raise FormatError(f"unknown pooling {config.pooling!r}; supported: mean, cls")
        if not (agroup is None or agroup == "token" or (isinstance(agroup, int) and agroup > 0 and agroup % 32 == 0)):
            raise ValueError(f"agroup must be a positive multiple of 32, 'token' or None, got {agroup!r}")
        check_bits(abits, "abits")
        self.config = config
        self.backend = backend
        self.abits = int(abits)
        self.agroup = agroup
        self.dim = int(config.dim)
        self.n_heads = int(config.n_heads)
        self.head_dim = int(config.head_dim or config.dim // config.n_heads)
        self.eps = float(config.norm_eps)

        def get(name: str) -> np.ndarray:
            if name not in tensors:
                raise FormatError(f"BERT model is missing tensor {name!r}")
            t = tensors[name]
            if isinstance(t, PackedLinear):
                raise FormatError(f"tensor {name!r} is packed but the encoder needs it in float")
            return np.ascontiguousarray(t, dtype=np.float32)

        tok_emb, pos_emb = get("tok_embeddings"), get("pos_embeddings")
        for name, t in (("tok_embeddings", tok_emb), ("pos_embeddings", pos_emb)):
            if t.ndim != 2 or t.shape[1] != self.dim:
                raise FormatError(f"{name} has shape {t.shape}, expected (*, {self.dim})")
        # a model without token types (type_vocab_size 0) simply adds nothing
        W = {"emb": _Embedding(tok_emb, pos_emb, get("type_embeddings") if "type_embeddings" in tensors else None),
             "emb_norm.weight": get("emb_norm.weight"), "emb_norm.bias": get("emb_norm.bias")}
        self.n_tokens = tok_emb.shape[0]
        # positions beyond the table cannot be embedded, whatever the config says
        self.max_len = min(int(config.truncate_len or config.max_seq_len), pos_emb.shape[0])

        self.layers = []                # per layer: {name: Linear}, as the graph's weight table holds them
        for i in range(int(config.n_layers)):
            p = f"layers.{i}."
            layer = {}
            for wname, bname in _LINEARS:
                if p + wname not in tensors:
                    raise FormatError(f"BERT model is missing tensor {p + wname!r}")
                layer[wname] = W[p + wname] = self._prepare(tensors[p + wname], p + wname)
                if p + bname in tensors:
                    W[p + bname] = get(p + bname)
            for norm in ("attn_norm", "ffn_norm"):
                for part in ("weight", "bias"):
                    W[f"{p}{norm}.{part}"] = get(f"{p}{norm}.{part}")
            self.layers.append(layer)
        self.graph = BUILDERS["bert"](config, W)
        self.program = compile_graph(self.graph, backend, interpret)

    def _prepare(self, w, name: str) -> Linear:
        if isinstance(w, PackedLinear):
            return Linear(self.backend, w, self.abits, self.agroup)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise FormatError(f"linear {name!r} must be 2-D, got shape {w.shape}")
        lin = Linear(self.backend, w, self.abits, None)
        if self.abits != 16:        # float weights with abits < 16: quantize-dequantize the inputs
            K = w.shape[1]
            if self.agroup in (None, "token"):
                group = -(-K // 32) * 32 if self.agroup == "token" else min(128, -(-K // 32) * 32)
            else:
                group = int(self.agroup)
            lin.act_quant = (self.abits, group)
        return lin

    def close(self) -> None:
        self.program.close()

    # ---- forward -------------------------------------------------------------------------------

    def hidden_states(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Last hidden states of the concatenated sequences: (M, d), plus starts and lengths."""
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        if (lens == 0).any():
            raise ValueError("cannot encode an empty token sequence (the tokenizer adds [CLS]/[SEP])")
        if (lens > self.max_len).any():
            raise ValueError(f"sequence of {lens.max()} tokens exceeds the model's maximum {self.max_len}")
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lens.sum()))
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_tokens):
            raise ValueError(f"token id out of range 0..{self.n_tokens - 1}")
        positions = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
        marks = [m for m, n in zip([_Sequence() for _ in seqs], lens) for _ in range(n)]
        x = self.program.run(Step(ids, positions, marks, np.arange(ids.size, dtype=np.int32)))
        return x, starts, lens

    def pool(self, x: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Pool per sequence (mean over its real tokens, or its first token), then L2-normalise."""
        if self.config.pooling == "cls":
            out = x[starts].astype(np.float64)
        else:
            # reduceat sums each sequence's contiguous slice; float64 keeps the mean of long inputs exact
            out = np.add.reduceat(x.astype(np.float64), starts, axis=0) / lens[:, None]
        if self.config.normalize:
            norm = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.maximum(norm, 1e-12)
        return out.astype(np.float32)

    def encode(self, seqs: list[list[int]]) -> np.ndarray:
        """Embeddings (len(seqs), d) float32 of token-id sequences (already with [CLS]/[SEP])."""
        if not seqs:
            return np.zeros((0, self.dim), np.float32)
        return self.pool(*self.hidden_states(seqs))

