"""The BERT encoder (post-LN, e.g. all-MiniLM-L6-v2) as a graph.

Rows are the tokens of every sequence of a batch, concatenated (varlen: no padding); attention_seq
attends within each sequence's rows. Weights: "emb" (an embedding of token + position + type rows),
emb_norm.weight / .bias, and per layer the linears wq, wk, wv, wo, w_in, w_out with biases bq, ...
(absent biases are simply not added) and the norms attn_norm / ffn_norm .weight / .bias.
"""
from __future__ import annotations

from engine.graph import Builder, Graph


def build(cfg, weights: dict) -> Graph:
    d, H, eps = cfg.dim, cfg.n_heads, cfg.norm_eps
    hd = cfg.head_dim or d // H
    g = Builder(weights)
    e, x = g.buf("e", d), g.buf("x", d)
    g.embed(e, "emb")
    g.layernorm(e, "emb_norm.weight", "emb_norm.bias", eps, x)

    def linear(x, name, out, bias):
        return g.linear(x, name, out, bias if g.has(bias) else None)

    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        q = linear(x, p + "wq", g.buf("q", H * hd), p + "bq")
        k = linear(x, p + "wk", g.buf("k", H * hd), p + "bk")
        v = linear(x, p + "wv", g.buf("v", H * hd), p + "bv")
        a = g.attention_seq(q, k, v, g.buf("att", H * hd), heads=H, head_dim=hd)
        a = linear(a, p + "wo", g.buf("ao", d), p + "bo")
        s = g.add(a, x, g.buf("s", d))
        g.layernorm(s, p + "attn_norm.weight", p + "attn_norm.bias", eps, x)         # post-LN
        f = g.gelu(linear(x, p + "w_in", g.buf("f", weights[p + "w_in"].N), p + "b_in"), g.buf("fg", weights[p + "w_in"].N))
        f = linear(f, p + "w_out", g.buf("fo", d), p + "b_out")
        s = g.add(f, x, g.buf("s", d))
        g.layernorm(s, p + "ffn_norm.weight", p + "ffn_norm.bias", eps, x)
    return g.finish(x)
