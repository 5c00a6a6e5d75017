"""One entry point for every source format: a GGUF file or a Hugging Face model directory.

Packed anybit directories are not sources (they are already packed): they are refused here with a
message that says so, and loader.packed reads them.
"""
from __future__ import annotations

from pathlib import Path

from loader.errors import FormatError
from loader.packed import is_packed_dir
from loader.source import SourceModel


def read_source(path) -> SourceModel:
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if p.suffix.lower() == ".gguf" or magic == b"GGUF":
            from loader.gguf_reader import read_gguf
            return read_gguf(p)
    elif (p / "config.json").is_file():
        if is_packed_dir(p):
            raise FormatError(f"{p}: is a packed anybit directory, not a source model (use loader.packed)")
        from loader.hf_reader import read_hf
        return read_hf(p)
    raise FormatError(f"{p}: not a GGUF file or a model directory (config.json + *.safetensors + tokenizer.json)")
