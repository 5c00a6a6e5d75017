"""Activation smoothing (SmoothQuant, SPEC.md section 1) calibrated on a text that ships with Python.

Run the float model over the calibration text, record per input channel max|x_j| at the input of each
linear, and return s_j = max|x_j|^a / max|w_j|^(1-a) with a = 0.5. Weights are multiplied by s before
quantization and activations divided by s at run time, which moves outliers from activations (quantized
per token, coarse) into weights (quantized per group, fine).
"""
from __future__ import annotations

import numpy as np

from engine.texts import calibration_text
from loader.pack import Recipe, quantize_model
from loader.source import SourceModel

ALPHA = 0.5
MAX_TOKENS = 512


class _Recorder:
    """Wraps a backend; keeps the running max |x| per input column of every float linear call."""

    def __init__(self, backend):
        self.backend = backend
        self.amax: dict[int, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def linear_float(self, w, x):
        m = np.abs(np.asarray(x, np.float32)).max(0)
        key = id(w)
        self.amax[key] = np.maximum(self.amax[key], m) if key in self.amax else m
        return self.backend.linear_float(w, x)


def smoothing_factors(src: SourceModel, *, alpha: float = ALPHA, text: str | None = None,
                      backend=None) -> dict[str, np.ndarray]:
    """Per linear name, float32 factors (K,). Linears that share an input share the factors."""
    from engine.decoder import Decoder
    from loader.tokenizer import Tokenizer
    from runtime.numpy_backend import NumpyBackend

    float_model = quantize_model(src, Recipe(wbits=16))
    rec = _Recorder(backend or NumpyBackend())
    dec = Decoder(float_model, rec)
    tok = Tokenizer.from_source(src)
    ids = tok.encode(text or calibration_text())[:MAX_TOKENS]
    dec.forward(ids, dec.new_cache(), all_logits=True)

    groups = []                 # names of the linears that share an input
    for i in range(src.config.n_layers):
        p = f"layers.{i}."
        groups += [[p + "wq", p + "wk", p + "wv"], [p + "wo"], [p + "w_gate", p + "w_up"], [p + "w_down"]]
    groups.append(["output"])
    out: dict[str, np.ndarray] = {}
    for names in groups:
        lins = list({id(dec.linear_for[n]): dec.linear_for[n] for n in names}.values())
        xmax = np.max([rec.amax[id(lin.float_w)] for lin in lins], axis=0).astype(np.float64)
        wmax = np.max([np.abs(float_model.tensors[n]).max(0) for n in names], axis=0).astype(np.float64)
        s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        for n in names:
            out[n] = s
    return out


def embedder_calibration_texts() -> list[str]:
    """The calibration text as an embedder sees inputs: its paragraphs, plus short texts (one word, three
    words) made from its vocabulary, since retrieval queries are often that short and a Hessian of
    paragraphs alone left one-word sentences the worst rounded (cosine 0.969 against 0.981)."""
    import re
    text = calibration_text()
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) > 20]
    words = list(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)))[:300]
    short = [w.capitalize() + "." for w in words]
    short += [" ".join(words[i:i + 3]).capitalize() + "!" for i in range(0, len(words), 3)]
    return paragraphs + short


class _HessianRecorder:
    """Wraps a backend; sums x^T x (float64) of the rows entering every float linear, rotated first
    when the recipe rotates that linear."""

    def __init__(self, backend, blocks: dict[int, int]):
        self.backend, self.blocks = backend, blocks
        self.H: dict[int, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def linear_float(self, w, x):
        from loader.rotation import hadamard_blocks
        key = id(w)
        xd = np.asarray(x, np.float64)
        if self.blocks.get(key):
            xd = hadamard_blocks(xd, self.blocks[key])
        self.H[key] = self.H[key] + xd.T @ xd if key in self.H else xd.T @ xd
        return self.backend.linear_float(w, x)


def encoder_hessians(src: SourceModel, recipe: Recipe, backend=None) -> dict[str, np.ndarray]:
    """Per quantized linear of an encoder, X^T X over embedder_calibration_texts (for GPTQ)."""
    from engine.embed import Embedder
    from loader.pack import is_linear, rotation_block
    from runtime.numpy_backend import NumpyBackend

    float_model = quantize_model(src, Recipe(wbits=16))
    names = {n for n in float_model.tensors if is_linear(n, src.config.arch)}
    rec = _HessianRecorder(backend or NumpyBackend(), {})
    emb = Embedder(float_model, rec)
    by_id = {}
    for i, layer in enumerate(emb.encoder.layers):
        for k, lin in layer.items():
            name = f"layers.{i}.{k}"
            if name in names and lin.float_w is not None:
                by_id[id(lin.float_w)] = name
                rec.blocks[id(lin.float_w)] = rotation_block(name, lin.float_w.shape[1], recipe.rotate)
    emb.embed(embedder_calibration_texts())
    return {by_id[k]: H for k, H in rec.H.items() if k in by_id}
