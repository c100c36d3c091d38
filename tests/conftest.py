"""Shared fixtures. Model-backed fixtures are session-scoped: model start-up dominates test time."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Point the request cache at a per-test folder (the embedded model stays in the shared cache)."""
    monkeypatch.setenv("SYNTHLOOP_REQUEST_CACHE", str(tmp_path / "requests.sqlite"))
    return tmp_path / "requests.sqlite"
