"""3. Service overhead: N trials through the real sweep path vs the same N trials in a bare
Optuna loop. (Memory of the same runs feeds section 6.)

- Sweep: ``sweeps.tune.run_sweep`` on the built-in ``pareto`` spec (TPE, 6 knobs, concurrency 2):
  local Ray, in-process launch mode (reused Tune actors), MLflow on sqlite in a temp dir, the
  Optuna study in a journal file beside it, Tune storage in a temp dir. Wall = the whole ``run_sweep``
  call (``ray.init`` beside the shared-artifact check, MLflow parent, trials, ``ray.shutdown`` beside finalize).
- Bare loop: one process, ``optuna.create_study`` in memory with the sweep's own sampler
  (``make_sampler``), ``study.optimize(n_jobs=concurrency)``, each trial calling
  ``trainable.loop.train_loop`` with a no-op report. The sweep's trials are replayed into it
  (``enqueue_trial``) so both sides train exactly the same configurations. One torch thread per
  trial on both sides (Ray gives a 1-CPU trial OMP_NUM_THREADS=1).
- TorchTrainer launch mode: the same spec with ``resources.workers_per_trial=2`` (a Ray Train
  TorchTrainer with 2 workers of 0.5 CPU started inside each Tune trial), concurrency 1, ``budget_steps``
  fixed at 100; its bare baseline replays its trials with n_jobs=1.
Imports are done before the clock starts on both sides. Note that the bare loop's n_jobs threads
share one Python process (and its GIL), while Ray runs each trial in its own process. Every side runs in its own process,
which a memory sampler watches together with all its descendants (section 6).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
import yaml

from benchmarks import memory
from benchmarks.common import REPO, Row, TreeSampler, base_train, log, row, run_clean, section_main

TARGET = 1.3


def spec_dict(smoke: bool, work: Path, name: str, trials: int, concurrency: int, torch_trainer: bool) -> dict:
    from trainable.config import deep_merge

    spec = yaml.safe_load((REPO / "sweeps" / "specs" / "pareto.yaml").read_text())
    spec.update(name=name, trials=trials, concurrency=concurrency)
    spec["train"] = deep_merge(spec.get("train", {}), base_train(smoke, work))
    if smoke:
        spec["space"]["budget_steps"] = {"kind": "choice", "values": [8, 12]}
        spec["train"].pop("budget_steps")  # searched: a fixed value too is refused (it was silently overridden)
        spec["train"]["checkpoint_every"] = 4
    if torch_trainer:
        # 0.5 CPU per worker: with 1 CPU each, 2 workers + the trial's 0.01 CPU exceed a 2-CPU node
        # and the TorchTrainer waits for resources forever (seen here)
        spec["resources"] = {"workers_per_trial": 2, "cpus_per_worker": 0.5}
        spec["space"].pop("budget_steps")
        spec["train"]["budget_steps"] = 12 if smoke else 100
    return spec


# -- child processes ----------------------------------------------------------------------------------


def child_sweep(spec_path: Path, out: Path, work: Path) -> None:
    import mlflow  # noqa: F401  (imports before the clock, as for the bare loop)
    import optuna
    import ray  # noqa: F401
    from ray import tune  # noqa: F401

    from sweeps import tracking
    from sweeps.spec import load_spec
    from sweeps.searcher import study_storage
    from sweeps.tune import run_sweep
    from trainable.loop import train_loop  # noqa: F401

    spec = load_spec(spec_path)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = work / "runs"
    sampler = TreeSampler(interval=0.5)
    sampler.start()
    t0_epoch, t0 = time.time(), time.perf_counter()
    result = run_sweep(spec, uri, storage=str(storage))
    wall = time.perf_counter() - t0
    peaks = sampler.stop()

    runs = tracking.child_runs(uri, result.experiment_id, result.parent_run_id)
    starts = [r.info.start_time / 1e3 for r in runs]
    ends = [r.info.end_time / 1e3 for r in runs if r.info.end_time]
    durations = [(r.info.end_time - r.info.start_time) / 1e3 for r in runs if r.info.end_time]
    parent = tracking.client(uri).get_run(result.parent_run_id)
    study = optuna.load_study(study_name=parent.data.tags["optuna_study"],
                              storage=study_storage(parent.data.tags["optuna_storage"]))
    trials = [{"params": t.params, "values": t.values} for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE]
    out.write_text(json.dumps({
        "wall": wall, "finished": result.finished, "failed": result.failed,
        "setup": min(starts) - t0_epoch if starts else None,
        "trials_span": max(ends) - min(starts) if ends else None,
        "finalize": t0_epoch + wall - max(ends) if ends else None,
        "mean_trial": sum(durations) / len(durations) if durations else None,
        "trials": trials, "memory": peaks.__dict__,
    }))


def child_bare(spec_path: Path, trials_path: Path, out: Path) -> None:
    import optuna
    import torch

    from benchmarks.common import noop_report, suggest
    from sweeps.spec import load_spec, nest
    from sweeps.searcher import make_sampler
    from trainable.loop import train_loop

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    spec = load_spec(spec_path)
    replay = json.loads(trials_path.read_text())
    durations: list[float] = []

    def objective(trial: optuna.Trial) -> list[float]:
        t = time.perf_counter()
        params = {path: suggest(trial, path, d) for path, d in spec.space.items()}
        final = train_loop(spec.trial_config(nest(params)), noop_report)
        durations.append(time.perf_counter() - t)
        return [final[m] for m in spec.metrics]

    sampler = TreeSampler(interval=0.5)
    sampler.start()
    t0 = time.perf_counter()
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in spec.modes],
                                sampler=make_sampler(spec))
    for t in replay:
        study.enqueue_trial(t["params"])
    study.optimize(objective, n_trials=len(replay), n_jobs=spec.concurrency)
    wall = time.perf_counter() - t0
    peaks = sampler.stop()
    done = [{"params": t.params, "values": t.values} for t in study.trials]
    out.write_text(json.dumps({"wall": wall, "mean_trial": sum(durations) / max(1, len(durations)),
                               "trials": done, "memory": peaks.__dict__}))


def _child(args: list[str], log_path: Path, timeout: float) -> None:
    rc = run_clean([sys.executable, "-m", "benchmarks.service", *args], log_path, timeout)
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"benchmarks.service {args[:2]} exited {rc}:\n{tail}")


def measure_pair(smoke: bool, work: Path, label: str, trials: int, concurrency: int, torch_trainer: bool,
                 timeout: float) -> tuple[dict, dict, dict]:
    """Run the sweep, then the bare loop on the sweep's trials; each in a fresh process."""
    d = work / label
    d.mkdir(parents=True, exist_ok=True)
    spec = spec_dict(smoke, work, f"bench-{label}", trials, concurrency, torch_trainer)
    spec_path = d / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    log(f"{label}: sweep of {trials} trials, concurrency {concurrency}")
    _child(["--child", "sweep", "--spec", str(spec_path), "--work", str(d), "--out", str(d / "sweep.json")],
           d / "sweep.log", timeout)
    sweep = json.loads((d / "sweep.json").read_text())
    (d / "replay.json").write_text(json.dumps(sweep["trials"]))
    log(f"{label}: bare Optuna loop on the same {len(sweep['trials'])} trials")
    _child(["--child", "bare", "--spec", str(spec_path), "--trials", str(d / "replay.json"), "--work", str(d),
            "--out", str(d / "bare.json")], d / "bare.log", timeout)
    bare = json.loads((d / "bare.json").read_text())
    return spec, sweep, bare


def same_values(sweep: dict, bare: dict) -> int:
    key = lambda t: json.dumps(t["params"], sort_keys=True)  # noqa: E731
    ref = {key(t): t["values"] for t in sweep["trials"]}
    return sum(1 for t in bare["trials"] if t["values"] is not None and ref.get(key(t)) is not None
               and all(abs(a - b) < 0.01 for a, b in zip(ref[key(t)], t["values"])))


def run(smoke: bool, work: Path) -> list[Row]:
    n_in, n_tt = (2, 1) if smoke else (24, 3)
    # The smoke run skips the TorchTrainer pair: one TorchTrainer trial alone costs ~25 s here, and
    # the smoke run must stay well under two minutes (tests/test_sweep.py runs that launch mode).
    s_in, b_in = measure_pair(smoke, work, "inproc", n_in, 2, False, timeout=900)[1:]
    s_tt, b_tt = (None, None) if smoke else measure_pair(smoke, work, "torchtrainer", n_tt, 1, True, timeout=900)[1:]

    rows: list[Row] = []
    for key, label, n, conc, s, b, target in (
        ("3a", "in-process launch (reused Tune actors)", n_in, 2, s_in, b_in, TARGET),
        ("3b", "TorchTrainer launch (2 Train workers/trial)", n_tt, 1, s_tt, b_tt, None),
    ):
        if s is None:
            continue
        over = (s["wall"] - b["wall"]) / n
        ratio = s["wall"] / b["wall"]
        phases = (f"sweep phases: setup to first trial start {s['setup']:.1f} s, trials {s['trials_span']:.1f} s, "
                  f"last trial end to return {s['finalize']:.1f} s; mean trial {s['mean_trial']:.2f} s in the sweep vs "
                  f"{b['mean_trial']:.2f} s bare; {s['finished']} finished, {s['failed']} failed; "
                  f"{same_values(s, b)}/{len(b['trials'])} replayed trials agree with the sweep's objectives within 0.01 points")
        rows.append(row(3, key, f"sweep wall / bare Optuna loop, {n} trials, {label}, concurrency {conc}",
                        s["wall"], "s", b["wall"], f"bare Optuna loop, n_jobs={conc}", ratio=ratio,
                        target=f"<= {target}x" if target else "", met=(ratio <= target) if target else None,
                        note=f"overhead {over:+.2f} s per trial; {phases}"))
    rows += memory.rows(s_in["memory"], b_in["memory"], s_tt and s_tt["memory"], b_tt and b_tt["memory"])
    return rows


if __name__ == "__main__":
    if "--child" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", choices=["sweep", "bare"])
        ap.add_argument("--spec", type=Path)
        ap.add_argument("--trials", type=Path)
        ap.add_argument("--work", type=Path)
        ap.add_argument("--out", type=Path)
        a = ap.parse_args()
        if a.child == "sweep":
            child_sweep(a.spec, a.out, a.work)
        else:
            child_bare(a.spec, a.trials, a.out)
    else:
        section_main(run)
