"""Run a sweep: Ray Tune + a multi-objective Optuna searcher, tracked in MLflow (DESIGN §2).

The pieces, one job each: :mod:`sweeps.searcher` (Optuna inside Tune), :mod:`sweeps.trial` (one
trial), :mod:`sweeps.progress` (the live view), :mod:`sweeps.front` (the end: front and parent run).
This module starts, resumes and stops them.

Measured traps this module is built around (DESIGN §7):
- objectives go on the searcher only; `metric` in TuneConfig would make the study single-objective;
- the MLflow sqlite store is created in the driver before any trial starts;
- Tune's driver state is saved every second (sweeps/__init__.py) so a killed driver
  resumes cleanly; after a kill, Optuna trials that Tune no longer owns are failed as orphans,
  unless their trial finished its MLflow run before the kill (then the study takes its values);
- Tune catches the first Ctrl-C and returns normally: the trials it stopped are resumed later, so
  their Optuna trials stay open; a second Ctrl-C raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sweeps import PREPARING_THREAD, StartupError, tracking
from sweeps.front import SweepResult, finalize, references
from sweeps.progress import SweepProgress
from sweeps.searcher import (SWEEP_RECORD, SweepSearcher, SweepSearchGenerator, fail_orphaned_trials, journal_path,
                             make_sampler, param_space, study_storage)
from sweeps.spec import SweepSpec
from sweeps.trial import TrialContext, run_trial
from trainable.config import ConfigError, default_cache_dir

log = logging.getLogger(__name__)

SWEEP_NAME = re.compile(r"-\d{8}-\d{6}$")
"""A sweep directory is ``<spec name>-<YYYYmmdd-HHMMSS>``."""


# -- where a sweep lives, and what it was started with ----------------------------------------


def _storage(storage: str):
    """(root for Tune, pyarrow filesystem, path in it): local paths made absolute, URIs (s3://, gs://) kept."""
    import pyarrow.fs

    if "://" in storage:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        return storage.rstrip("/"), fs, path
    root = Path(storage).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return str(root), pyarrow.fs.LocalFileSystem(), str(root)


def find_sweep(fs, root: str, name: str) -> str | None:
    """The newest sweep directory of exactly this spec name (``pareto`` never picks ``pareto-big-…``)."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith(f"{name}-") and SWEEP_NAME.fullmatch(i.base_name[len(name):]))
    return names[-1] if names else None


def spec_fields(spec: SweepSpec) -> dict[str, Any]:
    """What identifies a sweep: every spec field but ``trials``, which a resume may grow."""
    return json.loads(json.dumps(spec.model_dump(mode="json", exclude={"trials"}), sort_keys=True))


def spec_hash(spec: SweepSpec) -> str:
    return hashlib.sha256(json.dumps(spec_fields(spec), sort_keys=True).encode()).hexdigest()[:16]


def resumed_spec(spec: SweepSpec, record: dict[str, Any], trials: int | None) -> SweepSpec:
    """The spec a resume runs: refuse any change since the sweep started, except a larger
    explicit ``--trials``. Without ``--trials`` the sweep keeps the count it was started with."""
    before, now = tracking.flatten(record["spec"]), tracking.flatten(spec_fields(spec))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k, "<unset>") != now.get(k, "<unset>"))
    if changed:
        shown = ", ".join(f"{k} ({before.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(f"--resume: the spec changed since the sweep started: {shown}{more}; "
                          "resume with the same spec, or start a new sweep without --resume")
    started = int(record["trials"])
    if trials is not None and trials < started:
        raise ConfigError(f"--trials: a resumed sweep can only grow; it was started with {started}, got {trials}")
    return spec.model_copy(update={"trials": trials or started})


def _read_record(fs, sweep_dir: str) -> dict[str, Any] | None:
    import pyarrow.fs

    path = f"{sweep_dir}/{SWEEP_RECORD}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_record(fs, sweep_dir: str, spec: SweepSpec) -> None:
    fs.create_dir(sweep_dir, recursive=True)
    with fs.open_output_stream(f"{sweep_dir}/{SWEEP_RECORD}") as f:
        f.write(json.dumps({"spec": spec_fields(spec), "spec_hash": spec_hash(spec), "trials": spec.num_trials()},
                           indent=1, sort_keys=True).encode())


# -- the sweep --------------------------------------------------------------------------------


def run_sweep(spec: SweepSpec, tracking_uri: str, storage: str | None = None, address: str | None = None,
              resume: bool = False, trials: int | None = None) -> SweepResult:
    """Prepare shared artifacts, run every trial, then write the front back to MLflow.

    ``trials`` is the count the user gave explicitly (``--trials``): on resume it is the only
    field that may change, and only upwards."""
    start = time.monotonic()
    storage_root, fs, fs_root = _storage(storage or spec.storage or "runs")
    record = None
    if resume:
        sweep_name = find_sweep(fs, fs_root, spec.name)
        if sweep_name is None:
            raise ConfigError(f"--resume: no earlier sweep '{spec.name}' under {storage_root}")
        record = _read_record(fs, f"{fs_root}/{sweep_name}")
        if record is not None:  # none: killed before its first snapshot, so nothing ran yet
            spec = resumed_spec(spec, record, trials)
    else:
        sweep_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_path = f"{storage_root}/{sweep_name}"
    journal, mirrored = _journal_path(tracking_uri, storage_root, sweep_name, spec)
    if mirrored and resume:
        _download_journal(fs, f"{fs_root}/{sweep_name}", journal)

    import ray

    _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    # On a cold cache this is minutes of silence otherwise (data wheels, backbone features, teacher fine-tune).
    print(f"{sweep_name}: preparing shared artifacts (data splits, backbone features, teacher logits; "
          "cached after the first run) and starting Ray", file=sys.stderr, flush=True)
    # Ray's start-up (~3 s here) runs beside the driver's own preparation, which mostly waits on
    # imports and disk: the shared artifacts (once, here; then put in Ray's object store, where
    # every trial on every node reads them) and the MLflow store (a fresh sqlite db migrates its
    # schema for ~1.4 s).
    target = address or os.environ.get("RAY_ADDRESS")
    ray_up = threading.Event() if _features_may_use_ray(spec, target) else None
    prepared = _in_background(_prepare, spec, tracking_uri, sweep_path, ray_up)

    def interrupted_while_preparing(signum=None, frame=None) -> None:
        if prepared.done():
            raise KeyboardInterrupt
        # Nothing is logged yet. A normal exit would kill the preparing thread inside torch at
        # interpreter shutdown, which aborts the process with a C++ stack trace (seen here); so
        # would ray.shutdown() beside that thread once Ray runs with token auth (a
        # ~/.ray/auth_token). An embedded Ray's processes are fate-shared with this one.
        print("interrupted while preparing shared artifacts; nothing was logged", file=sys.stderr, flush=True)
        os._exit(130)

    # A handler of our own, not KeyboardInterrupt: a Ctrl-C that lands while this thread imports
    # (Ray's start-up imports for seconds) raises inside importlib's lock callback, which prints
    # "Exception ignored" and swallows it, and the driver then waited out the whole preparation.
    previous = signal.signal(signal.SIGINT, interrupted_while_preparing)
    try:
        try:
            local = _start_ray(address)
        finally:
            if ray_up is not None:
                ray_up.set()
        _check_fits(spec, local)
        arts, baseline = prepared.result()
        # Once, here: every trial on every node reads them from the object store (DESIGN §2).
        shared = {key: ray.put(art) for key, art in arts.items()}
        cards = dict(sorted((art.key, art.splits.card) for art in arts.values()))
        runners = _start_pack_runners(spec)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            interrupted_while_preparing()  # exits unless the preparation is done
        # A refusal here (resources, runners) may leave the preparing thread running in torch:
        # the CLI then leaves by os._exit (sweeps.cli.main). Shut Ray down first all the same:
        # without it an embedded Ray's agents outlived the process by a minute.
        ray.shutdown()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    parent_id = experiment_id = None
    try:
        experiment_id = tracking.ensure_experiment(tracking_uri, spec.experiment_name)
        parent_id = tracking.start_parent(tracking_uri, experiment_id, spec, sweep_path, cards,
                                          tags={"alignsweep.spec_hash": spec_hash(spec), "optuna_storage": journal,
                                                "optuna_study": sweep_name,
                                                **({"optuna_storage_mirror": f"{sweep_path}/{Path(journal).name}"}
                                                   if mirrored else {})})
        if baseline is not None:
            tracking.log_baseline(tracking_uri, experiment_id, parent_id, spec.baseline_config(), baseline)
        reference = references(spec, tracking.baseline_run(tracking_uri, experiment_id, parent_id))[0]
        if record is None or record["trials"] != spec.num_trials():
            if record is not None:
                log.warning("trials: %d -> %d (--trials)", record["trials"], spec.num_trials())
            _write_record(fs, f"{fs_root}/{sweep_name}", spec)
        ctx = TrialContext(spec, tracking_uri, experiment_id, parent_id, storage_root, shared, runners)
        grid, study, interrupted = _fit(spec, ctx, sweep_path, sweep_name, journal, mirrored, resume, reference)
        if runners:  # their temp dirs; the actors themselves end with Ray
            ray.get([r.close.remote() for r in runners], timeout=30)
        checkpoints = {res.metrics.get("trial_id"): res.checkpoint.path for res in grid
                       if res.checkpoint is not None and res.metrics}
        # Ray's shutdown (~1.4 s here) runs beside finalize, which needs only MLflow and the study.
        with ThreadPoolExecutor(max_workers=1) as pool:
            stopping = pool.submit(ray.shutdown)
            result = finalize(spec, tracking_uri, experiment_id, parent_id, sweep_path, checkpoints, study,
                              time.monotonic() - start, interrupted)
            stopping.result()
        return result
    except BaseException as err:
        if parent_id is not None:
            _end_parent(tracking_uri, experiment_id, parent_id, err, spec)
        ray.shutdown()
        raise


SNAPSHOT_FLOOR_S = 1.0
"""The shortest period between two driver snapshots: the period that made a resume clean (DESIGN §7)."""


def pace_driver_snapshots() -> None:
    """Tune's "auto" snapshot pacing with a 1 s floor instead of its 10 s one.

    Each snapshot writes every trial's state, so its cost grows with the sweep: at ~1,000 trials
    and 64 at once, saving every second took about a quarter of the driver's time (py-spy,
    benchmarks/scale.py). Tune's "auto" mode sets the period to 19x the last save's duration (at
    most 1/20 of the driver's time in saves), but never under 10 s, and a driver killed 10 s after
    a save forgets every trial started since. Here the period is 1 s while a save takes under
    50 ms, as before, and grows with the save only beyond that. Applies when
    TUNE_GLOBAL_CHECKPOINT_S is "auto" (the sweeps' default, sweeps/__init__.py)."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as Manager

    def update(self, time_taken: float) -> None:
        if self._auto_checkpoint_enabled:
            self._checkpoint_period = max(SNAPSHOT_FLOOR_S, time_taken * 19)

    Manager._update_auto_checkpoint_time = update


def _fit(spec: SweepSpec, ctx: TrialContext, sweep_path: str, sweep_name: str, journal: str, mirrored: bool,
         resume: bool, reference: list[float]):
    """Build (or restore) the Tuner and run it; returns (ResultGrid, the Optuna study, whether Ctrl-C stopped it)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    pace_driver_snapshots()
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), spec.resources.trial_bundle())
    progress = SweepProgress(spec, spec.num_trials(), reference)
    if resume and tune.Tuner.can_restore(sweep_path):
        tuner = tune.Tuner.restore(sweep_path, trainable, resume_unfinished=True, resume_errored=True)
        study = None
        saved = _saved_searcher(sweep_path)
        if saved is not None:
            # After a driver kill, Optuna trials started after Tune's last save have no owner.
            study = saved.study  # its pickled storage: the study this sweep started on
            fail_orphaned_trials(study, saved.owned_trial_numbers(),
                                 tracking.finished_values(ctx.uri, ctx.experiment_id, ctx.parent_id, spec.metrics))
    else:
        searcher = SweepSearcher(metric=spec.metrics, mode=spec.modes, sampler=make_sampler(spec), study_name=sweep_name,
                                 storage=study_storage(journal), max_trials=spec.num_trials(),
                                 journal_mirror=journal if mirrored else None)
        study = searcher.study
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            # num_samples=-1: the searcher's max_trials ends the sweep, so a resume can grow it
            tune_config=tune.TuneConfig(search_alg=SweepSearchGenerator(searcher, spec.concurrency), num_samples=-1,
                                        scheduler=_scheduler(spec, ctx.uri, ctx.experiment_id, ctx.parent_id),
                                        reuse_actors=True, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=sweep_name, storage_path=ctx.run_storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      # no num_to_keep: rotation deletes checkpoints that the last
                                      # driver snapshot still points at, and a resume then fails
                                      # result.json only (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS):
                                      # Tune's ResultGrid reads it; MLflow holds the rest
                                      callbacks=[progress, JsonLoggerCallback()]),
        )
    stop = _GracefulStop()
    try:
        with stop:
            grid = tuner.fit()
    finally:
        SweepProgress.close_all()
    return grid, study, stop.requested


def _scheduler(spec: SweepSpec, uri: str, experiment_id: str, parent_id: str):
    """None (Tune's FIFO) or MO-ASHA on the spec's objectives. Tune pickles it into the Tuner's
    state when the sweep starts and restores that copy on resume, without its records: both of
    its hooks are picklable and reach MLflow, which marks a pruned run KILLED with
    ``pruned_at_step`` and gives back every rung a trial reported, to rebuild the records."""
    sched = spec.scheduler
    if sched.kind == "fifo":
        return None
    from functools import partial

    from sweeps.moasha import MOASHA

    return MOASHA(spec.metrics, spec.modes, sched.grace_steps, sched.reduction_factor, sched.brackets,
                  history_source=partial(tracking.rung_history, uri, experiment_id, parent_id, spec.metrics),
                  on_prune=partial(tracking.mark_pruned, uri, experiment_id, parent_id))


class _GracefulStop:
    """Ctrl-C during ``Tuner.fit``: the first press asks Tune to stop the way its own handler
    would (SIGUSR1: trials stopped, state saved, fit returns), and remembers that it did, since fit
    then returns normally; the second press raises KeyboardInterrupt at once. Tune's own SIGINT
    handler is off (TUNE_DISABLE_SIGINT_HANDLER, sweeps/__init__.py): it could not tell us."""

    def __init__(self):
        self.requested = False

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: trials are stopped and saved, then the front is written "
              "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        # Tune logs its own stop notice and a `Tuner.restore(...)` hint; ours names `--resume`.
        self._tune_log = logging.getLogger("ray.tune.tune")
        self._level = self._tune_log.level
        self._tune_log.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        self._tune_log.setLevel(self._level)
        return False


def _saved_searcher(sweep_path: str) -> SweepSearcher | None:
    """The searcher as Tune saved it last, or None if it never saved one. Its files are read
    through pyarrow, so object storage (s3://) works as a local path does."""
    import tempfile

    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(sweep_path) if "://" in sweep_path else \
        (pyarrow.fs.LocalFileSystem(), sweep_path)
    with tempfile.TemporaryDirectory() as tmp:
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
            if info.base_name.startswith("searcher-state-") or info.base_name == SWEEP_RECORD:
                pyarrow.fs.copy_files(info.path, f"{tmp}/{info.base_name}", source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
        searcher = SweepSearcher()
        try:
            searcher.restore_from_dir(tmp)
        except (FileNotFoundError, RuntimeError, OSError):
            return None
    return searcher


def _end_parent(uri: str, experiment_id: str, parent_id: str, err: BaseException, spec: SweepSpec) -> None:
    """Any exception once the parent exists ends it: KILLED on Ctrl-C, FAILED otherwise; never RUNNING.
    SIGINT is ignored for these few writes so that a third Ctrl-C cannot leave it half-closed."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if isinstance(err, KeyboardInterrupt):
            tracking.abort_parent(uri, experiment_id, parent_id, "KILLED", interrupted=True,
                                  reason=f"interrupted (Ctrl-C twice); continue with: alignsweep sweep {spec.name} --resume")
        else:
            tracking.abort_parent(uri, experiment_id, parent_id, "FAILED", interrupted=False,
                                  reason=f"{type(err).__name__}: {err}")
    except Exception as exc:  # noqa: BLE001 - the original error is the one to show
        log.warning("could not close the parent run %s: %s", parent_id, exc)
    finally:
        signal.signal(signal.SIGINT, previous)


def _journal_path(tracking_uri: str, storage_root: str, sweep_name: str, spec: SweepSpec) -> tuple[str, bool]:
    cache = Path(spec.train.get("cache_dir") or default_cache_dir()).expanduser()
    return journal_path(tracking_uri, storage_root, sweep_name, cache)


def _download_journal(fs, sweep_dir: str, local: str) -> None:
    """A resubmitted job on a fresh driver: the journal comes back from the copy beside Tune's state."""
    import pyarrow.fs

    remote = f"{sweep_dir}/{Path(local).name}"
    info = fs.get_file_info(remote)
    if info.type != pyarrow.fs.FileType.File:
        return
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    if Path(local).is_file() and Path(local).stat().st_size >= info.size:
        return  # this driver's own journal is at least as new as the copy
    with fs.open_input_stream(remote) as src, open(local, "wb") as dst:
        dst.write(src.read())


def _in_background(fn, *args) -> Future:
    """``fn(*args)`` on a daemon thread. Not a ThreadPoolExecutor: its threads are joined at exit,
    so a Ctrl-C during a cold-cache preparation (minutes of teacher fine-tuning) would wait for it.
    The cache is written atomically (temp file, then rename), so an abandoned one leaves nothing
    half-written."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(err)

    threading.Thread(target=run, name=PREPARING_THREAD, daemon=True).start()
    return future


def _features_may_use_ray(spec: SweepSpec, target: str | None) -> bool:
    """Whether the driver's feature extraction may run as Ray Data actors (trainable/features.py),
    so preparing must wait for Ray: any variant with an explicit actor count, or ``actors: auto``
    where GPUs may exist (a cluster, or a local CUDA device). An embedded Ray on a CPU machine
    never takes that path, so there preparing overlaps Ray's start-up."""
    actors = {cfg.features.actors for cfg in spec.artifact_variants()}
    if actors == {0}:
        return False
    if actors != {"auto"}:
        return True
    import torch

    return bool(target) or torch.cuda.is_available()


def _prepare(spec: SweepSpec, tracking_uri: str, sweep_path: str,
             ray_up: threading.Event | None = None) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The shared artifacts by ``artifact_key`` (each built once, or read from this machine's disk
    cache), an initialised MLflow store (nothing logged yet), and the plain-CE baseline's final
    metrics when the sweep needs them as its hypervolume reference (no explicit ``reference``, no
    baseline run yet): one training on the cached features, run here while Ray starts.
    ``ray_up``: wait for it before building, so that the choice of where features are computed
    (this process or Ray Data actors) never depends on which thread won the race."""
    from trainable.loop import artifact_key, prepare_artifacts, train_loop

    if ray_up is not None:
        ray_up.wait()
    arts = {artifact_key(cfg): prepare_artifacts(cfg) for cfg in spec.artifact_variants()}
    tracking.open_store(tracking_uri)
    if spec.reference is not None or tracking.sweep_has_baseline(tracking_uri, spec.experiment_name, sweep_path):
        return arts, None
    config = spec.baseline_config()
    try:
        # the method shapes no artifact: the base config's own artifacts serve the baseline
        base = arts.get(artifact_key(config)) or prepare_artifacts(config)
        baseline = train_loop(config, lambda metrics, checkpoint=None: None, artifacts=base)
    except Exception as err:  # noqa: BLE001 - the sweep still runs; finalize falls back to the origin
        log.warning("the plain-CE baseline failed (%s: %s); the hypervolume reference falls back to 0..100's worst end",
                    type(err).__name__, err)
        baseline = None
    return arts, baseline


def _start_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address`` or ``RAY_ADDRESS``, else start an embedded Ray.
    Returns whether Ray is embedded (local). A failure is one line with a hint (StartupError)."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address)
        elif target:
            ray.init()
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            return True
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, TimeoutError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (f"is a Ray head running at {target}? (`ray status --address {target}`)" if target else
                "is /tmp full, or another Ray using this machine's ports? (`ray status`, `df -h /tmp`)")
        raise StartupError(f"Ray did not start: {type(err).__name__}: {first[:300]}; {hint}") from None
    return False


def _check_reachable(address: str | None) -> None:
    """Refuse a malformed address (exit 2) and one where nothing listens (one line, exit 1):
    ``ray.init`` would retry an unreachable head for minutes without a word."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address: expected HOST:PORT or ray://HOST:PORT of a Ray head, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise StartupError(f"Ray did not start: nothing answers at {address} ({err.strerror or type(err).__name__}); "
                           f"is a Ray head running there? (`ray status --address {host}:{port}`)") from None


def _start_pack_runners(spec: SweepSpec) -> list:
    """Under ``resources.pack``: ceil(concurrency / pack) runners, each training up to ``pack``
    trials at once (sweeps/packing.py); they live as long as this driver's Ray session."""
    r = spec.resources
    if r.mode() != "packed":
        return []
    from sweeps.packing import start_runners

    return start_runners(*r.pack_runners(spec.concurrency), r.cpus_per_worker, r.gpus_per_worker)


def _check_fits(spec: SweepSpec, local: bool) -> None:
    """One trial must fit the cluster, or Tune waits for resources forever. An embedded Ray has
    all it will ever have: refuse. A cluster may be autoscaling: warn."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        spec.resources.check_fits(nodes, spec.concurrency)
    except ConfigError as err:
        if local:
            raise
        log.warning("%s (now; trials wait unless the cluster scales up)", err)


def _trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"
