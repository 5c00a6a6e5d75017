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

    groups = []                 # (Linear, [names])
    for i, L in enumerate(dec.layers):
        p = f"layers.{i}."
        groups.append((L.qkv, [p + "wq", p + "wk", p + "wv"]))
        groups.append(([L.wo], [p + "wo"]))
        groups.append((L.gate_up, [p + "w_gate", p + "w_up"]))
        groups.append(([L.w_down], [p + "w_down"]))
    groups.append(([dec.output], ["output"]))
    out: dict[str, np.ndarray] = {}
    for lins, names in groups:
        xmax = np.max([rec.amax[id(lin.float_w)] for lin in lins], axis=0).astype(np.float64)
        wmax = np.max([np.abs(float_model.tensors[n]).max(0) for n in names], axis=0).astype(np.float64)
        s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        for n in names:
            out[n] = s
    return out
