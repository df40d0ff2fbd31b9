"""sot, hybrid and enchtable: their math on hand-built cases, and each trained end to end through
`alignsweep train` on the tiny random BERT and the toy prompts (real torch, POT, transformers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tests.test_cli import run_cli
from trainable.config import ConfigError, TrainConfig, deep_merge, load_train_config
from trainable.loop import method_stage, prepare_artifacts
from trainable.methods import (enchtable_merge, hybrid_target, hybrid_weights, interference, joint_space,
                               linearised_fit, sot_weights)

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


def test_hybrid_weights_grow_where_the_base_favours_the_unsafe_class():
    # the aligned teacher answers "harmful" (class 1) on every item, with the same confidence
    z_t = torch.tensor([[-2.0, 2.0]] * 4)
    # the base model: agrees (more sure than the teacher), agrees as much, unsure, and favours benign (unsafe)
    z_base = torch.tensor([[-4.0, 4.0], [-2.0, 2.0], [0.0, 0.0], [3.0, -3.0]])
    w = hybrid_weights(z_base, z_t, kappa=2.0, temperature=1.0)
    assert torch.all(w[1:] > w[:-1])  # strictly growing as the base drifts to the unsafe class
    assert w[1].item() == pytest.approx(1.0 + 2.0 * 0.5)  # Delta = 0: sigmoid(0) = 1/2
    assert 1.0 < w.min() and w.max() < 3.0  # within [1, 1 + kappa]
    delta = torch.log_softmax(z_base, -1)[3, 1] - torch.log_softmax(z_t, -1)[3, 1]
    assert w[3].item() == pytest.approx(1.0 + 2.0 * torch.sigmoid(-delta / 1.0).item(), rel=1e-6)
    assert torch.equal(hybrid_weights(z_base, z_t, kappa=0.0, temperature=1.0), torch.ones(4))
    # a lower temperature sharpens it: the unsafe item gets more, the over-sure one less
    sharp = hybrid_weights(z_base, z_t, kappa=2.0, temperature=0.25)
    assert sharp[3] > w[3] and sharp[0] < w[0]


def test_hybrid_target_mixes_the_teacher_with_the_trusted_label():
    z_t = torch.tensor([[1.0, -1.0], [1.0, -1.0], [0.5, 0.0]])
    p_t = torch.softmax(z_t / 2.0, -1)
    q = hybrid_target(z_t, 2.0, trusted=[1], trusted_labels=torch.tensor([1]), beta=0.25)
    torch.testing.assert_close(q[[0, 2]], p_t[[0, 2]])  # no trusted label: the teacher alone
    torch.testing.assert_close(q[1], 0.25 * p_t[1] + 0.75 * torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(q.sum(-1), torch.ones(3))


def _heads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(4, 3, generator=g), "0.bias": torch.randn(4, generator=g),
            "2.weight": torch.randn(2, 4, generator=g), "2.bias": torch.randn(2, generator=g)}


def test_enchtable_merge_with_beta_zero_returns_the_task_head_exactly():
    theta0, task, aligned, harmful = _heads(0), _heads(1), _heads(2), _heads(3)
    merged = enchtable_merge(theta0, task, aligned, harmful, beta=0.0, keep=0.5, interference_scale=200.0)
    assert merged.keys() == task.keys() and all(torch.equal(merged[k], task[k]) for k in task)
    # beta > 0: theta_0 + tau_t + exp(-I) * alpha * tau_s, alpha = beta * ||tau_t|| / ||tau_s|| per matrix
    merged = enchtable_merge(theta0, task, aligned, harmful, beta=0.3, keep=0.5, interference_scale=2.0)
    for k in task:
        tau_t, tau_s = task[k] - theta0[k], aligned[k] - harmful[k]
        alpha = 0.3 * tau_t.norm() / tau_s.norm()
        weight = torch.exp(-interference(tau_t, alpha * tau_s, 0.5, 2.0)).float() if tau_t.dim() == 2 else 1.0
        torch.testing.assert_close(merged[k], theta0[k] + tau_t + weight * alpha * tau_s)
        assert not torch.equal(merged[k], task[k])


def test_interference_matches_a_direct_computation_on_small_matrices():
    e = torch.eye(3, dtype=torch.float64)
    # orthogonal subspaces: U^T U = I and V^T V = I, so no interference
    t, s = 3.0 * torch.outer(e[0], e[0]), 2.0 * torch.outer(e[1], e[2])
    assert interference(t, s, keep=0.34, scale=200.0).item() == pytest.approx(0.0, abs=1e-12)
    # the same rank-1 direction u v^T with singular values 3 and 2: U = [u u], V^T = [v; v] (signs cancel), so
    # U^T U - I = V^T V - I = [[0, 1], [1, 0]], R = [[0, 1], [1, 0]] diag(3, 2) [[0, 1], [1, 0]] = diag(2, 3),
    # ||R||_1 = 5 over k^2 = 4 entries
    u, v = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.6, -0.8], dtype=torch.float64)
    assert interference(3 * torch.outer(u, v), 2 * torch.outer(u, v), keep=0.34, scale=1.0).item() == pytest.approx(5 / 4)
    assert interference(3 * torch.outer(u, v), -2 * torch.outer(u, v), keep=0.34, scale=200.0).item() == pytest.approx(250.0)
    # a general 3x2 pair, keep 1.0 (k = 4), against numpy's SVD and the formula written out element by element
    import numpy as np
    g = np.random.default_rng(0)
    a, b = g.normal(size=(3, 2)), g.normal(size=(3, 2))
    (u1, s1, v1), (u2, s2, v2) = np.linalg.svd(a, full_matrices=False), np.linalg.svd(b, full_matrices=False)
    U, S, Vt = np.hstack([u1, u2]), np.concatenate([s1, s2]), np.vstack([v1, v2])
    k = len(S)
    total = sum(abs(sum((U[:, i] @ U[:, m] - (i == m)) * S[m] * (Vt[m] @ Vt[j] - (m == j)) for m in range(k)))
                for i in range(k) for j in range(k))
    assert interference(torch.tensor(a), torch.tensor(b), keep=1.0, scale=7.0).item() == pytest.approx(7 * total / k**2)


def test_linearised_fit_is_ordinary_training_for_a_linear_head():
    torch.manual_seed(0)
    head, x, y = torch.nn.Linear(3, 2), torch.randn(20, 3), torch.randint(0, 2, (20,))
    theta0 = {n: p.detach().clone() for n, p in head.named_parameters()}
    lin = linearised_fit(head, theta0, x, lambda z: torch.nn.functional.cross_entropy(z, y), steps=25, lr=0.05)
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(theta0)
    opt = torch.optim.Adam(plain.parameters(), lr=0.05)
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in plain.named_parameters():
        torch.testing.assert_close(lin[n], p.detach(), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p.detach(), theta0[n]) for n, p in head.named_parameters())  # the head is untouched


def _cfg(base: dict, **over) -> TrainConfig:
    return TrainConfig.model_validate(deep_merge(base, over))


def test_method_knobs_are_refused_at_the_edge_naming_field_and_allowed_values(toy_csv):
    with pytest.raises(ConfigError, match=r"^method: .*allowed: ckt_ro, ce, kd, adv, sot, hybrid, enchtable"):
        load_train_config(overrides=["method=ot"])
    with pytest.raises(ConfigError, match=r"^sot.reg: .*allowed: > 0"):
        load_train_config(overrides=["method=sot", "sot.reg=0"])
    with pytest.raises(ConfigError, match=r"^sot.top_k: .*allowed: >= 1"):
        load_train_config(overrides=["sot.top_k=0"])
    with pytest.raises(ConfigError, match=r"^method: 'sot' needs harmful reference .*data.harmful_reference >= 1"):
        load_train_config(overrides=["method=sot", f"data.name={toy_csv}"])
    with pytest.raises(ConfigError, match=r"^method: 'enchtable' needs trusted items.*data.trusted_size >= 1"):
        load_train_config(overrides=["method=enchtable", "data.trusted_size=0"])
    with pytest.raises(ConfigError, match=r"^method: 'hybrid' .*allowed heads: linear, mlp"):
        load_train_config(overrides=["method=hybrid", "head=lora"])


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


def test_hybrid_stage_on_real_features_weights_kd_only_and_hits_the_trusted_items(method_overrides):
    cfg = _cfg(method_overrides, method="hybrid", hybrid={"beta": 0.0})
    art = prepare_artifacts(cfg)
    stage = method_stage(cfg, art)
    assert set(stage) == {"kd_weight", "kd_target"} and stage["kd_weight"].shape == (len(art.labels["train"]),)
    assert (stage["kd_weight"] >= 1.0).all() and (stage["kd_weight"] <= 1.0 + cfg.hybrid.kappa).all()
    clean = torch.tensor(art.splits.clean_train_labels)[art.splits.trusted]
    assert torch.equal(stage["kd_target"][art.splits.trusted].argmax(-1), clean)  # beta = 0: the verified label
    assert torch.equal(stage["kd_target"][art.splits.trusted].max(-1).values, torch.ones(len(clean)))


def test_enchtable_at_beta_zero_is_the_plain_ce_head_and_beta_moves_it(method_overrides):
    from trainable.loop import train_loop

    art = prepare_artifacts(_cfg(method_overrides))
    ce = train_loop(_cfg(method_overrides, method="ce"), lambda *a, **k: None, artifacts=art)
    off = train_loop(_cfg(method_overrides, method="enchtable", enchtable={"beta": 0.0}), lambda *a, **k: None,
                     artifacts=art)
    on = train_loop(_cfg(method_overrides, method="enchtable", enchtable={"beta": 2.0, "interference_scale": 0.0}),
                    lambda *a, **k: None, artifacts=art)
    assert off == ce  # the task head is the plain-CE fine-tune, and beta = 0 leaves it as it is
    assert on["kd_alignment"] != ce["kd_alignment"]


@pytest.mark.parametrize("method", ["sot", "hybrid", "enchtable"])
def test_method_trains_end_to_end_through_the_cli_and_prints_every_metric(tiny_overrides, method):
    final = cli_train(tiny_overrides, method)
    for name in METRICS:
        for key in (name, f"test_{name}"):
            assert math.isfinite(final[key]) and 0.0 <= final[key] <= 100.0, key


def test_a_sweep_with_method_in_its_space_finishes_every_method(tmp_path, tiny_backbone, toy_csv):
    from tests.test_sweep import runs_of, sweep, write_spec

    methods = ["ckt_ro", "ce", "sot", "hybrid", "enchtable"]
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="tiny_methods", trials=len(methods),
                      sampler={"kind": "grid", "seed": 0}, space={"method": {"kind": "grid", "values": methods}})
    body = yaml.safe_load(spec.read_text())
    body["train"]["data"].update({"poison_rate": 0.2, "harmful_reference": 16, "trusted_size": 16})
    spec.write_text(yaml.safe_dump(body))
    out, uri = sweep(tmp_path, spec, timeout=540)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert f"{len(methods)} finished, 0 failed" in out.stdout
    _, parents, children = runs_of(uri, "tiny_methods")
    assert sorted(c.data.params["method"] for c in children) == sorted(methods)
    for child in children:
        assert child.info.status == "FINISHED"
        assert all(0.0 <= child.data.metrics[f"test_{m}"] <= 100.0 for m in METRICS)

    # alignsweep compare: paired differences to ckt_ro for every method, and the methods' plane
    table = run_cli("compare", "--experiment", "tiny_methods", "--tracking-uri", uri, "--out",
                    str(tmp_path / "cmp" / "compare.md"), timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    for col in ("ckt_ro - ce", "ckt_ro - sot", "ckt_ro - hybrid", "ckt_ro - enchtable"):
        assert col in table.stdout
    for metric in ("kd_alignment", "noise_robustness", "harmful_recall", "attack_success_rate"):
        assert f"| {metric} |" in table.stdout
    png = tmp_path / "cmp" / "compare_front.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mlflow.tracking import MlflowClient

    assert "compare_front.png" in {a.path for a in MlflowClient(uri).list_artifacts(parents[0].info.run_id)}


def test_builtin_seed_methods_spec_covers_every_method_seed_split_and_poison_level():
    from sweeps.spec import load_spec

    spec = load_spec("seed_methods")
    assert spec.space["method"].values == list(TrainConfig.model_fields["method"].annotation.__args__)
    assert spec.space["data.poison_rate"].values == [0.0, 0.2] and spec.train["data"]["name"] == "safety"
    assert len(spec.space["seed"].values) == 5 and len(spec.space["data.split_seed"].values) == 3


def test_a_spec_searching_a_method_its_data_cannot_serve_is_refused_before_ray(tmp_path, tiny_backbone, toy_csv):
    from sweeps.spec import load_spec
    from tests.test_sweep import write_spec

    spec = write_spec(tmp_path, tiny_backbone, toy_csv, space={"method": {"kind": "choice", "values": ["ce", "sot"]}})
    with pytest.raises(ConfigError, match=r"^space.method: method: 'sot' needs harmful reference"):
        load_spec(spec)
    body = yaml.safe_load(spec.read_text())
    body["train"]["data"]["harmful_reference"] = 8
    body["space"]["sot.push"] = {"kind": "uniform", "low": -1.0, "high": 1.0}
    spec.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=r"^space.sot.push: sot.push: .*allowed: >= 0"):
        load_spec(spec)
    body["space"]["sot.push"]["low"] = 0.0
    spec.write_text(yaml.safe_dump(body))
    assert load_spec(spec).space["method"].values == ["ce", "sot"]  # every knob searchable, method too
