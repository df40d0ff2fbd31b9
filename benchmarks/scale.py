"""5. Scale: driver + searcher overhead per trial after ~100 and ~1,000 trials, 64 at a time.

The trials are trivially cheap (a Tune function trainable that only reports two objective
values), so what a trial costs is the service around it. Local Ray with 64 logical CPUs
(``ray.init(num_cpus=64)``) so 64 one-CPU trials run at once on this 2-core machine. The Tuner is
built as ``sweeps.tune`` builds it: the sweeps' Tune settings (``sweeps/__init__.py`` env
defaults: no TensorBoard/CSV loggers; ``pace_driver_snapshots``: driver state saved every second
until a save takes over 50 ms), reused actors, ``SweepSearchGenerator`` around the
``SweepSearcher`` with the ``pareto`` spec's 6-knob space and its multi-objective TPE
(``make_sampler``) on the journal file run_sweep uses, ``num_samples=-1`` (the searcher's count
ends the sweep), and run_sweep's live view (``SweepProgress``, one line per finished trial here).

Driver overhead per trial = CPU seconds of the driver process (all its threads: Tune's loop, the
searcher, Tune's experiment-state upload, Ray's client threads) across a window of 32 trial
completions / 32, from one 1,000-trial run: completions 69-100 (the study then holds ~130-165
trials) and 905-936 (~970-1,000; later completions have no suggestions left to make). Wall time
per trial over the same windows is reported beside it (row 5c: its growth from ~100 to ~1,000).
Searcher calls (suggest + on_trial_complete) are timed inside the driver. Rows 5d/5e: the same
searcher object driven directly (64 pending, no Tune) on the journal, and on the sqlite RDB
storage run_sweep used before, each against the same searcher in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO, Row, log, row, run_clean, section_main

TARGET_MS = 50.0
TARGET_WALL_GROWTH = 1.5


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
    tune.report({"kd_alignment": 100 * rng.random(), "noise_robustness": 100 * rng.random(), "trial_status": "FINISHED"})


def sample_cpu(driver: int, out: Path) -> None:
    """Last-seen CPU seconds of every descendant of ``driver`` (dead ones keep their last value),
    sampled each second until ``out.stop`` appears. A process of its own: sampled from a thread,
    its ~10% of the driver's CPU (py-spy) was counted as the service's."""
    import psutil

    me, cpu, stop = os.getpid(), {}, out.with_suffix(".stop")
    while not stop.exists():
        try:
            children = psutil.Process(driver).children(recursive=True)
        except psutil.Error:
            break
        for p in children:
            if p.pid == me:
                continue
            try:
                title = " ".join(p.cmdline()) or p.name()
                t = p.cpu_times()
                cpu[p.pid] = ("worker" if title.startswith("ray::") else "ray system", t.user + t.system)
            except psutil.Error:
                pass
        time.sleep(1.0)
    out.write_text(json.dumps(list(cpu.values())))


def child(trials: int, concurrency: int, out: Path) -> None:
    """One Ray session (``concurrency`` logical CPUs), one Tuner, CPU time of every process sampled."""
    import psutil

    import sweeps.searcher as ss  # first: the sweeps' Tune env defaults apply before Tune is imported
    import ray
    from ray import tune

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    me, samples = psutil.Process(), out.with_suffix(".cpu.json")
    sampler = subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--sample", str(os.getpid()), "--out",
                                str(samples)])
    ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t_driver = sum(me.cpu_times()[:2])
        result = one_run(ss, tune, "optuna-journal", trials, concurrency)
        driver = sum(me.cpu_times()[:2]) - t_driver
        samples.with_suffix(".stop").touch()
        sampler.wait(timeout=60)
        cpu = json.loads(samples.read_text())
        result["cpu"] = {"driver": driver,
                         "workers": sum(c for k, c in cpu if k == "worker"),
                         "ray system": sum(c for k, c in cpu if k == "ray system"),
                         "worker processes": sum(1 for k, _ in cpu if k == "worker")}
        out.write_text(json.dumps(result))
    finally:
        ray.shutdown()
        if sampler.poll() is None:
            sampler.kill()


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
    from ray.tune.logger import JsonLoggerCallback

    from sweeps.progress import SweepProgress
    from sweeps.tune import pace_driver_snapshots

    storage = ss.study_storage(str(tmp / ss.JOURNAL)) if searcher_kind == "optuna-journal" else None
    searcher = Timed(metric=spec.metrics, mode=spec.modes, sampler=ss.make_sampler(spec), storage=storage,
                     study_name="bench-scale", max_trials=trials)
    name = lambda trial: f"trial-{trial.trial_id}"  # noqa: E731  (sweeps.tune names trials so)
    pace_driver_snapshots()
    tuner = tune.Tuner(  # as sweeps.tune._fit builds it, with report_only for run_trial
        tune.with_resources(report_only, {"CPU": 1}),
        param_space=ss.param_space(spec),
        tune_config=tune.TuneConfig(search_alg=ss.SweepSearchGenerator(searcher, concurrency), num_samples=-1,
                                    reuse_actors=True, trial_name_creator=name, trial_dirname_creator=name),
        run_config=tune.RunConfig(name=f"scale-{searcher_kind}", storage_path=str(tmp / "runs"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  callbacks=[SweepProgress(spec, trials, [0.0, 0.0]), JsonLoggerCallback(),
                                             Completions()]),
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
    rows.append(row(5, "5a", f"driver CPU per trial after ~{ends[0]} trials / wall per trial, same window (Tune as "
                    "run_sweep builds it, SweepSearcher, MO TPE, journal storage)", cpu_lo, "ms", wall_lo,
                    "wall per trial, same window",
                    note=f"searcher calls {s_lo:.1f} ms per trial; {conc} trials at a time; CPU over the whole run: "
                         f"driver {cpu['driver']:.0f} s, Ray worker processes {cpu['workers']:.0f} s, Ray system "
                         f"processes {cpu['ray system']:.0f} s, of {res['wall'] * (os.cpu_count() or 1):.0f} CPU-s "
                         "available"))
    rows.append(row(5, "5b", f"driver CPU per trial after ~{n} trials / after ~{ends[0]} (same run)", cpu_hi, "ms",
                    cpu_lo, f"driver CPU per trial after ~{ends[0]}",
                    target="" if smoke else f"<= {TARGET_MS:.0f} ms at 1,000", met=None if smoke else cpu_hi <= TARGET_MS,
                    note=f"completions {ends[1] - width + 1}-{ends[1]}; searcher calls {s_hi:.1f} ms of it"))
    rows.append(row(5, "5c", f"wall per trial after ~{n} trials / after ~{ends[0]} (same run)", wall_hi, "ms", wall_lo,
                    f"wall per trial after ~{ends[0]}",
                    target="" if smoke else f"<= {TARGET_WALL_GROWTH}x", met=None if smoke else
                    wall_hi <= TARGET_WALL_GROWTH * wall_lo,
                    note=f"driver CPU {cpu_hi:.0f} ms of the {wall_hi:.0f} ms after ~{n}; all-in {1e3 * res['wall'] / n:.0f} "
                         f"ms per trial over the {n}-trial run; {cpu['worker processes']} Ray worker processes seen for "
                         f"{n} trials ({cpu['workers']:.0f} CPU-s): a finishing trial's actor is kept for reuse only "
                         "when no other actor is cached or a trial is staged for it, so with many trials finishing "
                         "at once some completions start a new worker process"))
    at = lambda costs, k: 1e3 * sum(c for i, c in costs if k - width < i <= k) / width  # noqa: E731
    mem, jrn, rdb = alone["memory"], alone["journal"], alone["rdb"]
    rows.append(row(5, "5d", f"searcher alone, suggest + complete per trial at ~{m} trials ({conc} pending): journal "
                    "storage (as run_sweep) / in memory", at(jrn, m), "ms", at(mem, m), "the same searcher in memory",
                    note=f"at ~{n} trials: journal {at(jrn, n):.1f} ms, in memory {at(mem, n):.1f} ms; SweepSearcher "
                         "driven directly (no Tune); the journal appends each study write to its file, without "
                         "fsync (sweeps/journal.py)"))
    rows.append(row(5, "5e", f"searcher alone at ~{m} trials: sqlite RDB storage (run_sweep before the journal) / in "
                    "memory", at(rdb, m), "ms", at(mem, m), "the same searcher in memory",
                    note="every suggest reads the whole study back from sqlite"))
    return rows


if __name__ == "__main__":
    if "--sample" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--sample", type=int)
        ap.add_argument("--out", type=Path)
        a = ap.parse_args()
        sample_cpu(a.sample, a.out)
    elif "--child" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", type=int)
        ap.add_argument("--concurrency", type=int)
        ap.add_argument("--out", type=Path)
        a = ap.parse_args()
        child(a.child, a.concurrency, a.out)
    else:
        section_main(run)
