"""Packed trials (issue 15): K heads stepped as one vectorised program give each member exactly the run it
would have alone (same seed, batches and delta), on the tiny BERT's cached features."""

import math

import pytest
import torch

from trainable.config import TrainConfig, deep_merge
from trainable.loop import Diverged, prepare_artifacts, train_loop
from trainable.packed import Member, Pack, group_key, train_packed

# Four members that differ in every per-member knob: method (so the terms switched on), searched
# scalars, lr, seed and budget. Budgets differ so members leave the pack at different steps.
MEMBERS = [
    {"method": "ckt_ro", "distill_weight": 1.0, "epsilon": 0.1, "alpha": 0.5, "lambda_reg": 0.05, "seed": 0,
     "budget_steps": 12},
    {"method": "ckt_ro", "distill_weight": 3.0, "epsilon": 0.3, "alpha": 0.2, "lambda_reg": 0.0, "seed": 1,
     "budget_steps": 9, "lr": 3e-3, "tau": 4.0},
    {"method": "adv", "epsilon": 0.05, "alpha": 0.8, "lambda_reg": 0.5, "seed": 2, "budget_steps": 12,
     "clip_grad_norm": 0.05},
    {"method": "kd", "distill_weight": 0.5, "seed": 3, "budget_steps": 7, "weight_decay": 0.1},
]


def _cfg(base: dict, **over) -> TrainConfig:
    return TrainConfig.model_validate(deep_merge(base, over))


class Recorder:
    def __init__(self):
        self.metrics, self.checkpoints = [], []

    def __call__(self, metrics, checkpoint=None):
        self.metrics.append(dict(metrics))
        if checkpoint is not None:
            self.checkpoints.append(checkpoint)


def _state(ckpt):
    return torch.load(ckpt / "state.pt", weights_only=True)


def _assert_same_run(solo: Recorder, packed: Recorder, atol: float = 1e-5):
    """Same reports at the same steps with the same values, and the same final theta and AdamW state."""
    assert [m["step"] for m in packed.metrics] == [m["step"] for m in solo.metrics]
    for a, b in zip(solo.metrics, packed.metrics):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=atol), k
    sa, sb = _state(solo.checkpoints[-1]), _state(packed.checkpoints[-1])
    assert sa["step"] == sb["step"]
    for k in sa["student"]:
        torch.testing.assert_close(sb["student"][k], sa["student"][k], rtol=1e-4, atol=atol)
    for i, s in sa["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb["optimizer"]["state"][i][k], s[k], rtol=1e-4, atol=atol)
        assert float(sb["optimizer"]["state"][i]["step"]) == float(s["step"])


@pytest.mark.parametrize("kind", ["pgd", "gaussian"])
def test_a_pack_of_four_equals_four_solo_runs(tiny_overrides, tmp_path, kind):
    base = deep_merge(tiny_overrides, {"perturb": {"kind": kind}, "checkpoint_every": 4})
    configs = [_cfg(base, **m) for m in MEMBERS]
    art = prepare_artifacts(configs[0])
    solo = []
    for i, c in enumerate(configs):
        rec = Recorder()
        rec.final = train_loop(c, rec, artifacts=art, checkpoint_root=tmp_path / f"solo{i}", eval_at=[6])
        solo.append(rec)
    recs = [Recorder() for _ in configs]
    members = [Member(c, r, eval_at=[6], name=f"m{i}") for i, (c, r) in enumerate(zip(configs, recs))]
    finals = train_packed(members, art, tmp_path / "pack")
    for s, p, final in zip(solo, recs, finals):
        _assert_same_run(s, p)
        assert final == pytest.approx(s.final, abs=1e-6)  # every metric, validation and test
    # the members really differ from each other: a pack that trained one config four times would fail above
    w = [_state(r.checkpoints[-1])["student"]["head.0.weight"] for r in recs]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[2], w[3])


def test_a_member_that_joins_late_pauses_or_resumes_from_a_solo_checkpoint_runs_its_own_run(tiny_overrides, tmp_path):
    base = deep_merge(tiny_overrides, {"checkpoint_every": 4})
    a, b = _cfg(base, seed=5, budget_steps=10), _cfg(base, seed=6, budget_steps=10, epsilon=0.2)
    art = prepare_artifacts(a)
    solo_a, solo_b = Recorder(), Recorder()
    train_loop(a, solo_a, artifacts=art, checkpoint_root=tmp_path / "sa")
    train_loop(b, solo_b, artifacts=art, checkpoint_root=tmp_path / "sb")
    mid = next(c for c in solo_b.checkpoints if c.name == "step_000004")

    pack = Pack(art, tmp_path / "pack")
    ra, rb = Recorder(), Recorder()
    pack.add(Member(a, ra, name="a"))
    for _ in range(3):  # a is 3 steps in when b joins, resumed at its step 4
        pack.step()
    pack.add(Member(b, rb, resume_from=mid, name="b"))
    pack.members[0].paused = True  # a waits (on a scheduler's decision) while b steps alone
    pack.step()
    pack.step()
    pack.members[0].paused = False
    while len(pack):
        pack.step()
    _assert_same_run(solo_a, ra)
    assert rb.metrics[0]["step"] == 8  # picks up after step 4, as the solo resume does
    solo_tail = Recorder()
    solo_tail.metrics = [m for m in solo_b.metrics if m["step"] > 4]
    solo_tail.checkpoints = solo_b.checkpoints[-1:]
    _assert_same_run(solo_tail, rb)


def test_a_member_that_diverges_leaves_alone_and_the_others_are_unchanged(tiny_overrides, tmp_path):
    good = _cfg(tiny_overrides, seed=1)
    bad = _cfg(tiny_overrides, lr=1e30, clip_grad_norm=None, budget_steps=50, lambda_reg=1e30)
    art = prepare_artifacts(good)
    with pytest.raises(Diverged) as solo_err:
        train_loop(bad, Recorder(), artifacts=art)
    solo = Recorder()
    train_loop(good, solo, artifacts=art, checkpoint_root=tmp_path / "solo")
    packed = Recorder()
    out = train_packed([Member(bad, Recorder(), name="bad"), Member(good, packed, name="good")], art, tmp_path / "p")
    assert isinstance(out[0], Diverged)
    assert (out[0].step, out[0].term) == (solo_err.value.step, solo_err.value.term)
    assert math.isfinite(out[1]["kd_alignment"])
    _assert_same_run(solo, packed)


def test_what_cannot_pack_is_named_and_shapes_split_packs(tiny_overrides):
    assert _cfg(tiny_overrides).unpackable() is None
    why = TrainConfig(method="enchtable").unpackable()  # the built-in safety data has a harmful reference
    assert "method" in why and "ckt_ro" in why
    assert "head" in _cfg(tiny_overrides, head="lora").unpackable()
    assert "embeddings" in _cfg(tiny_overrides, perturb={"space": "embeddings"}).unpackable()
    base = _cfg(tiny_overrides)
    assert group_key(base) == group_key(_cfg(tiny_overrides, distill_weight=7.0, seed=9, lr=0.1, budget_steps=3))
    for over in ({"head_hidden": 16}, {"head": "linear"}, {"precision": "bf16"}, {"perturb": {"kind": "fgsm"}},
                 {"batch_size": 16}):
        assert group_key(_cfg(tiny_overrides, **over)) != group_key(base), over
