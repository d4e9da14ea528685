"""Shared fixtures: tiny random Qwen3 models on the toy tokenizer, saved like hub checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def toy_tokenizer():
    from opdcli.toy.tokenizer import build_toy_tokenizer

    return build_toy_tokenizer()


def save_tiny_model(path: Path, tokenizer, hidden: int = 32, layers: int = 1, seed: int = 0) -> Path:
    from opdcli.loops.toy_build import init_model

    model = init_model(tokenizer, hidden, layers, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, toy_tokenizer) -> dict[str, Path]:
    """A tiny student and a slightly larger teacher, randomly initialised, saved to disk."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "student": save_tiny_model(root / "student", toy_tokenizer, 32, 1, seed=1),
        "teacher": save_tiny_model(root / "teacher", toy_tokenizer, 48, 1, seed=2),
    }
