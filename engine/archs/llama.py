"""The Llama forward pass as a graph (read it beside llama2.c's forward()).

Buffers are llama2.c's RunState: x (the residual stream), xb (normed input of a sub-block), q/k (after
RoPE), att (attention output), hb (activated FFN hidden), xo/logits (the output rows). The engine names
its weights as the packed model does (layers.i.wq, ...) and fuses q|k|v and gate|up into one product
where the recipes agree ("layers.i.wq|wk|wv"); Builder.linears splits the product by columns.
"""
from __future__ import annotations

from engine.graph import Builder, Graph


def build(cfg, weights: dict) -> Graph:
    d, H, Hkv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    eps, L = cfg.norm_eps, cfg.n_layers
    rope = dict(head_dim=hd, theta=cfg.rope_theta, style=cfg.rope_style,
                freqs="rope_freqs" if "rope_freqs" in weights else None)
    g = Builder(weights)
    x, xb = g.buf("x", d), g.buf("xb", d)
    q, k, att = g.buf("q", H * hd), g.buf("k", Hkv * hd), g.buf("att", H * hd)
    g.embed(x, "tok_embeddings")
    for l in range(L):
        p = f"layers.{l}."
        # attention: x += wo(attention(rope(q), cache <- (rope(k), v)))
        g.rmsnorm(x, p + "attn_norm", eps, xb)
        wq, wk, wv = g.linears(xb, [p + "wq", p + "wk", p + "wv"], "qkv")
        g.rope(wq, q, heads=H, **rope)
        g.rope(wk, k, heads=Hkv, **rope)
        g.kv_store(k, wv, l)
        g.attention(q, l, att, heads=H, kv_heads=Hkv, head_dim=hd)
        g.linear(att, p + "wo", xb)
        g.add(x, xb, x)
        # feed-forward: x += w_down(silu(w_gate(xb)) * w_up(xb))
        g.rmsnorm(x, p + "ffn_norm", eps, xb)
        gate, up = g.linears(xb, [p + "w_gate", p + "w_up"], "gate_up")
        hb = g.act_mul(gate, up, g.buf("hb", gate.n))
        g.linear(hb, p + "w_down", xb)
        g.add(x, xb, x)
    # the rows whose logits the step wants: final norm, classifier
    xo = g.take_rows(x, g.buf("xo", d, "out"))
    xn = g.rmsnorm(xo, "norm", eps, g.buf("xn", d, "out"))
    logits = g.linear(xn, "output", g.buf("logits", weights["output"].N, "out"))
    return g.finish(logits, kv_layers=L, kv_heads=Hkv, head_dim=hd)
