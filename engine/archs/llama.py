"""The Llama-family decoder as a graph (read it beside llama2.c's forward()), with every decoder option of
loader/source.py ModelConfig: the architectures anybit runs differ only by those options, so each is
this one builder (engine/archs/__init__.py maps llama, qwen2, qwen3, gemma3 and phi3 here):

    llama    Llama 2 / SmolLM2; Llama 3.x RoPE frequency factors, linear RoPE scaling; Mistral's window
    qwen2    q/k/v biases, untied output
    qwen3    per-head RMSNorm of q and k before RoPE (head_dim may differ from d / heads)
    gemma3   embeddings * sqrt(d), q/k norms, post-attention and post-FFN norms, GeGLU (tanh), q.k scale
             (query_pre_attn_scalar), local layers (sliding window, their own RoPE base) between global
             ones, final logit soft-cap
    phi3     partial rotary (q|k|v and gate|up were split at load)

Buffers are llama2.c's RunState: x (the residual stream), xb (normed input of a sub-block), q/k (after
RoPE), att (attention output), hb (activated FFN hidden), xo/logits (the output rows). The engine names
its weights as the packed model does (layers.i.wq, ...) and fuses q|k|v and gate|up into one product
where the recipes agree ("layers.i.wq|wk|wv"); Builder.linears splits the product by columns. RoPE
frequency divisors (Llama 3 factors times the linear scale) are the weight "rope_freqs" when the engine
made one (engine/decoder.py rope_weights); local layers of Gemma 3 turn without them.
"""
from __future__ import annotations

from engine.graph import Builder, Graph


def build(cfg, weights: dict) -> Graph:
    d, H, Hkv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    eps, L = cfg.norm_eps, cfg.n_layers
    # None keeps the default 1/sqrt(head_dim) (the plain path every backend compiles)
    scale = cfg.attn_scale if cfg.attn_scale else None
    g = Builder(weights)
    x, xb = g.buf("x", d), g.buf("xb", d)
    q, k, att = g.buf("q", H * hd), g.buf("k", Hkv * hd), g.buf("att", H * hd)
    g.embed(x, "tok_embeddings")
    if cfg.embed_scale != 1.0:
        g.scale(x, cfg.embed_scale, x)
    for l in range(L):
        p = f"layers.{l}."
        # attention: x += [post_norm] wo(attention(rope(norm(q)), cache <- (rope(norm(k)), v)))
        g.rmsnorm(x, p + "attn_norm", eps, xb)
        bias = [p + "bq", p + "bk", p + "bv"] if cfg.qkv_bias else None
        wq, wk, wv = g.linears(xb, [p + "wq", p + "wk", p + "wv"], "qkv", bias)
        if cfg.qk_norm:           # per head: a group of head_dim columns
            wq = g.rmsnorm(wq, p + "q_norm", eps, g.buf("qn", H * hd), group=hd)
            wk = g.rmsnorm(wk, p + "k_norm", eps, g.buf("kn", Hkv * hd), group=hd)
        rope = _rope(cfg, l, weights)
        g.rope(wq, q, heads=H, **rope)
        g.rope(wk, k, heads=Hkv, **rope)
        g.kv_store(k, wv, l)
        g.attention(q, l, att, heads=H, kv_heads=Hkv, head_dim=hd, scale=scale, window=cfg.layer_window(l))
        _sublayer_out(g, cfg, att, p + "wo", p + "bo" if cfg.o_bias else None, p + "attn_post_norm", x, xb)
        # feed-forward: x += [post_norm] w_down(act(w_gate(xb)) * w_up(xb))
        g.rmsnorm(x, p + "ffn_norm", eps, xb)
        gate, up = g.linears(xb, [p + "w_gate", p + "w_up"], "gate_up")
        hb = g.act_mul(gate, up, g.buf("hb", gate.n), act=cfg.ffn_act)
        _sublayer_out(g, cfg, hb, p + "w_down", None, p + "ffn_post_norm", x, xb)
    # the rows whose logits the step wants: final norm, classifier, soft-cap
    xo = g.take_rows(x, g.buf("xo", d, "out"))
    xn = g.rmsnorm(xo, "norm", eps, g.buf("xn", d, "out"))
    logits = g.linear(xn, "output", g.buf("logits", weights["output"].N, "out"))
    if cfg.logit_softcap:
        g.softcap(logits, cfg.logit_softcap, logits)
    return g.finish(logits, kv_layers=L, kv_heads=Hkv, head_dim=hd)


def _rope(cfg, l: int, weights: dict) -> dict:
    """RoPE parameters of layer l: a local layer (with its own base) turns without scaling or factors."""
    theta, _scale, _factors = cfg.layer_rope(l)
    local = cfg.rope_local_theta > 0 and l in cfg.swa_layers
    freqs = "rope_freqs" if "rope_freqs" in weights and not local else None
    return dict(head_dim=cfg.head_dim, theta=theta, style=cfg.rope_style, n_rot=cfg.rope_dim, freqs=freqs)


def _sublayer_out(g: Builder, cfg, h, w: str, bias, post_norm: str, x, xb) -> None:
    """x += the sub-block's output projection of h, RMS-normed first where the model has post norms."""
    y = g.linear(h, w, xb, bias)
    if cfg.post_norms:
        y = g.rmsnorm(y, post_norm, cfg.norm_eps, g.buf("xp", cfg.dim))
    g.add(x, y, x)
