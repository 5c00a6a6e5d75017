"""Every decoder architecture's config and tensors, from GGUF and from HF directories (fast: tiny models).

The strongest check here needs no oracle program: the same random model written as a GGUF file (llama.cpp
conventions) and as an HF directory (transformers conventions) must give the same float64 reference
logits, so a reader that mis-reads a RoPE option, a norm convention, a permutation or a fused split fails.
tests/test_archs_llama.py checks the reference itself against llama.cpp.
"""

import numpy as np
import pytest

from loader.errors import FormatError
from loader.gguf_reader import read_gguf
from loader.hf_config import llama3_freq_factors
from loader.hf_reader import read_hf
from loader.source import expected_shapes
from tests.data_gen.arch_models import CASES, DIM, FFN, HEADS, KV_HEADS, LLAMA3, llama3_divisors, \
    write_arch_gguf, write_arch_hf
from tests.reference_forward import attention_mask, reference_logits, rope

IDS = np.random.default_rng(5).integers(3, 270, 20)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    out = {}
    for name in CASES:
        write_arch_gguf(d / f"{name}.gguf", name)
        write_arch_hf(d / name, name)
        out[name] = (d / f"{name}.gguf", d / name)
    return out


EXPECT = {
    "llama3": dict(arch="llama", rope_style="adjacent", rope_scaling="llama3", tied_embeddings=True),
    "llama_linear": dict(arch="llama", rope_scaling="linear", rope_scale=4.0, tied_embeddings=False),
    "mistral": dict(arch="llama", sliding_window=64, swa_layers=[0, 1]),
    "qwen2": dict(arch="qwen2", rope_style="half", qkv_bias=True, o_bias=False, tied_embeddings=False),
    "qwen3": dict(arch="qwen3", qk_norm=True, head_dim=32, qkv_bias=False),
    "gemma3": dict(arch="gemma3", qk_norm=True, post_norms=True, ffn_act="gelu_tanh", embed_scale=8.0,
                   logit_softcap=15.0, sliding_window=6, swa_layers=[0, 1, 2, 3, 4], rope_local_theta=10000.0,
                   rope_theta=1e6),
    "phi3": dict(arch="phi3", rope_dim=8, head_dim=16, tied_embeddings=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_config_and_tensors(models, name):
    src = read_gguf(models[name][0])
    c = src.config
    for k, v in EXPECT[name].items():
        assert getattr(c, k) == v, k
    assert {n: t.shape for n, t in src.tensors.items()} == expected_shapes(c)
    assert c.extras()                  # every case uses an option the plain Llama forward lacks
    h = read_hf(models[name][1]).config
    for k, v in EXPECT[name].items():
        if k != "rope_style":
            assert getattr(h, k) == pytest.approx(v) if isinstance(v, float) else getattr(h, k) == v, k
    assert h.rope_style == "half"


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_and_hf_give_the_same_logits(models, name):
    a = reference_logits(read_gguf(models[name][0]), IDS)
    b = reference_logits(read_hf(models[name][1]), IDS)
    assert np.abs(a - b).max() < 1e-6 * np.abs(a).max()


def test_phi3_fused_tensors_are_split_by_rows(models):
    import gguf
    r = gguf.GGUFReader(str(models["phi3"][0]))
    raw = {t.name: np.array(t.data) for t in r.tensors}
    src = read_gguf(models["phi3"][0])
    qkv, up = raw["blk.1.attn_qkv.weight"], raw["blk.1.ffn_up.weight"]
    qd, kd = HEADS * 16, KV_HEADS * 16
    assert np.array_equal(src["layers.1.wq"].load(), qkv[:qd])
    assert np.array_equal(src["layers.1.wk"].load(), qkv[qd:qd + kd])
    assert np.array_equal(src["layers.1.wv"].load(), qkv[qd + kd:])
    assert np.array_equal(src["layers.1.w_gate"].load(), up[:FFN])
    assert np.array_equal(src["layers.1.w_up"].load(), up[FFN:])


def test_llama3_factors_match_the_reference_formula():
    for base, hd in ((10000.0, 16), (500000.0, 128)):
        assert np.allclose(llama3_freq_factors(hd, base, LLAMA3["factor"], LLAMA3["low_freq_factor"],
                                               LLAMA3["high_freq_factor"], 64), llama3_divisors(hd, base, LLAMA3),
                           rtol=1e-6)
    f = llama3_freq_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192)     # Llama 3.1: first kept, last slowed 8x
    assert f[0] == 1.0 and f[-1] == pytest.approx(8.0)


def test_gemma3_window_patterns(tmp_path):
    p = tmp_path / "g.gguf"
    write_arch_gguf(p, "gemma3", extra_meta={"gemma3.attention.sliding_window_pattern": 3,
                                             "gemma3.rope.freq_base_swa": 5000.0})
    c = read_gguf(p).config
    assert c.swa_layers == [0, 1, 3, 4] and c.rope_local_theta == 5000.0
    assert c.layer_rope(2) == (1e6, 1.0, None) and c.layer_rope(0)[0] == 5000.0
    assert c.layer_window(2) == 0 and c.layer_window(3) == 6
    write_arch_hf(tmp_path / "h", "gemma3", layer_types=["sliding_attention", "full_attention"] * 3)
    assert read_hf(tmp_path / "h").config.swa_layers == [0, 2, 4]
    write_arch_gguf(p, "gemma3", drop_meta=("gemma3.attention.sliding_window",))
    c = read_gguf(p).config
    assert c.sliding_window == 0 and c.swa_layers == []


def test_reference_pieces():
    """The reference's RoPE and mask by hand on small cases."""
    x = np.zeros((1, 1, 4))
    x[0, 0, 0] = 1.0
    y = rope(x, np.array([1]), 4, 10000.0, 1.0, None, "adjacent")      # pair (0, 1) turns by 1 rad
    assert np.allclose(y[0, 0], [np.cos(1), np.sin(1), 0, 0])
    y = rope(x, np.array([1]), 4, 10000.0, 2.0, [1.0, 1.0], "half")   # pair (0, 2) by 1/2 rad
    assert np.allclose(y[0, 0], [np.cos(.5), 0, np.sin(.5), 0])
    y = rope(np.ones((1, 1, 6)), np.array([3]), 4, 100.0, 1.0, None, "half")
    assert np.allclose(y[0, 0, 4:], 1.0)                               # partial: dims past rot untouched
    m = attention_mask(4, 2)
    assert (np.isfinite(m) == np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)).all()


def test_sliding_window_changes_the_logits(models):
    src = read_gguf(models["gemma3"][0])
    a = reference_logits(src, IDS)
    src.config.sliding_window = 1000                 # same layers and RoPE bases, no window in effect
    b = reference_logits(src, IDS)
    assert np.allclose(a[:6], b[:6]) and not np.allclose(a[6:], b[6:])


@pytest.mark.parametrize("meta, message", [
    ({"llama.expert_count": 8}, r"mixture-of-experts .*llama.expert_count = 8"),
    ({"llama.rope.scaling.type": "yarn"}, r"RoPE scaling 'yarn'"),
    ({"general.type": "mmproj"}, r"multimodal projector"),
    ({"llama.rope.dimension_count": 8}, r"rope.dimension_count 8 differs from the head size 16"),
])
def test_gguf_refusals(tmp_path, meta, message):
    p = tmp_path / "x.gguf"
    write_arch_gguf(p, "llama_linear", extra_meta=meta)
    with pytest.raises(FormatError, match=message) as e:
        read_gguf(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


@pytest.mark.parametrize("case, over, message", [
    ("gemma3", {"model_type": "gemma3", "vision_config": {}}, r"multimodal model_type 'gemma3'"),
    ("qwen2", {"num_experts": 8}, r"mixture-of-experts"),
    ("qwen2", {"use_sliding_window": True}, r"use_sliding_window"),
    ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}, r"'longrope'"),
    ("llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"llama3 rope_scaling lacks"),
    ("qwen3", {"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
])
def test_hf_refusals(tmp_path, case, over, message):
    write_arch_hf(tmp_path, case, **over)
    with pytest.raises(FormatError, match=message) as e:
        read_hf(tmp_path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_untied_tables_packed_biases_and_norms_float(models):
    from loader.bipolar import PackedLinear
    from loader.pack import Recipe, quantize_model
    pm = quantize_model(read_gguf(models["qwen2"][0]), Recipe(wbits=4))
    for n in ("tok_embeddings", "output", "layers.0.wq", "layers.1.w_down"):
        assert isinstance(pm.tensors[n], PackedLinear), n
    assert pm.info["tok_embeddings"]["bits"] == 4
    for n in ("layers.0.bq", "layers.0.bk", "layers.0.bv", "layers.0.attn_norm", "norm"):
        assert isinstance(pm.tensors[n], np.ndarray) and pm.tensors[n].dtype == np.float32, n
    pm = quantize_model(read_gguf(models["gemma3"][0]), Recipe(wbits=4))
    for n in ("layers.5.q_norm", "layers.5.attn_post_norm", "layers.5.ffn_post_norm"):
        assert isinstance(pm.tensors[n], np.ndarray), n
