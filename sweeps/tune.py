"""Run a sweep: Ray Tune + a multi-objective Optuna searcher, tracked in MLflow (DESIGN §2).

Measured traps this module is built around (DESIGN §7):
- objectives go on the searcher only; `metric` in TuneConfig would make the study single-objective;
- a NaN objective leaves the Optuna trial RUNNING forever: non-finite or missing objectives
  become FAIL (:class:`SafeOptunaSearch`);
- a trial that raises loses its reused actor (20-30 s to replace): failures are caught inside
  the trial, logged FAILED to MLflow, and reported to Tune as a result without objectives;
- the MLflow sqlite store is created in the driver before any trial starts;
- Tune's driver state is saved every second (TUNE_GLOBAL_CHECKPOINT_S=1) so a killed driver
  resumes cleanly; retried and resumed trials reopen their own MLflow run by trial id.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps import mlflow_view, pareto, tracking
from sweeps.spec import SweepSpec, nest
from trainable.config import ConfigError

os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Snapshots every second are what we want (clean resume); Tune warns about them when trials checkpoint often.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Intermediate results (losses at checkpoints) carry no objectives; only the final one does.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

FAULT_KILL_AT_STEP = "ALIGNSWEEP_FAULT_KILL_AT_STEP"
"""Fault injection for tests: a trial SIGKILLs its own worker once, at the first checkpoint at
or after this step (after that checkpoint has been handed to Tune)."""
FAULT_MARKER = "ALIGNSWEEP_FAULT_MARKER"


# -- searcher ---------------------------------------------------------------------------------


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class SafeOptunaSearch(OptunaSearch):
        """OptunaSearch that (1) tells Optuna FAIL for a trial without finite values for every
        objective, instead of leaving it RUNNING, and (2) stops suggesting once the study holds
        ``max_trials`` trials that count: after a driver kill, trials Tune forgot but that did
        finish count towards the sweep, so a resumed sweep ends with exactly N completed."""

        def __init__(self, *args, max_trials: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.max_trials = max_trials
            self._counted: int | None = None  # trials that count, read from the study once per driver

        def suggest(self, trial_id: str):
            if self.max_trials is None or trial_id in self._ot_trials:
                return super().suggest(trial_id)
            if self._counted is None:
                # Read the study once (a resumed driver: it may hold trials Tune forgot), then count
                # locally: reading every trial back on each suggest costs O(trials) per trial.
                from optuna.trial import TrialState

                self._counted = sum(1 for t in self._ot_study.get_trials(deepcopy=False)
                                    if t.state != TrialState.FAIL or not t.user_attrs.get("orphaned"))
            if self._counted >= self.max_trials:
                return self.FINISHED
            params = super().suggest(trial_id)
            self._counted += trial_id in self._ot_trials
            return params

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            self._counted = None  # the study may have moved on since this state was saved

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            from optuna.trial import TrialState

            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)  # told before a driver kill; resumed trial re-reported it
                return
            values = [None if not result else result.get(m) for m in self.metric]
            if error or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                self._completed_trials.add(trial_id)
                try:
                    self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.FAIL)
                except RuntimeError as exc:
                    # GridSampler calls study.stop() once the grid is used up, which raises outside
                    # study.optimize() after the state is already stored; OptunaSearch swallows it too.
                    logging.getLogger(__name__).debug("optuna tell: %s", exc)
                return
            super().on_trial_complete(trial_id, result, error)

    return SafeOptunaSearch


def make_sampler(spec: SweepSpec):
    import optuna

    seed, n = spec.sampler.seed, spec.num_trials()
    kind = spec.sampler.kind
    if kind == "tpe":
        # constant_liar: concurrent trials see pending ones as bad, so they spread out
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=min(10, max(4, n // 3)))
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, 2 * spec.concurrency)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.GridSampler({k.replace(".", "/"): d.values for k, d in spec.space.items()}, seed=seed)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    def domain(d):
        if d.kind == "uniform":
            return tune.uniform(d.low, d.high)
        if d.kind == "loguniform":
            return tune.loguniform(d.low, d.high)
        if d.kind == "int":
            return tune.randint(int(d.low), int(d.high) + 1)
        return tune.choice(list(d.values))  # choice, and grid (the GridSampler walks it)

    return nest({k: domain(d) for k, d in spec.space.items()})


JOURNAL = "optuna-journal.log"


def optuna_storage_url(tracking_uri: str, storage_root: str) -> str:
    """Where the study's journal lives: beside the MLflow sqlite db, else in the local run storage,
    else (object storage) in the driver's working directory. ``optuna-dashboard <path>`` opens it live.

    A journal (append-only file, replayed in memory) and not sqlite: on sqlite every suggest reads
    the whole study back, ~40x the in-memory searcher's cost at 100 trials; the journal's is ~2x
    (DESIGN §7; benchmarks/scale.py rows 5d and 5e)."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / JOURNAL)
    if "://" not in storage_root:
        return str(Path(storage_root) / JOURNAL)
    return str(Path(JOURNAL).resolve())


def study_storage(location: str):
    """Optuna storage for a ``optuna_storage`` value: a database URL (``sqlite:///…``,
    ``postgresql://…``) or the path of a journal file."""
    import optuna

    if "://" in location:
        return optuna.storages.RDBStorage(location, engine_kwargs={"connect_args": {"timeout": 30}}
                                          if location.startswith("sqlite") else {})
    from sweeps.journal import UnsyncedJournalFileBackend

    return optuna.storages.JournalStorage(UnsyncedJournalFileBackend(location))


# -- the trial --------------------------------------------------------------------------------


@dataclass
class TrialContext:
    spec: SweepSpec
    uri: str
    experiment_id: str
    parent_id: str
    run_storage: str


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: train with the searched params, log to MLflow, report objectives to Tune."""
    from ray import tune
    from ray.tune import Checkpoint

    tctx = tune.get_context()
    logger = tracking.TrialLogger(ctx.uri, ctx.experiment_id, ctx.parent_id, tctx.get_trial_id(), tctx.get_trial_name())
    stored = logger.open(params)
    if stored is not None:  # a re-run of a trial that already finished: report, don't retrain
        tune.report({**stored, "trial_status": "FINISHED"})
        return
    spec, step = ctx.spec, 0
    try:
        config = spec.trial_config(params)
        mode = spec.resources.mode()
        if mode == "torch_trainer":
            from trainable.worker import fit_with_ray_train

            r = spec.resources
            final = fit_with_ray_train(config, r.workers_per_trial, use_gpu=r.gpus_per_worker > 0,
                                       cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker or 1,
                                       on_report=logger, storage_path=ctx.run_storage, name=f"{tctx.get_trial_name()}-train")
        else:
            from trainable.loop import checkpoint_step, train_loop

            kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "0"))

            def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
                nonlocal step
                step = int(metrics.get("step", step))
                logger(metrics, checkpoint)
                if checkpoint is None:
                    return
                if kill_at and step >= kill_at and not Path(os.environ[FAULT_MARKER]).exists():
                    Path(os.environ[FAULT_MARKER]).write_text(str(step))
                    os.kill(os.getpid(), signal.SIGKILL)
                status = {"trial_status": "FINISHED"} if all(m in metrics for m in spec.metrics) else {}
                tune.report({**metrics, **status}, checkpoint=Checkpoint.from_directory(str(checkpoint)))

            resume = tune.get_checkpoint()
            if resume is not None:
                with resume.as_directory() as path:
                    logger.tag(resumed_from_step=str(checkpoint_step(path)))
                    final = train_loop(config, report, resume_from=path)
            else:
                final = train_loop(config, report)
    except Exception as err:  # noqa: BLE001 - every failure becomes a FAILED trial, the sweep goes on
        reason = f"{type(err).__name__}: {err}"
        logger.finish(None, "FAILED", step=getattr(err, "step", step), reason=reason)
        tune.report({"trial_status": "FAILED", "failure": reason})
        return
    logger.finish(final, "FINISHED", step=config.budget_steps)
    if mode == "torch_trainer":
        tune.report({**final, "trial_status": "FINISHED"})


# -- progress ---------------------------------------------------------------------------------


def _progress_callback(spec: SweepSpec, total: int):
    from ray.tune import Callback

    class SweepProgress(Callback):
        """Live terminal view: done / running / failed, front size and hypervolume so far.

        Counts come from Tune's trial list, so a resumed sweep shows the trials it restored."""

        def __init__(self):
            self.started = time.monotonic()
            self.live = None
            if sys.stdout.isatty():
                from rich.live import Live

                self.live = Live("", refresh_per_second=2, transient=True)
                self.live.start()

        def _summary(self, trials, ending=None) -> tuple[str, str]:
            # Tune calls on_trial_complete before it marks the trial TERMINATED: count it as done.
            done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is ending]
            results = [t.last_result or {} for t in done]
            ok = [r for r in results if r.get("trial_status") == "FINISHED"]
            running = sum(t.status == "RUNNING" and t is not ending for t in trials)
            pts = _arr([[r.get(m, math.nan) for m in spec.metrics] for r in ok], len(spec.metrics))
            ref = spec.reference or pareto.default_reference(spec.modes)
            front = int(pareto.non_dominated(pts, spec.modes).sum()) if len(ok) else 0
            hv = pareto.hypervolume(pts, spec.modes, ref) if len(ok) else 0.0
            head = f"{len(results)}/{total} done, {running} running, {len(results) - len(ok)} failed"
            return head, f"front {front}, hypervolume {hv:.1f}, {time.monotonic() - self.started:.0f}s"

        def _show(self, trials, line: str | None = None, ending=None) -> None:
            head, tail = self._summary(trials, ending)
            if self.live is not None:
                from rich.panel import Panel

                self.live.update(Panel(tail, title=f"sweep {spec.name}: {head}"))
            elif line is not None:
                print(f"[{head}] {line}; {tail}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            vals = ", ".join(f"{m}={r[m]:.1f}" for m in spec.metrics if isinstance(r.get(m), (int, float)))
            self._show(trials, f"{trial.trial_id} {r.get('trial_status', 'ERROR')} {vals}".rstrip(), trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._show(trials, f"{trial.trial_id} ERROR", trial)

        def on_experiment_end(self, trials, **info):
            if self.live is not None:
                self.live.stop()

    return SweepProgress()


def _arr(rows, k: int):
    import numpy as np

    return np.asarray(rows, dtype=float).reshape(len(rows), k)


# -- the sweep --------------------------------------------------------------------------------


@dataclass
class SweepResult:
    name: str
    experiment_id: str
    parent_run_id: str
    path: str
    finished: int
    failed: int
    killed: int
    hypervolume: float
    front: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def _storage(storage: str):
    """(root for Tune, pyarrow filesystem, path in it): local paths made absolute, URIs (s3://, gs://) kept."""
    import pyarrow.fs

    if "://" in storage:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        return storage.rstrip("/"), fs, path
    root = Path(storage).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return str(root), pyarrow.fs.LocalFileSystem(), str(root)


def _latest_sweep(fs, root: str, name: str) -> str | None:
    """The newest `<name>-<timestamp>` sweep directory under the storage root."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith(f"{name}-"))
    return names[-1] if names else None


def run_sweep(spec: SweepSpec, tracking_uri: str, storage: str | None = None, address: str | None = None,
              resume: bool = False) -> SweepResult:
    """Prepare shared artifacts, run every trial, then write the front back to MLflow."""
    import ray
    from ray import tune

    start = time.monotonic()
    storage_root, fs, fs_root = _storage(storage or spec.storage or "runs")
    sweep_name = _latest_sweep(fs, fs_root, spec.name) if resume else None
    if resume and sweep_name is None:
        raise ConfigError(f"--resume: no earlier sweep '{spec.name}' under {storage_root}")
    sweep_name = sweep_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_path = f"{storage_root}/{sweep_name}"

    # Ray's start-up (~3 s here) runs beside the driver's own preparation, which mostly waits on
    # imports and disk: the shared artifacts (once, here; every trial then loads them from the
    # cache) and the MLflow store (a fresh sqlite db migrates its schema for ~1.4 s).
    with ThreadPoolExecutor(max_workers=1) as pool:
        prepared = pool.submit(_prepare, spec, tracking_uri)
        local = _start_ray(address)
        try:
            _check_fits(spec, local)
            hashes = prepared.result()
        except BaseException:
            ray.shutdown()
            raise
    try:
        experiment_id = tracking.ensure_experiment(tracking_uri, spec.experiment_name)
        parent_id = tracking.start_parent(tracking_uri, experiment_id, spec, sweep_path, hashes)
        ctx = TrialContext(spec, tracking_uri, experiment_id, parent_id, storage_root)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), spec.resources.trial_bundle())
        if resume and tune.Tuner.can_restore(sweep_path):
            _fail_unowned_optuna_trials(sweep_path)
            tuner = tune.Tuner.restore(sweep_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            searcher = _searcher_class()(
                metric=spec.metrics, mode=spec.modes, sampler=make_sampler(spec), study_name=sweep_name,
                storage=study_storage(optuna_storage_url(tracking_uri, storage_root)), max_trials=spec.num_trials(),
            )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(spec),
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=spec.num_trials(),
                                            max_concurrent_trials=spec.concurrency, reuse_actors=True,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name=sweep_name, storage_path=storage_root, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                          # no num_to_keep: rotation deletes checkpoints that the last
                                          # driver snapshot still points at, and a resume then fails
                                          callbacks=[_progress_callback(spec, spec.num_trials())]),
            )
        try:
            grid = tuner.fit()
        except BaseException as err:
            tracking.abort_parent(tracking_uri, experiment_id, parent_id, f"{type(err).__name__}: {err}")
            raise
        checkpoints = {res.metrics.get("trial_id"): res.checkpoint.path for res in grid
                       if res.checkpoint is not None and res.metrics}
    except BaseException:
        ray.shutdown()
        raise
    # Ray's shutdown (~1.4 s here) runs beside finalize, which needs only MLflow and the study.
    with ThreadPoolExecutor(max_workers=1) as pool:
        stopping = pool.submit(ray.shutdown)
        result = finalize(spec, tracking_uri, experiment_id, parent_id, sweep_path, checkpoints,
                          optuna_storage_url(tracking_uri, storage_root), sweep_name, time.monotonic() - start)
        stopping.result()
    return result


def _prepare(spec: SweepSpec, tracking_uri: str) -> list[str]:
    """The shared artifacts' content hashes, and an initialised MLflow store (nothing logged yet)."""
    from trainable.loop import prepare_artifacts

    hashes = sorted({prepare_artifacts(cfg).key for cfg in spec.artifact_variants()})
    tracking._client(tracking_uri).search_experiments(max_results=1)
    return hashes


def _start_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address`` or ``RAY_ADDRESS``, else start an embedded Ray.
    Returns whether Ray is embedded (local)."""
    import ray

    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        return True
    return False


def _check_fits(spec: SweepSpec, local: bool) -> None:
    """One trial must fit the cluster, or Tune waits for resources forever. An embedded Ray has
    all it will ever have: refuse. A cluster may be autoscaling: warn."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        spec.resources.check_fits(nodes)
    except ConfigError as err:
        if local:
            raise
        logging.getLogger(__name__).warning("%s (now; trials wait unless the cluster scales up)", err)


def _trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"


def _fail_unowned_optuna_trials(sweep_path: str) -> None:
    """After a driver kill, Optuna trials started after Tune's last save are RUNNING with no owner."""
    from optuna.trial import TrialState

    searcher = _searcher_class()()
    try:
        searcher.restore_from_dir(sweep_path)
    except (FileNotFoundError, RuntimeError):
        return
    owned = {t.number for tid, t in searcher._ot_trials.items() if tid not in searcher._completed_trials}
    study = searcher._ot_study  # its pickled storage: the study this sweep started on
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number not in owned:
            study._storage.set_trial_user_attr(t._trial_id, "orphaned", True)
            study.tell(t.number, state=TrialState.FAIL)


def finalize(spec: SweepSpec, uri: str, experiment_id: str, parent_id: str, sweep_path: str,
             checkpoints: dict, study_url: str, study_name: str, wall_s: float) -> SweepResult:
    """Read every child run back from MLflow, tag the front, and log it to the parent run."""
    import tempfile

    import optuna
    from optuna.trial import TrialState

    client = tracking._client(uri)
    killed = tracking.close_orphans(uri, experiment_id, parent_id)
    # Optuna trials still RUNNING now belong to no live Tune trial.
    try:
        study = optuna.load_study(study_name=study_name, storage=study_storage(study_url))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
    except KeyError:
        pass

    runs = tracking.child_runs(uri, experiment_id, parent_id)
    rows = [tracking.run_row(r) for r in runs if r.info.status == "FINISHED"]
    failed = sum(r.info.status == "FAILED" for r in runs)
    front = pareto.front_rows(rows, spec.metrics, spec.modes)
    ref = spec.reference or pareto.default_reference(spec.modes)
    hv = pareto.hypervolume(_arr([[row[m] for m in spec.metrics] for row in rows], len(spec.metrics)), spec.modes, ref)
    front_ids = {row["run_id"] for row in front}
    finished = {row["run_id"] for row in rows}
    for run in runs:  # one write per run: each sqlite write costs 12-80 ms
        tags = {"pareto": str(run.info.run_id in front_ids).lower()} if run.info.run_id in finished else {}
        if ckpt := checkpoints.get(run.data.tags.get(tracking.TRIAL_TAG)):
            tags["checkpoint_uri"] = ckpt
        if tags:
            tracking._batch(client, run.info.run_id, tags=tags)
    # The MLflow UI as the sweep's dashboard: saved Pareto view, coloured front, parent description.
    # Never raises: a refused view is a warning, not a failed sweep.
    mlflow_view.publish_sweep_view(client, experiment_id, parent_id, spec, rows, front_ids, hv, failed, killed=killed)

    searched = list(spec.space)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cols = ["run_name", "trial_id", "run_id", *spec.metrics, *searched]
        _write_csv(tmp_path / "pareto_front.csv", front, cols)
        (tmp_path / "pareto_front.json").write_text(json.dumps(
            {"objectives": spec.metrics, "modes": spec.modes, "reference": ref, "hypervolume": hv, "front": front},
            indent=2, default=str))
        title = f"{spec.name}: {len(front)} of {len(rows)} trials on the front"
        if rows:
            pareto.plot_png(rows, front, spec.metrics, spec.modes, tmp_path / "pareto.png", title)
            pareto.plot_html(rows, front, spec.metrics, spec.modes, tmp_path / "pareto.html", title, searched)
        for f in tmp_path.iterdir():
            client.log_artifact(parent_id, str(f))
    complete = len(rows) + failed >= spec.num_trials()
    tracking._batch(client, parent_id, metrics={"hypervolume": hv, "trials_finished": len(rows), "trials_failed": failed,
                                                "trials_killed": killed, "front_size": len(front), "wall_s": wall_s},
                    tags={"optuna_storage": study_url, "optuna_study": study_name,
                          "interrupted": str(not complete).lower()})
    client.set_terminated(parent_id, status="FINISHED" if complete else "KILLED")
    return SweepResult(spec.name, experiment_id, parent_id, sweep_path, len(rows), failed, killed, hv, front, wall_s)


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in cols})
