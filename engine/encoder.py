"""BERT-family encoder (post-LN BERT, e.g. all-MiniLM-L6-v2) on packed weights, through a backend.

The model: token + position + type embeddings -> LayerNorm -> n_layers x [bidirectional self-attention,
residual, LayerNorm, GELU MLP, residual, LayerNorm] -> pooling (mean over real tokens, or [CLS]) ->
optional L2 normalisation. Tensor names are the internal BERT names of docs/DESIGN.md.

Padding: the sequences of a batch are concatenated token by token ("varlen" layout) instead of being
padded to a rectangle. Every per-token op (linears, norms, GELU) then runs on real tokens only, and
attention runs per sequence with a key mask that covers exactly that sequence's tokens. No pad token is
ever computed, so an embedding cannot depend on what else is in its batch.

Linears are whatever the packed model holds: a `PackedLinear` (wbits < 16) goes through
`backend.linear` with the requested activation precision; a float32 (N, K) array through
`backend.linear_float`. Float weights with abits < 16 simulate activation quantization in NumPy (same
per-token/per-group rule as the backends), so that "A8 only" can be measured too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loader.bipolar import PackedLinear, quantize_activations
from loader.errors import FormatError
from loader.rotation import rotate_rows

_LINEARS = (("wq", "bq"), ("wk", "bk"), ("wv", "bv"), ("wo", "bo"), ("w_in", "b_in"), ("w_out", "b_out"))


@dataclass
class _Linear:
    """One linear layer prepared for the backend: a handle (packed) or a float weight, plus its bias."""
    handle: object | None
    agroup: int | None              # activation group handed to the backend ("token" -> Kp)
    weight: np.ndarray | None       # float32 (N, K) when unquantized
    bias: np.ndarray | None
    N: int
    K: int
    rotate: int = 0                 # the packed weight holds W R: feed it R x (loader/rotation.py)


class Encoder:
    """A BERT encoder bound to one backend and one activation precision.

    `tensors` maps internal names to float32 arrays or `PackedLinear`s (a `PackedModel.tensors`).
    """

    def __init__(self, config, tensors: dict, backend, *, abits: int = 16, agroup: int | str | None = None):
        if config.arch != "bert":
            raise FormatError(f"the encoder runs BERT models; this model's architecture is {config.arch!r}")
        if config.pooling not in ("mean", "cls"):
            raise FormatError(f"unknown pooling {config.pooling!r}; supported: mean, cls")
        if not (agroup is None or agroup == "token" or (isinstance(agroup, int) and agroup > 0 and agroup % 32 == 0)):
            raise ValueError(f"agroup must be a positive multiple of 32, 'token' or None, got {agroup!r}")
        if not (abits == 16 or (isinstance(abits, int) and 1 <= abits <= 8)):
            raise ValueError(f"abits must be 1..8 or 16, got {abits!r}")
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

        self.tok_emb = get("tok_embeddings")
        self.pos_emb = get("pos_embeddings")
        # a model without token types (type_vocab_size 0) simply adds nothing
        self.type_emb = get("type_embeddings") if "type_embeddings" in tensors else None
        self.emb_norm = (get("emb_norm.weight"), get("emb_norm.bias"))
        for name, t in (("tok_embeddings", self.tok_emb), ("pos_embeddings", self.pos_emb)):
            if t.ndim != 2 or t.shape[1] != self.dim:
                raise FormatError(f"{name} has shape {t.shape}, expected (*, {self.dim})")
        # positions beyond the table cannot be embedded, whatever the config says
        self.max_len = min(int(config.truncate_len or config.max_seq_len), self.pos_emb.shape[0])

        self.layers = []
        for i in range(int(config.n_layers)):
            p = f"layers.{i}."
            layer = {}
            for wname, bname in _LINEARS:
                if p + wname not in tensors:
                    raise FormatError(f"BERT model is missing tensor {p + wname!r}")
                layer[wname] = self._prepare(tensors[p + wname], get(p + bname) if p + bname in tensors else None,
                                             p + wname)
            for norm in ("attn_norm", "ffn_norm"):
                layer[norm] = (get(f"{p}{norm}.weight"), get(f"{p}{norm}.bias"))
            self.layers.append(layer)

    def _prepare(self, w, bias, name: str) -> _Linear:
        if isinstance(w, PackedLinear):
            agroup = w.Kp if self.agroup == "token" else self.agroup
            return _Linear(self.backend.prepare_linear(w), agroup, None, bias, w.N, w.K, w.rotate)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise FormatError(f"linear {name!r} must be 2-D, got shape {w.shape}")
        return _Linear(None, None, w, bias, w.shape[0], w.shape[1])

    # ---- ops ---------------------------------------------------------------------------------------

    def _linear(self, lin: _Linear, x: np.ndarray) -> np.ndarray:
        if lin.handle is not None:
            if lin.rotate:
                x = rotate_rows(self.backend, x, lin.rotate)
            y = self.backend.linear(lin.handle, x, abits=self.abits, agroup=lin.agroup)
        else:
            if self.abits != 16:
                x = self._fake_quant(x)
            y = self.backend.linear_float(lin.weight, x)
        if lin.bias is not None:
            y += lin.bias
        return y

    def _fake_quant(self, x: np.ndarray) -> np.ndarray:
        """Quantize-dequantize activations (float weights, abits < 16): per token or per group."""
        K = x.shape[1]
        if self.agroup in (None, "token"):
            group = -(-K // 32) * 32 if self.agroup == "token" else min(128, -(-K // 32) * 32)
        else:
            group = int(self.agroup)
        return quantize_activations(x, self.abits, group).dequantize()[:, :K].astype(np.float32)

    def _embed(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.tok_emb.shape[0]):
            raise ValueError(f"token id out of range 0..{self.tok_emb.shape[0] - 1}")
        x = self.tok_emb[ids] + self.pos_emb[positions]
        if self.type_emb is not None:
            x += self.type_emb[0]          # single-segment input: token type 0 everywhere
        return self.backend.layernorm(np.ascontiguousarray(x, np.float32), *self.emb_norm, self.eps)

    def _attention(self, q, k, v, starts, lens) -> np.ndarray:
        """Bidirectional attention, one call per sequence; the mask admits that sequence's keys only."""
        out = np.empty_like(q)
        for s, n in zip(starts, lens):
            mask = np.ones((n,), dtype=bool)
            pos = np.arange(n, dtype=np.int32)
            out[s:s + n] = self.backend.attention(q[s:s + n], k[s:s + n], v[s:s + n], n, pos, mask)
        return out

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
        positions = np.concatenate([np.arange(n) for n in lens])
        M, H, hd = ids.size, self.n_heads, self.head_dim
        be = self.backend
        x = self._embed(ids, positions)
        for layer in self.layers:
            q = self._linear(layer["wq"], x).reshape(M, H, hd)
            k = self._linear(layer["wk"], x).reshape(M, H, hd)
            v = self._linear(layer["wv"], x).reshape(M, H, hd)
            a = self._attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                                starts, lens).reshape(M, H * hd)
            a = self._linear(layer["wo"], a)
            x = be.layernorm(be.add(a, x), *layer["attn_norm"], self.eps)     # post-LN
            f = be.gelu(self._linear(layer["w_in"], x))
            f = self._linear(layer["w_out"], f)
            x = be.layernorm(be.add(f, x), *layer["ffn_norm"], self.eps)
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

