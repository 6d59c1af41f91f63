import dataclasses

import pytest

from model.config import GPTConfig
from model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def code_tokenizer() -> Tokenizer:
    """A small code vocabulary trained on a slice of the standard library."""
    from train.corpus import default_roots, python_sources

    return Tokenizer.train(python_sources(default_roots(), max_bytes=2 << 20), vocab_size=1024)


@pytest.fixture(scope="session")
def small_config(code_tokenizer) -> GPTConfig:
    """The tiny preset, shrunk in context so tests compile fast."""
    return dataclasses.replace(GPTConfig.tiny(vocab_size=len(code_tokenizer)), n_positions=128)
