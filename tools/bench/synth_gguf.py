"""A random-weight llama GGUF with the shapes of a large model, so that llama.cpp and anybit can be timed
on the same file (`python -m tools.bench synth --write-gguf PATH`, then `tools.bench e2e --model PATH`).

Weights are random Q4_0 blocks (a small fixed-range float16 scale, random nibbles), or random blocks of
another type (qtype: Q4_K, Q5_0, Q6_K, ... of loader/kquant.py: random codes and sub-scales, float16
fields sized alike); norms are ones; the
embedding is tied (no output tensor); the tokenizer and its vocabulary size are copied from a template
GGUF (default: the default model's), so both engines tokenize the benchmark prompt as usual. The text
such a model generates is noise; its speed is that of a real model with these shapes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

Q4_0_BLOCK, Q4_0_BYTES = 32, 18        # 32 weights: a float16 scale and 16 bytes of nibbles


def _q4_0_rows(rng, rows: int, K: int) -> np.ndarray:
    """(rows, K/32*18) bytes of Q4_0 blocks: scales of about 1/(8 sqrt(K)), so activations stay O(1)."""
    nb = K // Q4_0_BLOCK
    out = rng.integers(0, 256, (rows, nb, Q4_0_BYTES), dtype=np.uint8)
    d = rng.uniform(0.5, 1.5, (rows, nb)) / (8 * np.sqrt(K))
    out[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return out.reshape(rows, nb * Q4_0_BYTES)


def _kq_rows(rng, rows: int, K: int, qtype: str) -> np.ndarray:
    """(rows, K/S*bytes) random blocks of a loader/kquant.py type, weights of about 1/(8 sqrt(K))."""
    from loader.kquant import F16_FIELDS, KQ_TYPES, TYPICAL_SC
    bits, _G, S, nbytes, _c0 = KQ_TYPES[qtype]
    nb = K // S
    out = rng.integers(0, 256, (rows, nb, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = rng.uniform(0.5, 1.5, (rows, nb)) / (8 * np.sqrt(K)) / (1 << (bits - 1)) / TYPICAL_SC.get(qtype, 1)
        out[:, :, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return out.reshape(rows, nb * nbytes)


def _copy_meta(w, meta: dict) -> None:
    """Copy tokenizer.* metadata entries, typed as GGUF expects them (token types are int32)."""
    import gguf
    for k, v in meta.items():
        if not k.startswith("tokenizer."):
            continue
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list) and v and isinstance(v[0], str):
            w.add_array(k, v)
        elif isinstance(v, list) and v and isinstance(v[0], int):
            w.add_key_value(k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)


def write_random_gguf(shape: dict, out: Path, template: Path, seed: int = 0, qtype: str = "Q4_0") -> Path:
    """shape: dict(dim, n_layers, n_heads, n_kv_heads, ffn_dim) (tools.bench.synth.SYNTH); returns out."""
    import gguf

    from loader.kquant import KQ_TYPES
    if qtype != "Q4_0" and qtype not in KQ_TYPES:
        raise ValueError(f"qtype {qtype!r}: Q4_0 or one of {', '.join(KQ_TYPES)}")
    block, bsize = (Q4_0_BLOCK, Q4_0_BYTES) if qtype == "Q4_0" else KQ_TYPES[qtype][2:4]

    from loader.gguf_reader import GGUFFile
    meta = GGUFFile(template).meta
    V = len(meta.get("tokenizer.ggml.tokens") or [])
    if V == 0:
        raise ValueError(f"{template}: no tokenizer.ggml.tokens to copy")
    d, L, H, Hkv, F = (shape[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"))
    hd = d // H
    if d % block or F % block:
        raise ValueError(f"{qtype} needs dims that are multiples of {block} (d {d}, ffn {F})")
    tensors = [("token_embd.weight", V, d)]
    for i in range(L):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", None, d), (b + "attn_q.weight", H * hd, d),
                    (b + "attn_k.weight", Hkv * hd, d), (b + "attn_v.weight", Hkv * hd, d),
                    (b + "attn_output.weight", d, H * hd), (b + "ffn_norm.weight", None, d),
                    (b + "ffn_gate.weight", F, d), (b + "ffn_up.weight", F, d), (b + "ffn_down.weight", d, F)]
    tensors.append(("output_norm.weight", None, d))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"{shape.get('name', 'random')} shapes, {L} layers, vocabulary {V}, {qtype} (anybit synth)")
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    _copy_meta(w, meta)
    for name, N, K in tensors:
        if N is None:
            w.add_tensor_info(name, (K,), np.dtype(np.float32), 4 * K)
        else:
            nbytes = N * (K // block) * bsize
            w.add_tensor_info(name, (N, nbytes // N), np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for j, (name, N, K) in enumerate(tensors):
        w.write_tensor_data(np.ones(K, np.float32) if N is None else
                            _q4_0_rows(rng, N, K) if qtype == "Q4_0" else _kq_rows(rng, N, K, qtype))
        print(f"\r  writing {out.name}: tensor {j + 1}/{len(tensors)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w.close()
    return out
