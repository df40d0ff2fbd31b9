"""The sweep service end to end on real Ray, Optuna and MLflow (sqlite), with a tiny model:
nested runs, the tagged front, study directions, cache reuse, failures, a killed worker and a
killed driver. Each sweep runs through the real `alignsweep` console script."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps import pareto
from sweeps.searcher import study_storage
from tests.helpers import assert_study_agrees_with_mlflow, children_with_status, wait_for

BIN = Path(sys.executable).parent / "alignsweep"
OBJ = ["kd_alignment", "noise_robustness"]


def write_spec(tmp_path, tiny_backbone, toy_csv, name="tiny", **over) -> Path:
    spec = {
        "name": name,
        "trials": 4,
        "concurrency": 2,
        "objectives": [{"metric": m, "mode": "max"} for m in OBJ],
        "sampler": {"kind": "random", "seed": 0},
        "train": {"backbone": tiny_backbone, "cache_dir": str(tmp_path / "cache"),
                  "data": {"name": toy_csv, "max_len": 16}, "teacher": {"epochs": 1, "lr": 1e-3},
                  "head_hidden": 32, "batch_size": 32, "budget_steps": 8, "log_every": 4, "checkpoint_every": 4},
        "space": {"distill_weight": {"kind": "loguniform", "low": 0.1, "high": 3.0},
                  "epsilon": {"kind": "uniform", "low": 0.0, "high": 0.2},
                  "alpha": {"kind": "uniform", "low": 0.2, "high": 1.0}},
        "max_failures": 1,
    }
    for k, v in over.items():
        spec[k] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(tmp_path, spec_path, *extra, env=None, timeout=600):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN), "sweep", str(spec_path), "--tracking-uri", uri, "--storage", str(tmp_path / "runs"), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env={**os.environ, **(env or {})})
    return out, uri


def runs_of(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("role") != "baseline"]
    return client, parents, children


def test_four_trial_sweep_nests_runs_and_tags_the_front(tmp_path, tiny_backbone, toy_csv):
    out, uri = sweep(tmp_path, write_spec(tmp_path, tiny_backbone, toy_csv))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "4 finished, 0 failed" in out.stdout
    client, parents, children = runs_of(uri, "tiny")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["git_sha"] and parent.data.tags["dataset_hash"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"distill_weight", "epsilon", "alpha"} <= set(child.data.params)
        for m in ("accuracy", "kd_alignment", "noise_robustness", "alignment_stability", "noisy_text_accuracy",
                  "safety_score", "harmful_recall", "attack_success_rate"):
            assert 0.0 <= child.data.metrics[m] <= 100.0  # validation: what the searcher saw
            assert 0.0 <= child.data.metrics[f"test_{m}"] <= 100.0  # test: the report
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert steps == [4, 8]  # per-step losses at the real step
        assert child.data.tags["checkpoint_uri"]

    # the tagged front equals a non-dominated filter recomputed here from search_runs
    pts = np.array([[c.data.metrics[m] for m in OBJ] for c in children])
    mask = pareto.non_dominated(pts, ["max", "max"])
    tagged = np.array([c.data.tags["pareto"] == "true" for c in children])
    assert (mask == tagged).all() and tagged.any()
    # the reference is the plain-CE baseline's validation point, from its own child run
    runs = client.search_runs([parent.info.experiment_id], filter_string="tags.role = 'baseline'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    baseline = runs[0]
    assert baseline.data.tags["mlflow.parentRunId"] == parent.info.run_id and baseline.data.params["method"] == "ce"
    ref = [baseline.data.metrics[m] for m in OBJ]
    hv = pareto.hypervolume(pts, ["max", "max"], ref)
    assert parent.data.metrics["hypervolume"] == pytest.approx(hv)
    # the live view, which folds in each trial as it ends, ends on the same front and volume
    last = [line for line in out.stdout.splitlines() if line.startswith("[4/4 done, 0 running, 0 failed]")][-1]
    shown = re.search(r"front (\d+), hypervolume ([\d.]+)", last)
    assert int(shown[1]) == mask.sum() and float(shown[2]) == pytest.approx(hv, abs=0.05), last
    assert [parent.data.metrics[f"reference.{m}"] for m in OBJ] == pytest.approx(ref)
    box = (100 - ref[0]) * (100 - ref[1])
    assert parent.data.metrics["hypervolume_normalised"] == pytest.approx(hv / box)
    test_ref = [baseline.data.metrics[f"test_{m}"] for m in OBJ]
    front_test = np.array([[c.data.metrics[f"test_{m}"] for m in OBJ] for c, on in zip(children, mask) if on])
    assert parent.data.metrics["test_hypervolume"] == pytest.approx(pareto.hypervolume(front_test, ["max", "max"], test_ref))
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "pareto_front.json", "pareto.png", "pareto.html", "spec.yaml"} <= arts
    card_name = f"dataset_card-{parent.data.tags['dataset_hash']}.json"
    assert card_name in arts  # the toy CSV's string labels and their class ids, on the run
    card = json.loads(Path(client.download_artifacts(parent.info.run_id, card_name, str(tmp_path))).read_text())
    assert card["label_mapping"] == {"0": "benign", "1": "harmful"}
    front_json = json.loads(client.download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path)) and
                            Path(tmp_path / "pareto_front.json").read_text())
    assert len(front_json["front"]) == int(mask.sum())
    assert front_json["reference"] == pytest.approx(ref) and front_json["reference_source"] == "baseline"
    assert front_json["selected_on"] == "validation" and front_json["reported"] == [f"test_{m}" for m in OBJ]

    # the Optuna values are the validation metrics, never the test ones
    assert_study_agrees_with_mlflow(uri, "tiny", 4, OBJ)

    # the study is multi-objective: one direction per objective
    study_url, study_name = parent.data.tags["optuna_storage"], parent.data.tags["optuna_study"]
    assert Path(study_url) == tmp_path / "optuna-journal.log"  # a journal beside the MLflow db
    study = optuna.load_study(study_name=study_name, storage=study_storage(study_url))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4

    # shared artifacts were computed once for the whole sweep (driver), never in a trial
    misses = (tmp_path / "cache" / "misses.log").read_text().splitlines()
    assert [m.split()[0] for m in misses] == ["features", "teacher"]

    # `alignsweep pareto` reads the same front back from MLflow
    back = subprocess.run([str(BIN), "pareto", "--experiment", "tiny", "--tracking-uri", uri, "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert back.returncode == 0, back.stderr
    assert {r["run_id"] for r in json.loads(back.stdout)["front"]} == {
        c.info.run_id for c, t in zip(children, tagged) if t}


def test_diverging_trial_fails_and_the_sweep_goes_on(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="diverge", sampler={"kind": "grid", "seed": 0},
                      trials=None, space={"lr": {"kind": "grid", "values": [0.001, 1.0e30]}})
    raw = yaml.safe_load(spec.read_text())
    raw.pop("trials")
    raw["train"].update({"clip_grad_norm": None, "budget_steps": 30})
    spec.write_text(yaml.safe_dump(raw))
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 finished, 1 failed" in out.stdout
    client, parents, children = runs_of(uri, "diverge")
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED", "FINISHED"]
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "Diverged" in failed.data.tags["failure"] and "step" in failed.data.tags["failure"]
    study = optuna.load_study(study_name=parents[0].data.tags["optuna_study"], storage=study_storage(parents[0].data.tags["optuna_storage"]))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]  # never a NaN, never left RUNNING


def _sigkill_and_resume(tmp_path, spec, proc) -> None:
    """SIGKILL the sweep driver, let Ray's fate-shared processes go down with it, then --resume to the end."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(3)
    out, _ = sweep(tmp_path, spec, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_resume_after_driver_sigkill(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="resume", trials=8)
    raw = yaml.safe_load(spec.read_text())
    raw["train"].update({"budget_steps": 40})
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN), "sweep", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    finished = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        finished = children_with_status(tmp_path / "mlflow.db", "FINISHED")  # trials, not the baseline
        if finished >= 2:
            break
    assert proc.poll() is None and finished >= 2, "sweep ended before it could be interrupted"
    _sigkill_and_resume(tmp_path, spec, proc)
    client, parents, children = runs_of(uri, "resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    done = [c for c in children if c.info.status == "FINISHED"]
    assert len(done) == 8
    assert len({c.data.tags["tune_trial_id"] for c in done}) == 8  # no duplicates among completed trials
    assert not [c for c in children if c.info.status == "RUNNING"]
    tags = parents[0].data.tags
    study = optuna.load_study(study_name=tags["optuna_study"], storage=study_storage(tags["optuna_storage"]))
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8  # the trials Tune forgot after the kill are FAIL (orphaned), not counted
    assert sorted(tuple(t.values) for t in complete) == sorted(tuple(c.data.metrics[m] for m in OBJ) for c in done)


def _moasha_spec(tmp_path, tiny_backbone, toy_csv, name: str, trials: int):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name=name, trials=trials, concurrency=1)
    raw = yaml.safe_load(spec.read_text())
    raw["train"].update({"budget_steps": 36, "log_every": 4, "checkpoint_every": 4})
    raw["scheduler"] = {"kind": "moasha", "grace_steps": 4, "reduction_factor": 3}  # rungs at 4 and 12
    spec.write_text(yaml.safe_dump(raw))
    return spec


def _assert_pruned_sweep(uri: str, name: str, trials: int, budget: int) -> int:
    """Pruned trials: KILLED runs with pruned_at_step at a rung and their rung values logged,
    PRUNED Optuna trials; the rest FINISHED and COMPLETE with the validation values. Returns the
    optimizer steps the sweep spent."""
    client, parents, children = runs_of(uri, name)
    pruned = [c for c in children if "pruned_at_step" in c.data.tags]
    done = [c for c in children if c.info.status == "FINISHED"]
    assert len(children) == trials and len(pruned) + len(done) == trials, [c.info.status for c in children]
    assert pruned, "MO-ASHA stopped no trial"
    for c in pruned:
        step = int(c.data.tags["pruned_at_step"])
        assert c.info.status == "KILLED" and step in (4, 12)
        assert [m.step for m in client.get_metric_history(c.info.run_id, "kd_alignment")][-1] == step
        assert "test_kd_alignment" not in c.data.metrics  # a stopped trial never reaches test
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_pruned"] == len(pruned)
    tags = parent.data.tags
    study = optuna.load_study(study_name=tags["optuna_study"], storage=study_storage(tags["optuna_storage"]))
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == len(pruned) and states.count("COMPLETE") == len(done), states
    assert sorted(t.user_attrs["pruned_at_step"] for t in study.trials if t.state.name == "PRUNED") == sorted(
        int(c.data.tags["pruned_at_step"]) for c in pruned)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(tuple(t.values) for t in complete) == sorted(tuple(c.data.metrics[m] for m in OBJ) for c in done)
    return sum(int(c.data.tags["pruned_at_step"]) for c in pruned) + budget * len(done)


def test_moasha_sweep_stops_dominated_trials_at_rungs(tmp_path, tiny_backbone, toy_csv):
    spec = _moasha_spec(tmp_path, tiny_backbone, toy_csv, "moasha", trials=6)
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "stopped early" in out.stdout
    spent = _assert_pruned_sweep(uri, "moasha", 6, 36)
    assert spent < 6 * 36  # fewer optimizer steps than the same six trials unpruned


@pytest.mark.slow
def test_moasha_sweep_resumes_after_driver_sigkill(tmp_path, tiny_backbone, toy_csv):
    """Tune keeps no scheduler state: the resumed driver rebuilds the rung records from MLflow and
    the sweep still ends with exactly N trials, each pruned (KILLED + PRUNED) or finished."""
    spec = _moasha_spec(tmp_path, tiny_backbone, toy_csv, "moasha-resume", trials=8)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN), "sweep", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ended = lambda: sum(children_with_status(tmp_path / "mlflow.db", s) for s in ("FINISHED", "KILLED"))  # noqa: E731
    assert wait_for(lambda: ended() >= 3 or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    _sigkill_and_resume(tmp_path, spec, proc)
    client, parents, children = runs_of(uri, "moasha-resume")
    # trials Tune forgot after the kill stay KILLED without pruned_at_step (their Optuna trial is an orphan FAIL)
    forgotten = [c for c in children if c.info.status == "KILLED" and "pruned_at_step" not in c.data.tags]
    kept = [c for c in children if c not in forgotten]
    pruned = [c for c in kept if "pruned_at_step" in c.data.tags]
    assert len(kept) == 8 and pruned and not [c for c in children if c.info.status == "RUNNING"]
    tags = parents[0].data.tags
    study = optuna.load_study(study_name=tags["optuna_study"], storage=study_storage(tags["optuna_storage"]))
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == len(pruned) and states.count("COMPLETE") == 8 - len(pruned), states
    assert all(t.user_attrs.get("orphaned") for t in study.trials if t.state.name == "FAIL")
    assert parents[0].info.status == "FINISHED"


def test_bad_spec_exits_2_before_anything_is_written(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="bad",
                      space={"alpha": {"kind": "uniform", "low": 0.0, "high": 1.5}})
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "space.alpha" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_trial_that_cannot_fit_the_cluster_exits_2_before_any_run(tmp_path, tiny_backbone, toy_csv):
    """Tune would wait for resources forever: refused once the embedded Ray reports what it has.
    The refusal lands while the plain-CE baseline still trains on the preparing thread (20,000
    steps): exiting beside it used to kill that thread inside torch and abort (exit -6, seen in CI)."""
    train = yaml.safe_load(write_spec(tmp_path, tiny_backbone, toy_csv).read_text())["train"]
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="toobig", resources={"cpus_per_worker": 4096},
                      train={**train, "budget_steps": 20_000})
    out, uri = sweep(tmp_path, spec, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]  # Ray and MLflow log their start-up above it
    assert last.startswith("error: resources:") and "resources.cpus_per_worker" in last and "4096 CPU" in last
    assert "Traceback" not in out.stderr
    assert MlflowClient(uri).get_experiment_by_name("toobig") is None  # nothing logged
    assert not list((tmp_path / "runs").glob("toobig-*"))


@pytest.mark.parametrize("resources, nodes, message", [
    ({"workers_per_trial": 2}, [{"CPU": 2.0}], "= 2.01 CPU; the cluster has 2: set resources.cpus_per_worker <= 0.99"),
    ({"workers_per_trial": 2, "cpus_per_worker": 0.5}, [{"CPU": 2.0}], None),
    ({"workers_per_trial": 4}, [{"CPU": 2.0}, {"CPU": 3.0}], None),  # Train workers spread over nodes
    ({"cpus_per_worker": 3}, [{"CPU": 2.0}, {"CPU": 2.0}], "one worker needs 3 CPU, 0 GPU"),  # not split
    ({"gpus_per_worker": 0.25}, [{"CPU": 2.0}], "largest node has 2 CPU, 0 GPU"),
    ({"gpus_per_worker": 0.25}, [{"CPU": 8.0, "GPU": 1.0}], None),
    ({"workers_per_trial": 2, "gpus_per_worker": 1}, [{"CPU": 8.0, "GPU": 1.0}], "= 2 GPU; the cluster has 1"),
])
def test_resources_check_against_the_nodes(resources, nodes, message):
    from sweeps.spec import Resources
    from trainable.config import ConfigError

    r = Resources(**resources)
    if message is None:
        r.check_fits(nodes)
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            r.check_fits(nodes)


def test_torch_trainer_launch_mode(tmp_path, tiny_backbone, toy_csv):
    """workers_per_trial > 1: a Ray Train TorchTrainer inside the Tune trial, same loop, same tracking."""
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="ddp", trials=1, concurrency=1,
                      resources={"workers_per_trial": 2, "cpus_per_worker": 0.5})
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    client, parents, children = runs_of(uri, "ddp")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    child = children[0]
    assert 0.0 <= child.data.metrics["noise_robustness"] <= 100.0
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [4, 8]  # logged by rank 0 only
