"""Record llama.cpp's token ids for the vocabulary cases of tests/data_gen/llama_vocab.py.

Run with the interpreter that has llama-cpp-python (it needs numpy, gguf and llama_cpp, not anybit):

    ~/.cache/anybit/bench/llama-venv/bin/python tests/data_gen/llama_cpp_tokens.py \\
        --smol SmolLM2.gguf --minilm tokenizer.json [--gemma gemma-3-270m.gguf] --out tests/data/llama_cpp_tokens.json

Every id list in the output is llama.cpp's: `Llama(path, vocab_only=True).tokenize(text.encode(),
add_bos=False, special=False)` for each text (and add_bos=True for the first few, which adds what the
vocabulary's flags ask for). tests/test_tokenizer_llama.py compares anybit's tokenizer against them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))      # loader.gguf_reader (numpy + gguf only)
import llama_vocab as lv  # noqa: E402  (this folder, without importing the tests package)

# BPE pre-tokenizer names to record (each on SmolLM2's vocabulary); a name this llama.cpp build does not
# know is skipped (it would fall back to "default" there)
BPE_PRES = ["default", "llama-bpe", "llama3", "falcon3", "lfm2", "jina-v5-nano", "qwen2", "qwen35", "kormo",
            "deepseek-llm", "deepseek-coder", "deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm", "falcon", "mpt",
            "starcoder", "refact", "command-r", "gpt-2", "smollm", "stablelm2", "olmo", "dbrx", "smaug-bpe",
            "poro-chat", "chatglm-bpe", "glm4", "glm5", "viking", "jais", "jais-2", "codeshell", "bloom",
            "gpt3-finnish", "exaone", "exaone4", "exaone-moe", "minerva-7b", "megrez", "seed-coder", "bailingmoe",
            "grok-2", "hunyuan", "phi-2", "modern-bert", "mellum2", "solar-open", "trillion", "granite-docling",
            "minicpm5", "laguna", "ufakzeka", "tekken", "gpt-4o", "llama4", "minimax-m2",
            "granite-embed-multi-97m", "tiny_aya", "chameleon"]
N_SPECIAL = 4       # texts also tokenized with add_bos=True


def cases(smol_path, minilm_path, gemma_path) -> dict[str, dict]:
    smol = lv.read_meta(smol_path)
    out = {f"bpe:{pre}": lv.bpe_meta(smol, pre) for pre in BPE_PRES}
    out["spm:smol"] = lv.spm_meta(smol)
    out["spm:smol-no-prefix"] = lv.spm_meta(smol, space_prefix=False)
    out["wpm:minilm"] = lv.bert_meta(Path(minilm_path).read_text(encoding="utf-8"))
    if gemma_path:
        out["spm:gemma3"] = lv.gemma_meta(gemma_path)
        out["spm:gemma3-llama2"] = lv.gemma_meta(gemma_path, as_llama2=True)
    return out


def _load(path: Path):
    """Llama(vocab_only) and its load log (llama.cpp writes it to file descriptor 2)."""
    from llama_cpp import Llama
    log = path.with_suffix(".log")
    saved = os.dup(2)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            llm = Llama(str(path), vocab_only=True, verbose=True)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return llm, log.read_text(errors="replace")


def record(metas: dict[str, dict], texts) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as d:
        for name, meta in metas.items():
            path = lv.write_vocab_gguf(meta, Path(d) / "vocab.gguf")
            try:
                llm, log = _load(path)
            except ValueError:          # recent builds refuse an unknown pre-tokenizer name
                llm, log = None, path.with_suffix(".log").read_text(errors="replace")
            if llm is None or "unrecognized pre-tokenizer" in log:    # older ones fall back to "default"
                print(f"skip {name}: llama.cpp cannot load it ({log.strip().splitlines()[-1:]})", file=sys.stderr)
                continue
            ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
            special = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in texts[:N_SPECIAL]]
            result[name] = {"ids": ids, "add_bos_ids": special}
            del llm
            print(f"{name}: done", file=sys.stderr)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smol", required=True, help="the SmolLM2 GGUF (the default decoder)")
    ap.add_argument("--minilm", required=True, help="MiniLM's tokenizer.json (the default embedder)")
    ap.add_argument("--gemma", default=None, help="the Gemma 3 270M GGUF (optional)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--texts", default=None, help="a JSON list of texts instead of llama_vocab.TEXTS")
    ap.add_argument("--cases", default=None, help="comma-separated case names to record (default: all)")
    a = ap.parse_args(argv)
    import llama_cpp
    texts = json.loads(Path(a.texts).read_text(encoding="utf-8")) if a.texts else lv.TEXTS
    metas = cases(a.smol, a.minilm, a.gemma)
    if a.cases:
        metas = {k: v for k, v in metas.items() if k in a.cases.split(",")}
    data = {"about": "Token ids recorded FROM llama.cpp (llama-cpp-python "
                     f"{llama_cpp.__version__}: Llama(path, vocab_only=True).tokenize(text, add_bos=False, "
                     "special=False); add_bos_ids with add_bos=True for the first texts) by "
                     "tests/data_gen/llama_cpp_tokens.py; the vocabularies are those of "
                     "tests/data_gen/llama_vocab.py. The reference for tests/test_tokenizer_llama.py.",
            "llama_cpp_python": llama_cpp.__version__, "texts": texts, "cases": record(metas, texts)}
    Path(a.out).write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
