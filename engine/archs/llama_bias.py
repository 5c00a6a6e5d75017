"""Llama with biases on the q, k and v products (Qwen2's attention): the cost of a new architecture is
this one builder. Weights as in engine/archs/llama.py plus layers.i.bq, bk, bv (N,) float32 (the engine
fuses them into layers.i.bq|bk|bv beside a fused q|k|v product)."""
from __future__ import annotations

from engine.graph import Builder, Graph


def build(cfg, weights: dict) -> Graph:
    d, H, Hkv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    eps = cfg.norm_eps
    rope = dict(head_dim=hd, theta=cfg.rope_theta, style=cfg.rope_style)
    g = Builder(weights)
    x, xb = g.buf("x", d), g.buf("xb", d)
    q, k, att = g.buf("q", H * hd), g.buf("k", Hkv * hd), g.buf("att", H * hd)
    g.embed(x, "tok_embeddings")
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        g.rmsnorm(x, p + "attn_norm", eps, xb)
        wq, wk, wv = g.linears(xb, [p + "wq", p + "wk", p + "wv"], "qkv", [p + "bq", p + "bk", p + "bv"])
        g.rope(wq, q, heads=H, **rope)
        g.rope(wk, k, heads=Hkv, **rope)
        g.kv_store(k, wv, l)
        g.attention(q, l, att, heads=H, kv_heads=Hkv, head_dim=hd)
        g.linear(att, p + "wo", xb)
        g.add(x, xb, x)
        g.rmsnorm(x, p + "ffn_norm", eps, xb)
        gate, up = g.linears(xb, [p + "w_gate", p + "w_up"], "gate_up")
        g.linear(g.act_mul(gate, up, g.buf("hb", gate.n)), p + "w_down", xb)
        g.add(x, xb, x)
    xn = g.rmsnorm(g.take_rows(x, g.buf("xo", d, "out")), "norm", eps, g.buf("xn", d, "out"))
    logits = g.linear(xn, "output", g.buf("logits", weights["output"].N, "out"))
    return g.finish(logits, kv_layers=cfg.n_layers, kv_heads=Hkv, head_dim=hd)
