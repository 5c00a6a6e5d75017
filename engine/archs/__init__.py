"""Architectures: one builder function each, config + weight table -> engine.graph.Graph."""
from __future__ import annotations

from engine.archs import bert, llama, llama_bias

BUILDERS = {"llama": llama.build, "llama_bias": llama_bias.build, "bert": bert.build}
DECODERS = ("llama", "llama_bias")      # causal, with a KV cache (engine/decoder.py)
ENCODERS = ("bert",)                    # bidirectional over each sequence (engine/encoder.py)
