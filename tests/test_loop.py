"""The training loop on a tiny random BERT and a small local CSV: resume, divergence, precision,
baselines, and every metric on a 0..100 scale."""

import math

import pytest
import torch

from trainable import backbone as bb
from trainable.config import TrainConfig, deep_merge
from trainable.loop import Diverged, prepare_artifacts, train_loop
from trainable.backbone import CACHE_STATS
from trainable.teacher import CACHE_STATS as TEACHER_STATS

METRICS = ["accuracy", "kd_alignment", "teacher_agreement", "noise_robustness", "alignment_stability",
           "noisy_text_accuracy", "safety_score", "harmful_recall", "benign_pass_rate", "attack_success_rate"]


def _cfg(base: dict, **over) -> TrainConfig:
    return TrainConfig.model_validate(deep_merge(base, over))


class Recorder:
    def __init__(self):
        self.metrics, self.checkpoints = [], []

    def __call__(self, metrics, checkpoint=None):
        self.metrics.append(dict(metrics))
        if checkpoint is not None:
            self.checkpoints.append(checkpoint)


def _state(path):
    return torch.load(path / "state.pt", weights_only=True)["student"]


def test_full_method_reports_every_metric_on_0_100(tiny_overrides):
    rec = Recorder()
    final = train_loop(_cfg(tiny_overrides), rec)
    for name in METRICS:
        assert 0.0 <= final[name] <= 100.0, name
    steps = [m["step"] for m in rec.metrics]
    assert steps == [4, 8, 12]  # progress every log_every, real step numbers, final at the budget
    assert all(k in rec.metrics[0] for k in ("loss", "l_kd", "l_nr", "l_reg", "grad_norm"))
    assert rec.metrics[0]["l_reg"] > 0 and rec.metrics[0]["l_kd"] > 0


def test_resume_reproduces_the_uninterrupted_run(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, budget_steps=10, checkpoint_every=4, perturb={"kind": "gaussian"})
    full = Recorder()
    train_loop(cfg, full, checkpoint_root=tmp_path / "a")
    mid = next(c for c in full.checkpoints if c.name == "step_000004")
    resumed = Recorder()
    train_loop(cfg, resumed, resume_from=mid, checkpoint_root=tmp_path / "b")
    assert resumed.metrics[0]["step"] == 8  # picks up after step 4, logs at the next multiple of 4
    a, b = _state(full.checkpoints[-1]), _state(resumed.checkpoints[-1])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # a run that did not resume would differ from both: check the checkpoint mattered
    assert not torch.equal(_state(mid)[next(iter(a))], a[next(iter(a))])


def test_divergence_names_step_and_term(tiny_overrides):
    cfg = _cfg(tiny_overrides, lr=1e30, clip_grad_norm=None, budget_steps=50, lambda_reg=1e30)
    with pytest.raises(Diverged) as info:
        train_loop(cfg, Recorder())
    assert info.value.step >= 1 and info.value.term in ("loss", "l_kd", "l_nr", "l_reg")
    assert f"step {info.value.step}" in str(info.value)


def test_bf16_runs_on_cpu(tiny_overrides):
    final = train_loop(_cfg(tiny_overrides, precision="bf16"), Recorder())
    assert all(math.isfinite(final[m]) for m in METRICS)


@pytest.mark.parametrize("method", ["ce", "kd", "adv"])
def test_baselines_log_exactly_their_terms(tiny_overrides, method):
    rec = Recorder()
    train_loop(_cfg(tiny_overrides, method=method, budget_steps=4), rec)
    first = rec.metrics[0]
    assert (first["l_kd"] > 0) == (method == "kd")
    assert (first["l_reg"] > 0) == (method in ("kd", "adv"))


@pytest.mark.parametrize("over", [
    {"head": "linear", "perturb": {"kind": "fgsm", "norm": "linf"}},
    {"perturb": {"space": "embeddings", "steps": 2}},
    {"head": "lora", "lora_rank": 2},
])
def test_heads_and_spaces_train(tiny_overrides, over):
    final = train_loop(_cfg(tiny_overrides, budget_steps=4, **over), Recorder())
    assert 0.0 <= final["accuracy"] <= 100.0


def test_shared_artifacts_are_cached(tiny_overrides):
    cfg = _cfg(tiny_overrides)
    before = dict(CACHE_STATS)
    prepare_artifacts(cfg)
    prepare_artifacts(cfg)
    assert CACHE_STATS["feature_misses"] - before["feature_misses"] == 1
    assert CACHE_STATS["feature_hits"] - before["feature_hits"] == 1


def test_final_checkpoint_holds_per_item_outcomes_that_reproduce_the_metrics(tiny_overrides, tmp_path):
    import json

    from trainable.metrics import item_metrics

    rec = Recorder()
    final = train_loop(_cfg(tiny_overrides, budget_steps=4), rec, checkpoint_root=tmp_path)
    items = json.loads((rec.checkpoints[-1] / "eval_items.json").read_text())
    again = item_metrics(items, items["label_names"])  # the items are test's: they give the test_* metrics
    assert {f"test_{k}" for k in again} == {k for k in final if k.startswith("test_")}
    for k in again:
        assert again[k] == pytest.approx(final[f"test_{k}"], abs=1e-9)
    assert len(items["y"]) == len(items["js"]) == len(items["pred_attacked"])


def test_validation_under_plain_names_test_under_test_names_and_rungs_report_validation(tiny_overrides, tmp_path):
    """The searcher's metrics are validation's; test is the report; eval_at adds validation mid-training."""
    from trainable.loop import evaluate_split

    cfg = _cfg(tiny_overrides, budget_steps=6)
    art = prepare_artifacts(cfg)
    assert len(art.inputs["val_noisy"]["features"]) == len(art.labels["val"])
    assert art.splits.texts["val"] != art.splits.texts["test"]
    rec = Recorder()
    final = train_loop(cfg, rec, artifacts=art, eval_at=[2, 4, 6, 9])
    plain = {k for k in final if not k.startswith("test_") and k in ("accuracy", "kd_alignment", "noise_robustness",
                                                                      "alignment_stability", "noisy_text_accuracy")}
    assert len(plain) == 5 and all(f"test_{k}" in final for k in plain)
    assert any(final[k] != final[f"test_{k}"] for k in plain)  # two different splits
    # a rung at or past the budget is no rung: the final evaluation is the trial's last word
    rungs = [m for m in rec.metrics if "kd_alignment" in m and m["step"] < 6]
    assert [m["step"] for m in rungs] == [2, 4]
    assert all("test_kd_alignment" not in m for m in rungs)  # rungs never look at test

    # the final validation numbers are validation's: re-evaluating the trained head on val gives them
    ckpt_rec = Recorder()
    train_loop(cfg, ckpt_rec, artifacts=art, checkpoint_root=tmp_path)
    student = bb.build_student(cfg.head, cfg.head_hidden, art.inputs["train"]["features"].shape[1],
                               art.splits.num_classes, None, cfg.lora_rank)
    student.load_trainable_state(torch.load(ckpt_rec.checkpoints[-1] / "state.pt", weights_only=True)["student"])
    again, _ = evaluate_split(student, art, "val", cfg, "cpu")
    assert again["kd_alignment"] == pytest.approx(final["kd_alignment"], abs=1e-6)


def test_label_noise_levels_share_features_and_teacher(tiny_overrides):
    before, t_before = dict(CACHE_STATS), dict(TEACHER_STATS)
    for noise in (0.0, 0.2):
        prepare_artifacts(_cfg(tiny_overrides, data={"label_noise": noise}))
    assert CACHE_STATS["feature_misses"] - before["feature_misses"] == 1
    assert TEACHER_STATS["teacher_misses"] - t_before["teacher_misses"] == 1


def test_checkpoints_without_a_root_are_removed_when_the_loop_ends(tiny_overrides):
    """A sweep runs thousands of loops on one node: their temporary checkpoints must not pile up."""
    seen = []

    def report(metrics, checkpoint=None):
        if checkpoint is not None:
            assert (checkpoint / "state.pt").is_file()  # alive while the caller copies it
            seen.append(checkpoint)

    train_loop(_cfg(tiny_overrides, budget_steps=8, checkpoint_every=4), report)
    assert [c.name for c in seen] == ["step_000004", "step_000008"]
    assert not seen[0].parent.exists()


# -- the frozen backbone stays frozen; checkpoints resume exactly and strictly ------------------------


def _student_and_batch(cfg):
    from trainable import backbone as bb

    art = prepare_artifacts(cfg)
    encoder = bb.Encoder(bb.load_backbone(cfg.backbone)[1], cfg.pooling)
    student = bb.build_student(cfg.head, cfg.head_hidden, art.inputs["train"]["features"].shape[1],
                               art.splits.num_classes, encoder, cfg.lora_rank)
    idx = torch.arange(cfg.batch_size)
    batch = {k: v[idx] for k, v in art.inputs["train"].items()}
    return student, batch, art.labels["train"][idx], art.teacher["train"][idx]


@pytest.mark.parametrize("over", [{"perturb": {"space": "embeddings", "steps": 2}}, {"head": "lora", "lora_rank": 2}])
def test_train_step_keeps_the_backbone_in_eval_mode(tiny_overrides, over):
    """Dropout in the frozen backbone would make PGD climb a loss resampled at every forward."""
    from trainable.loop import train_step

    cfg = _cfg(tiny_overrides, **over)
    student, batch, y, z_t = _student_and_batch(cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    train_step(cfg, student, opt, torch.amp.GradScaler("cuda", enabled=False), batch, y, z_t, step=0)
    assert student.training and student.head.training
    assert student.encoder.training is False
    assert [n for n, m in student.encoder.named_modules() if m.training] == []
    # and so the backbone is a deterministic function while the head trains
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        first = student.encoder.pool_embeddings(student.encoder.embed(ids), mask)
        again = student.encoder.pool_embeddings(student.encoder.embed(ids), mask)
    assert torch.equal(first, again)


def test_resume_in_embedding_space_reproduces_the_uninterrupted_run_exactly(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, budget_steps=8, checkpoint_every=4, perturb={"space": "embeddings", "steps": 2})
    full = Recorder()
    final_full = train_loop(cfg, full, checkpoint_root=tmp_path / "a")
    mid = next(c for c in full.checkpoints if c.name == "step_000004")
    resumed = Recorder()
    final_resumed = train_loop(cfg, resumed, resume_from=mid, checkpoint_root=tmp_path / "b")
    assert [m["step"] for m in resumed.metrics] == [8]  # only the steps after the checkpoint ran
    assert final_resumed == final_full
    a, b = _state(full.checkpoints[-1]), _state(resumed.checkpoints[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(_state(mid)[k], a[k]) for k in a)  # the last 4 steps did change theta
    saved = torch.load(mid / "state.pt", weights_only=True)
    assert {"rng", "scaler", "optimizer", "student", "step"} <= saved.keys()


def test_rng_state_round_trips():
    from trainable.loop import rng_state, set_rng_state

    state = rng_state()
    drawn = torch.rand(4)
    set_rng_state(state)
    assert torch.equal(torch.rand(4), drawn)


def test_a_checkpoint_with_a_missing_or_extra_key_is_refused(tiny_overrides, tmp_path):
    from trainable.backbone import CheckpointMismatch, build_student

    student = build_student("mlp", 8, 4, 2, None, 2)
    state = student.trainable_state()
    first = next(iter(state))
    with pytest.raises(CheckpointMismatch, match=f"missing trainable keys: {first}; unexpected keys: none"):
        student.load_trainable_state({k: v for k, v in state.items() if k != first})
    with pytest.raises(CheckpointMismatch, match="missing trainable keys: none; unexpected keys: head.9.weight"):
        student.load_trainable_state(state | {"head.9.weight": torch.zeros(1)})
    other = build_student("mlp", 8, 4, 2, None, 2)
    other.load_trainable_state(state)
    assert all(torch.equal(other.trainable_state()[k], v) for k, v in state.items())

    # and through a resume: a tampered checkpoint is refused, not half-loaded
    cfg = _cfg(tiny_overrides, budget_steps=4)
    rec = Recorder()
    train_loop(cfg, rec, checkpoint_root=tmp_path / "run")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    saved = torch.load(rec.checkpoints[-1] / "state.pt", weights_only=True)
    saved["student"]["encoder.model.pooler.dense.weight"] = torch.zeros(1)  # a frozen weight that is never saved
    torch.save(saved, tampered / "state.pt")
    with pytest.raises(CheckpointMismatch, match="unexpected keys: encoder.model.pooler.dense.weight"):
        train_loop(_cfg(tiny_overrides, budget_steps=8), Recorder(), resume_from=tampered)
