"""5. Scale: driver + searcher overhead per trial after ~100 and ~1,000 trials, 64 at a time.

The trials are trivially cheap (a Tune function trainable that only reports two objective
values), so what a trial costs is the service around it. Local Ray with 64 logical CPUs
(``ray.init(num_cpus=64)``) so 64 one-CPU trials run at once on this 2-core machine, reused
actors, the sweeps' Tune settings (``sweeps/__init__.py`` env defaults: driver state saved every
second). Searcher: the sweeps' ``SafeOptunaSearch`` with the ``pareto`` spec's 6-knob space and
its multi-objective TPE (``make_sampler``) on the journal file run_sweep uses.

Driver overhead per trial = CPU seconds of the driver process (all its threads: Tune's loop, the
searcher, Ray's client threads) across a window of 32 trial completions / 32, from one 1,000-trial
run: completions 69-100 (the study then holds ~130-165 trials) and 905-936 (~970-1,000; later
completions have no suggestions left to make). Wall time per trial over the same windows is
reported beside it: on 2 cores it is set by the worker processes, not the driver. Searcher calls
(suggest + on_trial_complete) are timed inside the driver. Rows 5d/5e: the same searcher object
driven directly (64 pending, no Tune) on the journal, and on the sqlite RDB storage run_sweep
used before, each against the same searcher in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO, Row, log, row, run_clean, section_main

TARGET_MS = 50.0


def _spec(trials: int, concurrency: int):
    from sweeps.spec import SweepSpec
    from trainable.config import build_config

    spec = yaml.safe_load((REPO / "sweeps" / "specs" / "pareto.yaml").read_text())
    spec.update(name="bench-scale", trials=trials, concurrency=concurrency)
    return build_config(SweepSpec, spec)


def report_only(config: dict) -> None:
    """The trivially cheap trial: two objective values, nothing else."""
    from ray import tune

    rng = random.Random(json.dumps(config, sort_keys=True, default=str))
    tune.report({"kd_alignment": 100 * rng.random(), "noise_robustness": 100 * rng.random()})


def child(trials: int, concurrency: int, out: Path) -> None:
    """One Ray session (``concurrency`` logical CPUs), one Tuner, CPU time of every process sampled."""
    import psutil

    import sweeps.searcher as ss  # first: the sweeps' Tune env defaults apply before Tune is imported
    import ray
    from ray import tune

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    me, cpu, halt = psutil.Process(), {}, threading.Event()

    def sample_cpu() -> None:  # last-seen CPU seconds of every descendant (dead ones keep their last value)
        while not halt.is_set():
            for p in me.children(recursive=True):
                try:
                    title = " ".join(p.cmdline()) or p.name()
                    t = p.cpu_times()
                    cpu[p.pid] = ("worker" if title.startswith("ray::") else "ray system", t.user + t.system)
                except psutil.Error:
                    pass
            halt.wait(1.0)

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t_driver = sum(me.cpu_times()[:2])
        sampler.start()
        result = one_run(ss, tune, "optuna-journal", trials, concurrency)
        halt.set()
        sampler.join()
        result["cpu"] = {"driver": sum(me.cpu_times()[:2]) - t_driver,
                         "workers": sum(c for k, c in cpu.values() if k == "worker"),
                         "ray system": sum(c for k, c in cpu.values() if k == "ray system"),
                         "worker processes": sum(1 for k, _ in cpu.values() if k == "worker")}
        out.write_text(json.dumps(result))
    finally:
        ray.shutdown()


def searcher_alone(storage_kind: str, trials: int, pending: int) -> list[tuple[int, float]]:
    """The sweeps' searcher driven directly, ``pending`` trials in flight: (trial number, seconds
    of suggest + complete) per completed trial."""
    import optuna

    import sweeps.searcher as ss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = _spec(trials, pending)
    tmp = Path(tempfile.mkdtemp(prefix="bench-searcher-"))
    storage = (ss.study_storage(f"sqlite:///{tmp / 'optuna.db'}") if storage_kind == "rdb" else
               ss.study_storage(str(tmp / ss.JOURNAL)) if storage_kind == "journal" else None)
    searcher = ss.SweepSearcher(metric=spec.metrics, mode=spec.modes, sampler=ss.make_sampler(spec),
                                    storage=storage, study_name="bench-searcher", max_trials=trials)
    searcher.set_search_properties(None, None, ss.param_space(spec))
    rng, inflight, costs, seconds = random.Random(0), [], [], 0.0
    for i in range(trials):
        t = time.perf_counter()
        searcher.suggest(f"t{i}")
        seconds += time.perf_counter() - t
        inflight.append(f"t{i}")
        if len(inflight) >= pending or i == trials - 1:
            done = inflight.pop(0)
            t = time.perf_counter()
            searcher.on_trial_complete(done, {"kd_alignment": 100 * rng.random(), "noise_robustness": 100 * rng.random()})
            seconds += time.perf_counter() - t
            costs.append((i + 1, seconds))
            seconds = 0.0
    shutil.rmtree(tmp, ignore_errors=True)
    return costs


def one_run(ss, tune, searcher_kind: str, trials: int, concurrency: int) -> dict:
    spec = _spec(trials, concurrency)
    calls: list[tuple[float, float]] = []  # (end time, seconds) of every searcher call

    class Timed(ss.SweepSearcher):
        def suggest(self, trial_id):
            t = time.monotonic()
            try:
                return super().suggest(trial_id)
            finally:
                calls.append((time.monotonic(), time.monotonic() - t))

        def on_trial_complete(self, trial_id, result=None, error=False):
            t = time.monotonic()
            try:
                return super().on_trial_complete(trial_id, result, error)
            finally:
                calls.append((time.monotonic(), time.monotonic() - t))

    completions: list[tuple[float, float]] = []  # (wall, driver CPU) at each completion

    class Completions(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            completions.append((time.monotonic(), time.process_time()))

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    searcher = None
    if searcher_kind != "basic":
        storage = ss.study_storage(str(tmp / ss.JOURNAL)) if searcher_kind == "optuna-journal" else None
        searcher = Timed(metric=spec.metrics, mode=spec.modes, sampler=ss.make_sampler(spec), storage=storage,
                         study_name="bench-scale", max_trials=trials)
    tuner = tune.Tuner(
        tune.with_resources(report_only, {"CPU": 1}),
        param_space=ss.param_space(spec),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials, max_concurrent_trials=concurrency,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=f"scale-{searcher_kind}", storage_path=str(tmp / "runs"), verbose=0,
                                  callbacks=[Completions()]),
    )
    t0 = time.monotonic()
    grid = tuner.fit()
    wall = time.monotonic() - t0
    ok = sum(1 for r in grid if r.metrics and "kd_alignment" in r.metrics)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"wall": wall, "ok": ok, "t0": t0, "completions": sorted(completions), "calls": calls}


def window(run: dict, end: int, width: int) -> tuple[float, float, float]:
    """(wall ms, driver CPU ms, searcher ms) per trial across completions end-width+1 .. end."""
    (lo, cpu_lo), (hi, cpu_hi) = run["completions"][end - width - 1], run["completions"][end - 1]
    searcher = sum(d for t, d in run["calls"] if lo < t <= hi)
    return 1e3 * (hi - lo) / width, 1e3 * (cpu_hi - cpu_lo) / width, 1e3 * searcher / width


def run(smoke: bool, work: Path) -> list[Row]:
    n, conc, width = (12, 2, 2) if smoke else (1000, 64, 32)
    ends = (6, n - conc) if smoke else (100, n - conc)
    out = work / "scale.json"
    log(f"scale: {n} trivially cheap trials through Tune + OptunaSearch, {conc} at a time")
    rc = run_clean([sys.executable, "-m", "benchmarks.scale", "--child", str(n), "--concurrency", str(conc),
                    "--out", str(out)], work / "scale.log", timeout=1200)
    if rc != 0:
        raise RuntimeError(f"scale child exited {rc}: " + (work / "scale.log").read_text()[-3000:])
    res = json.loads(out.read_text())
    if res["ok"] != n:
        raise RuntimeError(f"scale run: {res['ok']} of {n} trials reported")
    log("scale: the searcher alone, in memory, on the journal and on sqlite RDB")
    m = min(n, 100)
    alone = {kind: searcher_alone(kind, (n if kind != "rdb" else m) + (4 if smoke else 0), conc)
             for kind in ("memory", "journal", "rdb")}

    rows: list[Row] = []
    (wall_lo, cpu_lo, s_lo), (wall_hi, cpu_hi, s_hi) = window(res, ends[0], width), window(res, ends[1], width)
    cpu = res["cpu"]
    rows.append(row(5, "5a", f"driver CPU per trial after ~{ends[0]} trials / wall per trial, same window (Tune + "
                    "SafeOptunaSearch, MO TPE, journal storage as run_sweep)", cpu_lo, "ms", wall_lo,
                    "wall per trial, same window",
                    note=f"searcher calls {s_lo:.1f} ms per trial; {conc} trials at a time; CPU over the whole run: "
                         f"driver {cpu['driver']:.0f} s, Ray worker processes {cpu['workers']:.0f} s, Ray system "
                         f"processes {cpu['ray system']:.0f} s, of {res['wall'] * (os.cpu_count() or 1):.0f} CPU-s "
                         "available"))
    rows.append(row(5, "5b", f"driver CPU per trial after ~{n} trials / after ~{ends[0]} (same run)", cpu_hi, "ms",
                    cpu_lo, f"driver CPU per trial after ~{ends[0]}",
                    target="" if smoke else f"< {TARGET_MS:.0f} ms at 1,000", met=None if smoke else cpu_hi < TARGET_MS,
                    note=f"completions {ends[1] - width + 1}-{ends[1]}; searcher calls {s_hi:.1f} ms of it"))
    rows.append(row(5, "5c", f"wall per trial after ~{n} trials / the driver's CPU per trial (same window)", wall_hi,
                    "ms", cpu_hi, "driver CPU per trial",
                    note=f"wall per trial {wall_lo:.0f} ms after ~{ends[0]}; all-in {1e3 * res['wall'] / n:.0f} ms over "
                         f"the {n}-trial run; at least {cpu['worker processes']} Ray worker processes seen for {n} "
                         f"trials ({cpu['workers']:.0f} CPU-s): a finishing trial's actor is reused only if a trial "
                         "is already staged for it, and Tune asks the searcher for the next one after the completion, "
                         "so with many trials finishing at once most completions start a new worker process"))
    at = lambda costs, k: 1e3 * sum(c for i, c in costs if k - width < i <= k) / width  # noqa: E731
    mem, jrn, rdb = alone["memory"], alone["journal"], alone["rdb"]
    rows.append(row(5, "5d", f"searcher alone, suggest + complete per trial at ~{m} trials ({conc} pending): journal "
                    "storage (as run_sweep) / in memory", at(jrn, m), "ms", at(mem, m), "the same searcher in memory",
                    note=f"at ~{n} trials: journal {at(jrn, n):.1f} ms, in memory {at(mem, n):.1f} ms; SafeOptunaSearch "
                         "driven directly (no Tune); the journal appends each study write to its file, without "
                         "fsync (sweeps/journal.py)"))
    rows.append(row(5, "5e", f"searcher alone at ~{m} trials: sqlite RDB storage (run_sweep before the journal) / in "
                    "memory", at(rdb, m), "ms", at(mem, m), "the same searcher in memory",
                    note="every suggest reads the whole study back from sqlite"))
    return rows


if __name__ == "__main__":
    if "--child" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", type=int)
        ap.add_argument("--concurrency", type=int)
        ap.add_argument("--out", type=Path)
        a = ap.parse_args()
        child(a.child, a.concurrency, a.out)
    else:
        section_main(run)
