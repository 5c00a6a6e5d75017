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
