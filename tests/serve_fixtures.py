"""Fixtures for the server tests: a tiny random Llama (and BERT) written at test time, loaded once.

The tiny GGUF of tests/data_gen has standard-normal embeddings tied to the output, which makes its
next-token distribution nearly one-hot (every sampled run is the greedy one); here the embedding table
is scaled down so that sampling, seeds and logprobs have something to show.
"""
import numpy as np
import pytest

from tests.data_gen import tiny_models


def write_tiny_chat_gguf(path, embed_scale: float = 0.1, seed: int = 0):
    orig = tiny_models.tiny_llama_weights

    def scaled(vocab, tied, seed=seed):
        w = orig(vocab, tied, seed)
        w["token_embd.weight"] = (w["token_embd.weight"] * embed_scale).astype(np.float32)
        return w
    tiny_models.tiny_llama_weights = scaled
    try:
        return tiny_models.write_tiny_gguf(path, default_type="F32", tied=True)
    finally:
        tiny_models.tiny_llama_weights = orig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import engine
    path = tmp_path_factory.mktemp("tinyllm") / "tiny-chat.gguf"
    write_tiny_chat_gguf(path)
    m = engine.load(path, wbits=8, progress=False, threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    from engine.embed import load_embedder
    d = tmp_path_factory.mktemp("tinybert")
    tiny_models.write_tiny_bert(d)
    e = load_embedder(d, threads=1)
    yield e
    e.close()
