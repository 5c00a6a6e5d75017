"""Architectures: one builder function each, config + weight table -> engine.graph.Graph."""
from __future__ import annotations

from engine.archs import llama, llama_bias

BUILDERS = {"llama": llama.build, "llama_bias": llama_bias.build}
