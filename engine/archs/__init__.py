"""Architectures: one builder function each, config + weight table -> engine.graph.Graph.

The decoders anybit reads (loader/source.py DECODERS) differ only by ModelConfig's decoder options, so
they share the Llama-family builder, which honours every option (engine/archs/llama.py); an
architecture with another block structure gets its own module here. llama_bias is the graph's example
of a second builder (Llama with q/k/v biases, chosen explicitly)."""
from __future__ import annotations

from engine.archs import bert, llama, llama_bias

BUILDERS = {"llama": llama.build, "qwen2": llama.build, "qwen3": llama.build, "gemma3": llama.build,
            "phi3": llama.build, "llama_bias": llama_bias.build, "bert": bert.build}
DECODERS = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "llama_bias")   # causal, with a KV cache (engine/decoder.py)
ENCODERS = ("bert",)                    # bidirectional over each sequence (engine/encoder.py)
