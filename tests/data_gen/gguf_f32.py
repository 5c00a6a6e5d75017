"""A float32 copy of a GGUF file: the same metadata and tensor names, every tensor dequantized.

llama.cpp's CPU dot products against quantized weights (Q4_K, Q5_0, Q8_0, ...) first quantize the
activations to 8 bits, so on a quantized file llama.cpp is not a float path. Its logits on this copy are:
same weights, float arithmetic, which is what a float64 reference can be held to tightly.
"""
from __future__ import annotations

from pathlib import Path


def write_f32_copy(src, dst) -> Path:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from loader.gguf_reader import GGUFFile

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue                 # header fields the writer sets itself; file_type would say "Q4_K_M"
        vtype = f.types[0]
        w.add_key_value(key, f.contents(), vtype, f.types[1] if vtype == GGUFValueType.ARRAY else None)
    g = GGUFFile(src)
    for t in r.tensors:
        w.add_tensor(t.name, g.load(t.name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)
