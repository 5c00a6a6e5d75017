import pytest

import loader.fetch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skips cleanly without one)")
    config.addinivalue_line("markers", "slow: slow test")


@pytest.fixture(scope="session")
def default_gguf():
    return loader.fetch.default_model_path("decoder")


@pytest.fixture(scope="session")
def default_minilm():
    return loader.fetch.default_model_path("embedder")
