"""Shared fixtures: a tiny random BERT and a tiny random Llama saved as real local HF model directories, a small
labelled CSV, and an isolated cache directory. Real torch/transformers throughout."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from tests.helpers import toy_prompts, write_tiny_bert, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A random BertConfig(hidden 32, 2 layers) with MiniLM's real tokenizer, saved to disk."""
    out = tmp_path_factory.mktemp("tiny-bert")
    write_tiny_bert(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random LlamaConfig(hidden 32, 2 layers) causal LM with a BPE tokenizer that has no pad token, saved to disk."""
    out = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_llama(out)
    return str(out)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> str:
    """240 short prompts, half 'harmful' half 'benign', from two disjoint vocabularies."""
    rows = [(t, label, "forum" if i % 3 else "chat") for i, (t, label) in enumerate(toy_prompts())]
    path = tmp_path_factory.mktemp("toy") / "prompts.csv"
    path.write_text("text,label,origin\n" + "\n".join(f'"{t}",{l},{s}' for t, l, s in rows) + "\n")
    return str(path)


@pytest.fixture()
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture()
def tiny_overrides(tiny_backbone, toy_csv, cache_dir) -> dict:
    """TrainConfig fields for a fast run on the tiny model and the toy CSV."""
    return {
        "backbone": tiny_backbone,
        "cache_dir": cache_dir,
        "data": {"name": toy_csv, "max_len": 16},
        "teacher": {"epochs": 2, "lr": 1e-3},
        "head_hidden": 32,
        "budget_steps": 12,
        "batch_size": 32,
        "log_every": 4,
    }
