"""Shared fixtures. Model-backed fixtures are session-scoped: model start-up dominates test time."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from synthloop.core.models import prepare_embedded
    return AutoTokenizer.from_pretrained(prepare_embedded())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer):
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a local HF folder."""
    from tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer)
