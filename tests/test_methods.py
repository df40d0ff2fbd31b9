"""sot, hybrid and enchtable: their math on hand-built cases, and each trained end to end through
`alignsweep train` on the tiny random BERT and the toy prompts (real torch, POT, transformers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_cli import run_cli
from trainable.config import ConfigError, TrainConfig, deep_merge, load_train_config
from trainable.loop import method_stage, prepare_artifacts
from trainable.methods import joint_space, sot_weights

METRICS = ["accuracy", "kd_alignment", "teacher_agreement", "noise_robustness", "alignment_stability",
           "noisy_text_accuracy", "safety_score", "harmful_recall", "benign_pass_rate", "attack_success_rate"]


def _sot_case():
    """2-D features. Safe anchor: harmful prompts near 0 labelled harmful, benign ones near (3, 0). Harmful
    reference: harmful prompts near 0 labelled benign. Train: 20 + 20 items like the anchor, then 10
    poisoned ones, harmful prompts near 0 labelled benign: sitting on the harmful reference."""
    g = torch.Generator().manual_seed(0)
    near = lambda n, at: torch.randn(n, 2, generator=g) * 0.1 + torch.tensor(at)  # noqa: E731
    safe_x, safe_y = torch.cat([near(10, [0.0, 0.0]), near(10, [3.0, 0.0])]), torch.tensor([1] * 10 + [0] * 10)
    harm_x, harm_y = near(10, [0.0, 0.0]), torch.zeros(10, dtype=torch.long)
    x = torch.cat([near(20, [0.0, 0.0]), near(20, [3.0, 0.0]), near(10, [0.0, 0.0])])
    y = torch.tensor([1] * 20 + [0] * 20 + [0] * 10)
    space = lambda f, lab: joint_space(f, lab, 2, 1.0, x)  # noqa: E731
    return space(x, y), space(safe_x, safe_y), space(harm_x, harm_y)


def test_sot_weights_move_mass_away_from_items_on_the_harmful_reference():
    z, z_safe, z_harm = _sot_case()
    w = sot_weights(z, z_safe, z_harm, push=0.5, reg=0.05, temperature=0.1)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-9) and (w >= 0).all()
    on_reference, rest = w[40:], w[:40]
    assert on_reference.max() < 1 / len(w) and on_reference.max() < rest.min()  # below uniform and every other item
    assert on_reference.sum() < 0.1 * (10 / 50)  # under a tenth of their uniform share
    # the push itself moves mass: more lambda, less weight on the harmful reference
    no_push = sot_weights(z, z_safe, z_harm, push=0.0, reg=0.05, temperature=0.1)
    more_push = sot_weights(z, z_safe, z_harm, push=2.0, reg=0.05, temperature=0.1)
    assert more_push[40:].sum() < no_push[40:].sum()


def _cfg(base: dict, **over) -> TrainConfig:
    return TrainConfig.model_validate(deep_merge(base, over))


def test_method_knobs_are_refused_at_the_edge_naming_field_and_allowed_values(toy_csv):
    with pytest.raises(ConfigError, match=r"^method: .*allowed: ckt_ro, ce, kd, adv, sot"):
        load_train_config(overrides=["method=ot"])
    with pytest.raises(ConfigError, match=r"^sot.reg: .*allowed: > 0"):
        load_train_config(overrides=["method=sot", "sot.reg=0"])
    with pytest.raises(ConfigError, match=r"^sot.top_k: .*allowed: >= 1"):
        load_train_config(overrides=["sot.top_k=0"])
    with pytest.raises(ConfigError, match=r"^method: 'sot' needs harmful reference .*data.harmful_reference >= 1"):
        load_train_config(overrides=["method=sot", f"data.name={toy_csv}"])
    with pytest.raises(ConfigError, match=r"^method: 'sot' needs trusted items.*data.trusted_size >= 1"):
        load_train_config(overrides=["method=sot", "data.trusted_size=0"])
    with pytest.raises(ConfigError, match=r"^method: 'sot' .*allowed heads: linear, mlp"):
        load_train_config(overrides=["method=sot", "head=lora"])


@pytest.fixture()
def method_overrides(tiny_overrides) -> dict:
    return deep_merge(tiny_overrides, {"data": {"poison_rate": 0.2, "harmful_reference": 16, "trusted_size": 16}})


def test_sot_stage_weighs_poisoned_items_down_on_real_features(method_overrides):
    cfg = _cfg(method_overrides, method="sot")
    art = prepare_artifacts(cfg)
    w = method_stage(cfg, art)["sample_weight"]
    poisoned = art.splits.poisoned
    assert len(w) == len(art.labels["train"]) and w.mean().item() == pytest.approx(1.0, rel=1e-5)
    others = [i for i in range(len(w)) if i not in set(poisoned)]
    assert poisoned and w[poisoned].mean() < w[others].mean()
    top = method_stage(_cfg(method_overrides, method="sot", sot={"top_k": 40}), art)["rows"]
    assert len(top) == 40 and len(set(top.tolist()) & set(poisoned)) < 40 * len(poisoned) / len(w)


def cli_train(overrides: dict, method: str) -> dict:
    flat = {"backbone": overrides["backbone"], "cache_dir": overrides["cache_dir"],
            "data.name": overrides["data"]["name"], "data.max_len": 16, "data.harmful_reference": 16,
            "data.trusted_size": 16, "teacher.epochs": 2, "teacher.lr": 1e-3, "head_hidden": 32,
            "budget_steps": 12, "batch_size": 32}
    args = [a for k, v in flat.items() for a in ("--set", f"{k}={v}")]
    out = run_cli("train", *args, "--set", f"method={method}", "--set", "data.poison_rate=0.2", "--json", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("method", ["sot"])
def test_method_trains_end_to_end_through_the_cli_and_prints_every_metric(tiny_overrides, method):
    final = cli_train(tiny_overrides, method)
    for name in METRICS:
        for key in (name, f"test_{name}"):
            assert math.isfinite(final[key]) and 0.0 <= final[key] <= 100.0, key
