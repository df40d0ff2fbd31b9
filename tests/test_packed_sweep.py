"""Packed trials through the sweep service (issue 15): ``resources.pack`` trains several Tune trials in one
pack runner, and each stays a trial of its own: one MLflow child, one Optuna trial, its own checkpoints,
the same metrics it gets unpacked, and a clean SIGKILL + ``--resume``. Real Ray, Optuna and MLflow
(sqlite) through the `alignsweep` console script, on the tiny BERT."""

import os
import re
import sqlite3
import subprocess
import time

import numpy as np
import optuna
import pytest
import yaml

from sweeps import pareto
from sweeps.searcher import study_storage
from tests.helpers import assert_study_agrees_with_mlflow, children_with_status, wait_for
from tests.test_sweep import BIN, OBJ, runs_of, sweep, write_spec

GRID = {"distill_weight": {"kind": "grid", "values": [0.3, 3.0]},
        "epsilon": {"kind": "grid", "values": [0.0, 0.15]},
        "method": {"kind": "grid", "values": ["ckt_ro", "adv"]}}


def _metrics_by_params(uri: str, experiment: str) -> dict[tuple, dict[str, float]]:
    _, _, children = runs_of(uri, experiment)
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    return {tuple(sorted((k, c.data.params[k]) for k in GRID)): c.data.metrics for c in children}


def test_a_packed_grid_sweep_gives_every_trial_its_solo_metrics(tmp_path, tiny_backbone, toy_csv):
    """The same 8-point grid, unpacked and in one pack of 4 (8 trials through it): every trial's
    validation and test metrics agree, each trial has its own child run tagged with the runner."""
    results = {}
    for pack in (1, 4):
        work = tmp_path / f"pack{pack}"
        work.mkdir()
        spec = write_spec(work, tiny_backbone, toy_csv, name=f"grid{pack}", trials=None, concurrency=4,
                          sampler={"kind": "grid", "seed": 0}, space=GRID, resources={"pack": pack})
        raw = yaml.safe_load(spec.read_text())
        raw.pop("trials")
        raw["train"]["cache_dir"] = str(tmp_path / "cache")  # one set of artifacts for both sweeps
        spec.write_text(yaml.safe_dump(raw))
        out, uri = sweep(work, spec)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        results[pack] = _metrics_by_params(uri, f"grid{pack}")
        _, _, children = runs_of(uri, f"grid{pack}")
        runners = {c.data.tags.get("pack_runner") for c in children}
        assert runners == ({None} if pack == 1 else {next(iter(runners))}) and len(children) == 8, runners
        assert_study_agrees_with_mlflow(uri, f"grid{pack}", 8, OBJ)
    assert results[1].keys() == results[4].keys() and len(results[1]) == 8
    for key, solo in results[1].items():
        packed = results[4][key]
        for name in [m for m in solo if m.startswith("test_") or m in OBJ]:
            assert packed[name] == pytest.approx(solo[name], abs=1e-3), (key, name)


def _running_with_checkpoint(tmp_path) -> bool:
    """Some trial is RUNNING in MLflow and has a Tune checkpoint on disk (so a resume restores it mid-way)."""
    with sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as con:
        running = {v for (v,) in con.execute("select t.value from runs r join tags t on r.run_uuid = t.run_uuid "
                                             "where t.key = 'tune_trial_id' and r.status = 'RUNNING'")}
    return any(p.parent.name.removeprefix("trial-") in running for p in (tmp_path / "runs").glob("packed-*/trial-*/checkpoint_*"))


@pytest.mark.slow
def test_a_packed_sweep_survives_sigkill_and_resume(tmp_path, tiny_backbone, toy_csv):
    """TPE suggests a pack's worth at a time; the driver is SIGKILLed while a member has a checkpoint
    and is still training, then resumed: N finished trials, one child run and one COMPLETE Optuna
    trial each, none RUNNING, a member resumed from its checkpoint, and the tagged front is the
    non-dominated set of the trials' validation points."""
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="packed", trials=10, concurrency=4,
                      sampler={"kind": "tpe", "seed": 0}, resources={"pack": 4})
    raw = yaml.safe_load(spec.read_text())
    raw["train"].update({"budget_steps": 1500, "checkpoint_every": 100, "log_every": 100})  # ~5 s a trial
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN), "sweep", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ready = wait_for(lambda: proc.poll() is not None or (children_with_status(tmp_path / "mlflow.db", "FINISHED") >= 1
                                                         and _running_with_checkpoint(tmp_path)), 300, every=0.2)
    assert ready and proc.poll() is None, "sweep ended before it could be interrupted"
    time.sleep(3)  # Tune's next driver snapshots (every 1-2 s here) record that checkpoint
    os.killpg(proc.pid, 9)  # the driver and the Ray it embeds, pack runner included
    proc.wait(timeout=60)
    time.sleep(3)
    out, _ = sweep(tmp_path, spec, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_study_agrees_with_mlflow(uri, "packed", 10, OBJ)
    _, parents, children = runs_of(uri, "packed")
    done = [c for c in children if c.info.status == "FINISHED"]
    assert all("pack_runner" in c.data.tags for c in done)
    resumed = [int(c.data.tags["resumed_from_step"]) for c in done if "resumed_from_step" in c.data.tags]
    assert resumed and all(s % 100 == 0 and 0 < s < 1500 for s in resumed), resumed
    points = [[c.data.metrics[m] for m in OBJ] for c in done]
    front = set(np.flatnonzero(pareto.non_dominated(np.array(points), ["max", "max"])))
    tagged = {i for i, c in enumerate(done) if c.data.tags.get("pareto") == "true"}
    assert tagged == front

@pytest.mark.parametrize("over, names", [
    ({"space": {"method": {"kind": "choice", "values": ["ckt_ro", "hybrid"]}}}, ["resources.pack", "space.method", "hybrid"]),
    ({"train_over": {"head": "lora"}}, ["resources.pack", "train.head", "linear, mlp"]),
    ({"resources": {"pack": 4, "workers_per_trial": 2}}, ["resources", "pack=4", "workers_per_trial=1"]),
    ({"resources": {"pack": 0}}, ["resources.pack", "auto"]),
    ({"resources": {"pack": "many"}}, ["resources.pack", "got 'many'", "auto"]),
])
def test_what_cannot_pack_is_refused_before_ray(tmp_path, tiny_backbone, toy_csv, over, names):
    """Exit 2, one line naming the field and what a pack allows, nothing written."""
    from tests.test_refusals import refused

    fields = {"resources": {"pack": 4}, **{k: v for k, v in over.items() if k != "train_over"}}
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="nopack", **fields)
    if "train_over" in over:
        raw = yaml.safe_load(spec.read_text())
        raw["train"].update(over["train_over"])
        spec.write_text(yaml.safe_dump(raw))
    out, _ = sweep(tmp_path, spec)
    refused(out, *names)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("resources, nodes, concurrency, message", [
    ({"pack": 16}, [{"CPU": 2.0}], 16, None),  # one runner of 1 CPU + 16 relays of 0.01
    ({"pack": 16}, [{"CPU": 2.0}], 32, "resources.cpus_per_worker <= 0.84"),  # two runners leave no CPU to relay
    ({"pack": 16, "cpus_per_worker": 0.8}, [{"CPU": 2.0}], 32, None),
    ({"pack": "auto", "gpus_per_worker": 0.5}, [{"CPU": 8.0, "GPU": 1.0}], 48, "needs 3 pack runners of 0.5 GPU"),
])
def test_pack_runners_must_fit_beside_their_relaying_trials(resources, nodes, concurrency, message):
    """Tune would wait forever for a trial that cannot be placed: the runners and the 0.01-CPU relays together."""
    from sweeps.spec import Resources
    from trainable.config import ConfigError

    r = Resources(**resources)
    if message is None:
        r.check_fits(nodes, concurrency)
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            r.check_fits(nodes, concurrency)


def test_moasha_stops_packed_members_at_their_rungs(tmp_path, tiny_backbone, toy_csv):
    """A member reporting at a rung waits in its pack for the scheduler; a stopped one is KILLED with
    pruned_at_step in MLflow and PRUNED in Optuna, exactly as unpacked."""
    from tests.test_sweep import _assert_pruned_sweep, _moasha_spec

    spec = _moasha_spec(tmp_path, tiny_backbone, toy_csv, "moasha-packed", trials=6)
    raw = yaml.safe_load(spec.read_text())
    raw.update(concurrency=3, resources={"pack": 3})
    spec.write_text(yaml.safe_dump(raw))
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    spent = _assert_pruned_sweep(uri, "moasha-packed", 6, 36)
    assert spent < 6 * 36
    _, _, children = runs_of(uri, "moasha-packed")
    assert all("pack_runner" in c.data.tags for c in children)
