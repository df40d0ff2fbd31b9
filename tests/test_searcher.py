"""The driver at ~1,000 trials (benchmarks/scale.py, issue 13 item 5): the cached TPE suggests
exactly what Optuna's TPE does, a searcher save holds only the trials still in flight, and Tune's
driver snapshots keep their 1 s period until a save gets slow."""

from __future__ import annotations

import os
import pickle
import random

import pytest

import optuna
from optuna.trial import TrialState

import sweeps.searcher as ss
from sweeps.spec import load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _drive(sampler: optuna.samplers.BaseSampler, trials: int = 60, pending: int = 4) -> list[dict]:
    """The default space, multi-objective, ``pending`` trials in flight (constant liar sees them),
    one trial in ten failed: the same arrival order for any sampler."""
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    space = {"distill_weight": optuna.distributions.FloatDistribution(0.05, 10.0, log=True),
             "epsilon": optuna.distributions.FloatDistribution(0.0, 0.2),
             "precision": optuna.distributions.CategoricalDistribution(["fp32", "bf16"]),
             "budget_steps": optuna.distributions.CategoricalDistribution([100, 200, 400])}
    rng, inflight, asked = random.Random(0), [], []
    for i in range(trials):
        trial = study.ask(space)
        asked.append(dict(trial.params))
        inflight.append(trial)
        if len(inflight) >= pending:
            done = inflight.pop(0)
            if i % 10 == 3:
                study.tell(done, state=TrialState.FAIL)
            else:
                study.tell(done, [100 * rng.random(), 100 * rng.random()])
    return asked


def test_cached_tpe_suggests_what_optuna_tpe_suggests():
    kwargs = dict(seed=7, multivariate=True, constant_liar=True, n_startup_trials=10)
    plain = _drive(optuna.samplers.TPESampler(**kwargs))
    cached = _drive(ss.CachedTPESampler(**kwargs))
    assert len(plain) == 60 and plain == cached  # float for float, past the 10 startup trials
    assert len({p["distill_weight"] for p in plain}) == 60  # and the sampler did sample


def test_make_sampler_uses_the_cached_tpe_and_it_pickles_without_its_rows():
    spec = load_spec("pareto")
    sampler = ss.make_sampler(spec)
    assert isinstance(sampler, ss.CachedTPESampler)
    _drive(sampler, trials=20)
    assert sampler._rows and pickle.loads(pickle.dumps(sampler))._rows == {}


def test_searcher_save_keeps_only_trials_in_flight(tmp_path):
    spec = load_spec("pareto")
    searcher = ss.SweepSearcher(metric=spec.metrics, mode=spec.modes, sampler=ss.make_sampler(spec),
                                storage=ss.study_storage(str(tmp_path / ss.JOURNAL)), study_name="s", max_trials=10)
    searcher.set_search_properties(None, None, ss.param_space(spec))
    for i in range(6):
        searcher.suggest(f"t{i}")
    for i in range(4):
        searcher.on_trial_complete(f"t{i}", {"kd_alignment": 50.0 + i, "noise_robustness": 40.0})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = ss.SweepSearcher(metric=spec.metrics, mode=spec.modes, sampler=ss.make_sampler(spec), max_trials=10)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored._ot_trials) == {"t4", "t5"}
    assert restored.owned_trial_numbers() == searcher.owned_trial_numbers() == {4, 5}
    # a told trial that a resumed Tune reports again is still ignored, and the study is intact
    restored.on_trial_complete("t1", {"kd_alignment": 0.0, "noise_robustness": 0.0})
    states = [t.state for t in restored.study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.RUNNING) == 2
    assert restored.study.trials[1].values == [51.0, 40.0]


def test_driver_snapshots_every_second_until_a_save_takes_over_a_twentieth_of_that():
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from sweeps.tune import pace_driver_snapshots

    pace_driver_snapshots()
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "auto"  # the sweeps' default (sweeps/__init__.py)
    paced = _ExperimentCheckpointManager(storage=None, checkpoint_period="auto")
    paced._update_auto_checkpoint_time(0.01)
    assert paced._checkpoint_period == 1.0  # Tune's own "auto" would say 10 s
    paced._update_auto_checkpoint_time(0.2)
    assert paced._checkpoint_period == pytest.approx(3.8)
    fixed = _ExperimentCheckpointManager(storage=None, checkpoint_period=5)  # a user's number stays
    fixed._update_auto_checkpoint_time(0.2)
    assert fixed._checkpoint_period == 5.0


def test_orphans_that_finished_their_run_are_adopted_and_the_rest_fail():
    """After a driver kill: a RUNNING Optuna trial Tune no longer owns takes the values of its finished
    MLflow run (matched by the Tune trial id the searcher stored on it), one without a finished run
    is FAIL (orphaned), one Tune still owns stays RUNNING."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    trials = [study.ask() for _ in range(3)]
    for t, tid in zip(trials, ("done", "lost", "owned")):
        t.set_user_attr(ss.TUNE_TRIAL_ATTR, tid)
    failed = ss.fail_orphaned_trials(study, owned={trials[2].number},
                                     finished={"done": [97.5, 61.0], "lost": [float("nan"), 1.0]})
    states = [t.state for t in study.trials]
    assert failed == 1 and states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]
    assert study.trials[0].values == [97.5, 61.0] and study.trials[0].user_attrs["adopted"]
    assert study.trials[1].user_attrs["orphaned"] and "adopted" not in study.trials[1].user_attrs
