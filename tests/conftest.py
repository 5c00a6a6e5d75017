"""Shared fixtures. The real default models are fetched once per session (cached across runs)."""
import pytest


@pytest.fixture(scope="session")
def default_gguf():
    from loader.fetch import default_model_path
    return default_model_path("decoder")


@pytest.fixture(scope="session")
def default_minilm():
    from loader.fetch import default_model_path
    return default_model_path("embedder")


@pytest.fixture(scope="session")
def llama_python():
    """The interpreter with llama-cpp-python (the oracle, never a runtime dependency); skips without it."""
    from tools.bench.peers import find_llama
    py, note = find_llama()
    if py is None:
        pytest.skip(note)
    return py
