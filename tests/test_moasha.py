"""MO-ASHA (sweeps.moasha): the rung rule, the ordering, the continue/stop decision, rebuilding
from history, and one real Ray Tune run with the scheduler stopping dominated trials."""

from __future__ import annotations

import itertools
import math
import pickle
import threading

import moocore
import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from sweeps.moasha import MOASHA, Rungs, bracket_of, order, rung_steps, survives

MIXED = ["max", "min"]


def _trial(trial_id: str) -> Trial:
    return Trial("__fake", config={}, trial_id=trial_id, stub=True)


def _dominates(p, q, modes) -> bool:
    s = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    p, q = np.asarray(p) * s, np.asarray(q) * s
    return bool((p <= q).all() and (p < q).any())


# 1. rungs -------------------------------------------------------------------------------------

def test_rung_steps_brackets_and_budget():
    assert rung_steps(25, 3, 400) == [25, 75, 225]
    assert rung_steps(25, 3, 400, bracket=1) == [75, 225]
    assert rung_steps(25, 3, 400, bracket=2) == [225]
    assert rung_steps(25, 3, 400, bracket=3) == []
    # a budget ending at a rung: that rung is the trial's last step, never a pruning point
    assert rung_steps(25, 3, 225) == [25, 75]
    assert rung_steps(25, 3, 226) == [25, 75, 225]
    assert rung_steps(25, 3, 25) == []
    assert rung_steps(25, 3, 10) == []
    assert rung_steps(10, 2, 100) == [10, 20, 40, 80]
    # float factors give whole, strictly increasing steps
    assert rung_steps(1, 1.2, 4) == [1, 2, 3]
    with pytest.raises(ValueError):
        rung_steps(25, 1, 400)


def test_bracket_is_a_stable_function_of_the_trial_id():
    ids = [f"{i:05d}_trial" for i in range(60)]
    first = [bracket_of(t, 3) for t in ids]
    assert first == [bracket_of(t, 3) for t in ids]
    assert set(first) == {0, 1, 2}
    assert {bracket_of(t, 1) for t in ids} == {0}


def test_report_off_the_trials_bracket_rungs_is_ignored():
    sched = MOASHA(["a", "b"], MIXED, grace_steps=25, reduction_factor=3, brackets=2)
    in_b1 = next(f"t{i}" for i in itertools.count() if bracket_of(f"t{i}", 2) == 1)
    # step 25 is a rung of bracket 0 only; 75 is the first rung of bracket 1
    result = {"rung_step": 25, "a": 0.0, "b": 1.0}
    assert sched.on_trial_result(None, _trial(in_b1), result) == TrialScheduler.CONTINUE
    assert sched.rungs.counts() == {}
    sched.on_trial_result(None, _trial(in_b1), {**result, "rung_step": 75})
    assert sched.rungs.counts() == {1: {75: 1}}


# 2. ordering ----------------------------------------------------------------------------------

def test_order_ranks_respect_dominance_with_mixed_modes():
    # a is maximised, b minimised
    pts = np.array([
        [0.9, 0.6],  # 0: front
        [0.8, 0.0],  # 1: front
        [0.5, 0.7],  # 2: dominated by 0, 1 and 3 -> rank 2
        [0.7, 0.1],  # 3: dominated by 1 only -> rank 1
        [0.2, 0.9],  # 4: dominated by everyone -> rank 3
    ])
    # front layer (minimisation) (-0.9, 0.6), (-0.8, 0.0), ref (0.2, 1.6):
    # contributions 0.1 * 1.0 = 0.1 and 1.0 * 0.6 = 0.6, so point 1 first
    assert order(pts, MIXED).tolist() == [1, 0, 3, 2, 4]
    # the same points read as max/max are ordered otherwise: modes matter
    assert order(pts, ["max", "max"]).tolist() != [1, 0, 3, 2, 4]

    rng = np.random.default_rng(0)
    cloud = rng.random((40, 2))
    pos = np.empty(40, dtype=int)
    pos[order(cloud, MIXED)] = np.arange(40)
    for i, j in itertools.permutations(range(40), 2):
        if _dominates(cloud[i], cloud[j], MIXED):
            assert pos[i] < pos[j]


def test_hv_contribution_breaks_ties_within_a_layer():
    # (min, min) layer, ref = worst + 1 = (4, 4): contributions 1, 4, 1 -> middle first,
    # then the two extremes by arrival
    assert order(np.array([[0, 3], [1, 1], [3, 0]]), ["min", "min"]).tolist() == [1, 0, 2]
    # (max, max) layer on [0, 1]: ref one past the worst makes the extremes' boxes 0.5 each,
    # the middle one 0.25 -> extremes first
    assert order(np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]), ["max", "max"]).tolist() == [1, 2, 0]
    # exact duplicates (zero contribution each) keep arrival order
    assert order(np.array([[1.0, 1.0], [1.0, 1.0]]), ["min", "min"]).tolist() == [0, 1]
    # a single objective: plain sort, ties by arrival
    assert order(np.array([[2.0], [5.0], [2.0]]), ["max"]).tolist() == [1, 0, 2]


# 3. regression: ranks used as ranks ------------------------------------------------------------

@pytest.mark.parametrize("modes, point", [(["max", "max"], lambda i: (i, i)),
                                          (["max", "min"], lambda i: (i, -i))])
def test_totally_ordered_arrivals(modes, point):
    best_last = Rungs(modes, reduction_factor=3)
    for i in range(12):  # each new point dominates every earlier one
        assert best_last.record(f"up{i}", 25, point(i)), f"best trial {i} was stopped"

    worst_last = Rungs(modes, reduction_factor=3)
    assert worst_last.record("down0", 25, point(100))  # the first at a rung always continues
    for i in range(1, 12):  # each new point is dominated by every earlier one
        assert not worst_last.record(f"down{i}", 25, point(100 - i)), f"worst trial {i} continued"
    assert worst_last.counts() == {0: {25: 12}}


def test_newcomer_is_judged_by_its_own_position():
    # The two sequences above are involutions (index list == its inverse), so reading the sorted
    # index list as per-trial scores, as Syne Tune does, passes them by luck. Here a late worst
    # trial (0) is followed by a new best (9): the index list [3, 0, 1, 2] puts 2 at the new
    # trial's slot, which would stop the best trial at n = 4.
    rungs = Rungs(["max", "max"], reduction_factor=3)
    decisions = [rungs.record(f"t{i}", 25, (v, v)) for i, v in enumerate([5, 3, 0, 9, 1, 10, 2, 11])]
    # position of the newcomer < ceil(n / 3): n=1 0<1, 2: 1<1, 3: 2<1, 4: 0<2, 5: 3<2, 6: 0<2, 7: 4<3, 8: 0<3
    assert decisions == [True, False, False, True, False, True, False, True]


# 4. how many survive --------------------------------------------------------------------------

def test_top_ceil_n_over_rf_survive():
    # 9 mutually non-dominated (min, min) points, x gaps 1, y gaps chosen so the contributions
    # (ref = worst + 1) are [1, 2, 0.5, 3, 0.5, 4, 0.5, 0.5, 5]
    y = [16, 14, 13.5, 10.5, 10, 6, 5.5, 5, 0]
    front = [[float(x), float(v)] for x, v in enumerate(y)]
    dominated = [[1.5, 15.0], [4.5, 11.0], [9.0, 1.0]]
    pts = np.array(front + dominated)
    expected_hvc = [1, 2, 0.5, 3, 0.5, 4, 0.5, 0.5, 5]
    np.testing.assert_allclose(moocore.hv_contributions(pts[:9], ref=pts[:9].max(axis=0) + 1), expected_hvc)

    kept = {i for i in range(12) if survives(pts, ["min", "min"], 3, i)}
    assert len(kept) == math.ceil(12 / 3) == 4
    assert kept == {8, 5, 3, 1}
    assert order(pts, ["min", "min"])[:4].tolist() == [8, 5, 3, 1]
    # row order does not change who survives (no exact ties here)
    perm = np.random.default_rng(1).permutation(12)
    assert {int(perm[i]) for i in range(12) if survives(pts[perm], ["min", "min"], 3, i)} == kept


def test_non_finite_values_stop_and_are_not_recorded():
    rungs = Rungs(MIXED, reduction_factor=3)
    assert rungs.record("ok", 25, [0.5, 0.5])
    assert not rungs.record("nan", 25, [math.nan, 0.1])
    assert not rungs.record("inf", 25, [0.9, math.inf])
    assert not rungs.record("none", 25, [None, 0.1])
    assert rungs.records == {0: {25: {"ok": [0.5, 0.5]}}}
    with pytest.raises(ValueError):
        order(np.array([[math.nan, 0.0]]), MIXED)

    pruned: list[tuple[str, int]] = []
    sched = MOASHA(["a", "b"], MIXED, grace_steps=25, reduction_factor=3, on_prune=lambda t, s: pruned.append((t, s)))
    assert sched.on_trial_result(None, _trial("x"), {"rung_step": 25, "a": math.nan, "b": 0.0}) == TrialScheduler.STOP
    assert pruned == [("x", 25)] and sched.pruned == {"x": 25}


# 5. resume ------------------------------------------------------------------------------------

HISTORY = {f"h{i}": {25: [0.9 - 0.1 * i, 0.1 + 0.1 * i]} for i in range(5)}  # h0 dominates h1 ... h4


def test_resume_from_history():
    history = {**HISTORY, "odd": {30: [1.0, 0.0]}, "bad": {25: [math.nan, 0.0]}}
    pruned: list[tuple[str, int]] = []
    sched = MOASHA(["kd_alignment", "noise_robustness"], MIXED, grace_steps=25, reduction_factor=3,
                   max_steps=400, history=history, on_prune=lambda t, s: pruned.append((t, s)))
    # steps that are no rung and non-finite values are skipped, as live reports would be
    assert sched.rungs.counts() == {0: {25: 5}}

    def report(trial_id, a, b):
        return sched.on_trial_result(None, _trial(trial_id), {"rung_step": 25, "kd_alignment": a,
                                                              "noise_robustness": b})

    assert report("new_bad", 0.4, 0.6) == TrialScheduler.STOP  # dominated by all 5: 6th of 6, top 2 go on
    assert pruned == [("new_bad", 25)] and sched.pruned == {"new_bad": 25}
    assert report("new_good", 1.0, 0.0) == TrialScheduler.CONTINUE  # dominates all: 1st of 7
    assert sched.rungs.counts() == {0: {25: 7}}

    # a re-report (a trial resumed from an older checkpoint) replaces its value, n unchanged
    assert report("h4", 0.95, 0.05) == TrialScheduler.CONTINUE  # now 2nd of 7, top 3 go on
    assert sched.rungs.records[0][25]["h4"] == [0.95, 0.05]
    assert report("h0", 0.1, 0.9) == TrialScheduler.STOP  # now last of 7
    assert sched.rungs.counts() == {0: {25: 7}}
    assert pruned[-1] == ("h0", 25)
    assert "step 25: 7 recorded" in sched.debug_string()


def test_results_that_are_not_rung_decisions_continue():
    sched = MOASHA(["a", "b"], MIXED, grace_steps=25, reduction_factor=3, max_steps=100, history=HISTORY)
    dominated = {"a": 0.0, "b": 1.0}
    for result in ({"loss": 1.0},  # no rung_step
                   {**dominated, "done_step": 100},
                   {**dominated, "rung_step": 25, "done": True},  # Tune re-sends the last result at the end
                   {**dominated, "rung_step": 225}):  # a rung of the rule, but not below max_steps
        assert sched.on_trial_result(None, _trial("z"), result) == TrialScheduler.CONTINUE
    assert sched.rungs.counts() == {0: {25: 5}} and sched.pruned == {}
    # the same values at a real rung are decided: 6th of 6
    assert sched.on_trial_result(None, _trial("z"), {**dominated, "rung_step": 25}) == TrialScheduler.STOP
    with pytest.raises(ValueError, match="lacks objectives"):
        sched.on_trial_result(None, _trial("y"), {"rung_step": 25, "a": 1.0})


def test_search_properties_and_pickling():
    lock = threading.Lock()
    calls: list[tuple[str, int]] = []

    def on_prune(trial_id: str, step: int) -> None:
        with lock:  # a lock cannot be pickled: the callback must not travel with the scheduler
            calls.append((trial_id, step))

    sched = MOASHA(["a", "b"], MIXED, grace_steps=25, reduction_factor=3, history=HISTORY, on_prune=on_prune)
    assert sched.set_search_properties(None, None)
    assert sched.set_search_properties(["a", "b"], MIXED)
    assert not sched.set_search_properties("a", "max")
    assert sched.metric is None  # so Tune does not demand the objectives in every result

    sched.on_trial_result(None, _trial("w"), {"rung_step": 25, "a": 0.0, "b": 1.0})
    copy = pickle.loads(pickle.dumps(sched))  # a hook that cannot travel is dropped, not fatal
    assert copy.on_prune is None and sched.on_prune is on_prune
    assert copy.rungs.records == sched.rungs.records and copy.pruned == sched.pruned == {"w": 25}
    assert calls == [("w", 25)]


def test_a_restored_copy_rebuilds_its_records_from_history_source(tmp_path):
    """Tune restores the scheduler it pickled when the sweep started (empty records): the copy's
    picklable hooks survive, and the first rung result rebuilds the records from history_source."""
    import functools
    import json

    store = tmp_path / "history.json"
    source = functools.partial(_read_history, str(store))
    prune_log = tmp_path / "pruned.txt"
    fresh = MOASHA(["a", "b"], MIXED, grace_steps=25, reduction_factor=3, history_source=source,
                   on_prune=functools.partial(_append_line, str(prune_log)))
    restored = pickle.loads(pickle.dumps(fresh))  # what tuner.pkl gives back on resume
    assert restored.on_prune is not None and restored.rungs.counts() == {}
    store.write_text(json.dumps({t: {str(k): v for k, v in steps.items()} for t, steps in HISTORY.items()}))
    dominated = {"rung_step": 25, "a": 0.0, "b": 1.0}  # the worst point: dominated by every h*
    assert restored.on_trial_result(None, _trial("late"), dominated) == TrialScheduler.STOP
    assert restored.rungs.counts() == {0: {25: 6}}
    assert prune_log.read_text() == "late 25\n"
    # without the rebuild the same report, first at its rung, would have gone on
    assert MOASHA(["a", "b"], MIXED, 25, 3).on_trial_result(None, _trial("late"), dominated) == TrialScheduler.CONTINUE


def _read_history(path: str) -> dict:
    import json

    return {t: {int(k): v for k, v in steps.items()} for t, steps in json.loads(open(path).read()).items()}


def _append_line(path: str, trial_id: str, step: int) -> None:
    with open(path, "a") as fh:
        fh.write(f"{trial_id} {step}\n")


# 6. a real Tune run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# (kd_alignment: max, noise_robustness: min) per config q, arriving in this order, one at a time.
# With reduction_factor 2, grace 10: rungs 10, 20, 40, 80 of 100 steps.
POINTS = [
    (0.9, 0.6),   # q0 A: front
    (0.8, 0.0),   # q1 B: front; beats A on contribution, so 2nd of 2 at each rung still goes on
    (0.5, 0.7),   # q2: dominated, 3rd of 3 at rung 10 -> stop
    (0.7, 0.1),   # q3: dominated by B, 3rd of 4 -> stop
    (0.2, 0.9),   # q4: dominated by all, 5th of 5 -> stop
    (0.75, 0.05),  # q5: dominated by B only: 3rd of 6 at rung 10 goes on, 3rd of 3 at rung 20 -> stop
    (0.1, 1.0),   # q6: worst, 7th of 7 -> stop
    (0.3, 0.8),   # q7: 6th of 8 -> stop
]
EXPECTED_PRUNED = {2: 10, 3: 10, 4: 10, 5: 20, 6: 10, 7: 10}


def test_tune_run_stops_dominated_trials(ray_local, tmp_path):
    import ray.cloudpickle
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    rungs = rung_steps(10, 2, 100)
    points = POINTS

    def trainable(config):
        a, b = points[config["q"]]
        for step in range(1, 101):
            if step in rungs:
                tune.report({"rung_step": step, "kd_alignment": a, "noise_robustness": b})
        tune.report({"done_step": 100})

    lock = threading.Lock()
    calls: list[tuple[str, int]] = []

    def on_prune(trial_id: str, step: int) -> None:
        with lock:  # unpicklable on purpose: Tuner pickles its TuneConfig (scheduler included)
            calls.append((trial_id, step))

    sched = MOASHA(["kd_alignment", "noise_robustness"], MIXED, grace_steps=10, reduction_factor=2,
                   max_steps=100, on_prune=on_prune)
    tuner = tune.Tuner(
        trainable,
        param_space={"q": tune.grid_search(list(range(len(POINTS))))},
        tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=1, reuse_actors=True),
        # result.json for metrics_dataframe: the sweeps turn Tune's auto loggers off (sweeps/__init__.py)
        run_config=tune.RunConfig(name="moasha", storage_path=str(tmp_path), verbose=0,
                                  callbacks=[JsonLoggerCallback()]),
    )
    grid = tuner.fit()
    assert not grid.errors

    by_q = {r.config["q"]: r for r in grid}
    trial_of = {q: r.metrics["trial_id"] for q, r in by_q.items()}
    assert sorted(by_q) == list(range(len(POINTS)))
    for q, r in by_q.items():
        if q in EXPECTED_PRUNED:
            assert "done_step" not in r.metrics, f"q{q} ran to the end"
            assert r.metrics["rung_step"] == EXPECTED_PRUNED[q] < 100
        else:
            assert r.metrics.get("done_step") == 100, f"front trial q{q} was stopped"
            assert r.metrics_dataframe["rung_step"].max() == 80
    expected = {trial_of[q]: step for q, step in EXPECTED_PRUNED.items()}
    assert sched.pruned == expected
    assert sorted(calls) == sorted(expected.items())
    assert sched.rungs.counts() == {0: {10: 8, 20: 3, 40: 2, 80: 2}}

    # what a restored Tuner would run: the copy pickled into tuner.pkl when the Tuner was built
    saved = ray.cloudpickle.loads((tmp_path / "moasha" / "tuner.pkl").read_bytes())["_tune_config"].scheduler
    assert isinstance(saved, MOASHA) and saved.on_prune is None and saved.rungs.records == {}
