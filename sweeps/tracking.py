"""MLflow tracking: one parent run per sweep, one nested child run per trial (DESIGN §2.4).

Trials log from inside the trial process through :class:`TrialLogger`, not through Tune's
driver callback (DESIGN §7: that leaves runs RUNNING and is not wired to Ray Train V2). A trial
finds its run by the ``tune_trial_id`` tag, so a retried or resumed trial reopens its own run
instead of splitting it, and a trial whose run is already FINISHED reports the stored values.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainable.config import ConfigError

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune_trial_id"
SWEEP_TAG = "alignsweep.sweep_path"
ROLE_TAG = "role"
BASELINE = "baseline"
"""``role=baseline``: the child run of the plain-CE baseline that sets the hypervolume reference;
not one of the sweep's N trials, so every reader of trials skips it."""
PRUNED_TAG = "pruned_at_step"
STEP_METRICS = ("loss", "l_kd", "l_nr", "l_reg", "grad_norm")
EVAL_ITEMS = "eval_items.json"  # written by trainable.loop beside the final checkpoint


_OPENED: set[str] = set()
"""Stores this process has opened (and so created, if they were fresh)."""


@contextmanager
def _store_lock(db: Path):
    """An exclusive lock beside a sqlite store: two processes creating a fresh store at once
    corrupt it for good (``table _alembic_tmp_experiments already exists``, DESIGN §7)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def client(uri: str):
    """An MlflowClient on ``uri``: the product's one way to open a store (the sweep driver, its
    trials, ``alignsweep ui``, ``pareto`` and ``figures`` all come through here).

    The first open in a process creates and migrates a fresh sqlite store under :func:`_store_lock`
    (MlflowClient may build the store as it is constructed); MLflow caches the store per process,
    so later opens cost nothing more."""
    from mlflow.tracking import MlflowClient

    if uri in _OPENED or not uri.startswith("sqlite:///"):
        _OPENED.add(uri)
        return MlflowClient(tracking_uri=uri)
    with _store_lock(Path(uri.removeprefix("sqlite:///"))):
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # builds the store: creates and migrates it if fresh
    _OPENED.add(uri)
    return c


def open_store(uri: str) -> None:
    """Create (or open) the store now, before any trial or reader can race to create it."""
    client(uri)


def check_tracking_uri(uri: str, reach: bool = True) -> None:
    """Fail fast (exit 2) on a tracking URI that cannot work, before any Ray or MLflow work.
    ``reach=False`` checks the form only (for a URI that is resolved elsewhere, on a cluster)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and not reach:
        pass
    elif parsed.scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.exists():
            raise ConfigError(f"--tracking-uri: directory '{path.parent}' of the sqlite database does not exist")
        if path.is_dir() or path.is_file() and path.stat().st_size and not _is_sqlite(path):
            # MLflow would open it and fail deep inside SQLAlchemy ("file is not a database")
            raise ConfigError(f"--tracking-uri: '{path}' exists and is not an SQLite database; give an MLflow "
                              "sqlite store or a path that does not exist yet")
    elif parsed.scheme in ("http", "https") and not reach:
        pass
    elif parsed.scheme in ("http", "https"):
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3).read()
        except Exception as err:  # noqa: BLE001 - any failure means unreachable
            raise ConfigError(f"--tracking-uri: MLflow server at {uri} is unreachable ({type(err).__name__})") from None
    elif parsed.scheme in ("postgresql", "mysql", "databricks") or parsed.scheme.startswith("postgresql+"):
        pass
    else:
        raise ConfigError(f"--tracking-uri: unsupported scheme '{parsed.scheme}'; allowed: sqlite:///PATH, http(s)://HOST:PORT, postgresql://...")


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"  # every SQLite 3 database file begins so


def artifact_root_for(uri: str) -> str | None:
    """Artifacts beside a sqlite database (not in the current directory); servers decide their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """Create (or find) the experiment in the driver, before any trial can race to create the store."""
    mc = client(uri)
    exp = mc.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root_for(uri)
    return mc.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("alignsweep", "torch", "transformers", "ray", "optuna", "mlflow"):
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "missing"
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params, and the field-by-field spec comparison of a resume."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def as_params(d: dict[str, Any]) -> dict[str, Any]:
    """A nested config as MLflow params: dotted keys, lists and mappings as JSON."""
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(d).items()}


def trial_run(mc, experiment_id: str, parent_id: str, trial_id: str):
    """The child run of Tune trial ``trial_id`` in this sweep, or None."""
    found = mc.search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"))
    return found[0] if found else None


def log_batch(mc, run_id: str, metrics: dict[str, float] | None = None, step: int = 0,
           params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> None:
    """One log_batch call: each write to sqlite costs 12-80 ms, so never log key by key."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if isinstance(v, (int, float))]
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(ms), 1), 1000):  # MLflow caps a batch at 1000 metrics
        mc.log_batch(run_id, metrics=ms[i : i + 1000], params=ps if i == 0 else [], tags=ts if i == 0 else [])


# -- the driver side --------------------------------------------------------------------------


def start_parent(uri: str, experiment_id: str, spec, sweep_path: str, dataset_cards: dict[str, dict],
                 tags: dict[str, str] | None = None) -> str:
    """The sweep's parent run, or the existing one for this sweep path when resuming (RUNNING
    again, the previous stop's ``failure`` cleared). ``tags`` are set either way.
    ``dataset_cards`` (by dataset content hash) are logged as ``dataset_card-<hash>.json``: the
    provenance of the data and, for user files, the class-id mapping of its labels."""
    dataset_hashes = list(dataset_cards)
    mc = client(uri)
    tags = {**(tags or {}), "alignsweep.trials": str(spec.num_trials())}  # params are immutable; a resume may grow it
    found = mc.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_path}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        if "failure" in found[0].data.tags:
            mc.delete_tag(run_id, "failure")
        log_batch(mc, run_id, tags={**tags, "interrupted": "false"})
        mc.update_run(run_id, status="RUNNING")
        return run_id
    run = mc.create_run(experiment_id, run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                        tags={SWEEP_TAG: sweep_path, "alignsweep.spec": spec.name, "git_sha": git_sha(),
                              "dataset_hash": ",".join(dataset_hashes), **versions(), **tags})
    params = as_params(spec.model_dump(exclude={"space"}))
    params["space"] = json.dumps({k: d.model_dump(exclude_none=True) for k, d in spec.space.items()})
    log_batch(mc, run.info.run_id, params=params)
    mc.log_text(run.info.run_id, _yaml(spec), "spec.yaml")
    for key, card in dataset_cards.items():
        mc.log_text(run.info.run_id, json.dumps(card, indent=1, ensure_ascii=False, default=str), f"dataset_card-{key}.json")
    return run.info.run_id


def _yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def child_runs(uri: str, experiment_id: str, parent_id: str, baseline: bool = False) -> list:
    """The sweep's trial runs; with ``baseline=True`` also its ``role=baseline`` run."""
    mc = client(uri)
    runs, token = [], None
    while True:
        page = mc.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=1000, page_token=token)
        runs.extend(r for r in page if baseline or r.data.tags.get(ROLE_TAG) != BASELINE)
        token = page.token
        if not token:
            return runs


def baseline_run(uri: str, experiment_id: str, parent_id: str):
    """The sweep's FINISHED baseline run, or None."""
    found = client(uri).search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE_TAG}` = '{BASELINE}' and attributes.status = 'FINISHED'"))
    return found[0] if found else None


def sweep_has_baseline(uri: str, experiment: str, sweep_path: str) -> bool:
    """Whether the sweep at ``sweep_path`` (a resumed one) already measured its baseline."""
    mc = client(uri)
    exp = mc.get_experiment_by_name(experiment)
    if exp is None:
        return False
    parents = mc.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_path}'", max_results=1)
    return bool(parents) and baseline_run(uri, exp.experiment_id, parents[0].info.run_id) is not None


def log_baseline(uri: str, experiment_id: str, parent_id: str, config, final: dict[str, float]) -> str:
    """The plain-CE baseline as a FINISHED child run tagged ``role=baseline``: its params, its
    validation metrics (plain names) and test metrics (``test_*``)."""
    mc = client(uri)
    run = mc.create_run(experiment_id, run_name="baseline-ce", tags={PARENT_TAG: parent_id, ROLE_TAG: BASELINE})
    log_batch(mc, run.info.run_id, metrics={k: v for k, v in final.items() if k != "step"}, step=config.budget_steps,
              params=as_params(config.model_dump()))
    mc.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def mark_pruned(uri: str, experiment_id: str, parent_id: str, trial_id: str, step: int) -> None:
    """The trial's run ends KILLED with ``pruned_at_step``: the scheduler stopped it at a rung."""
    mc = client(uri)
    run = trial_run(mc, experiment_id, parent_id, trial_id)
    if run is None:
        return
    log_batch(mc, run.info.run_id, tags={PRUNED_TAG: str(step)})
    mc.set_terminated(run.info.run_id, status="KILLED")


def rung_history(uri: str, experiment_id: str, parent_id: str, metrics: list[str]) -> dict[str, dict[int, list[float]]]:
    """What every trial of the sweep reported at early-stopping rungs, read back from its run:
    trial id -> {step: objective values}. Tune keeps no scheduler state, so a resumed sweep
    rebuilds its rung records from this. A trial's final evaluation is not a rung (it is logged
    at its last step, which no rung reaches)."""
    mc, out = client(uri), {}
    for run in child_runs(uri, experiment_id, parent_id):
        trial, last = run.data.tags.get(TRIAL_TAG), run.data.tags.get("final_step")
        histories = [{m.step: m.value for m in mc.get_metric_history(run.info.run_id, name)} for name in metrics]
        steps = set.intersection(*(set(h) for h in histories)) - ({int(last)} if last else set())
        if trial and steps:
            out[trial] = {s: [h[s] for h in histories] for s in sorted(steps)}
    return out


def finished_values(uri: str, experiment_id: str, parent_id: str, metrics: list[str]) -> dict[str, list[float]]:
    """Tune trial id -> the objective values (validation) of each FINISHED trial run."""
    return {run.data.tags[TRIAL_TAG]: [run.data.metrics[m] for m in metrics]
            for run in child_runs(uri, experiment_id, parent_id)
            if run.info.status == "FINISHED" and TRIAL_TAG in run.data.tags and all(m in run.data.metrics for m in metrics)}


def close_orphans(uri: str, experiment_id: str, parent_id: str) -> int:
    """Children still RUNNING after the sweep ended belong to trials no one will finish: KILLED."""
    mc, n = client(uri), 0
    for run in child_runs(uri, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            mc.set_tag(run.info.run_id, "failure", "trial did not finish (driver interrupted or trial lost)")
            mc.set_terminated(run.info.run_id, status="KILLED")
            n += 1
    return n


def abort_parent(uri: str, experiment_id: str, parent_id: str, status: str, interrupted: bool, reason: str) -> None:
    """The driver stopped before finalize: children still RUNNING are KILLED, the parent ends
    ``status`` (KILLED on Ctrl-C, FAILED on an error) with the reason."""
    close_orphans(uri, experiment_id, parent_id)
    mc = client(uri)
    log_batch(mc, parent_id, tags={"failure": reason[:5000], "interrupted": str(interrupted).lower()})
    mc.set_terminated(parent_id, status=status)


# -- the trial side ---------------------------------------------------------------------------


@dataclass
class TrialLogger:
    """The ``report`` half that writes to MLflow; picklable, so it can ride into a Ray Train worker.

    Per-step losses are buffered and written in one batch at each checkpoint and at the end.
    """

    uri: str
    experiment_id: str
    parent_id: str
    trial_id: str
    trial_name: str
    run_id: str | None = None
    _buffer: list[tuple[int, dict[str, float]]] = field(default_factory=list, repr=False)

    def open(self, params: dict[str, Any]) -> dict[str, float] | None:
        """Find or create this trial's child run. Returns the stored metrics if it already FINISHED."""
        mc = client(self.uri)
        run = trial_run(mc, self.experiment_id, self.parent_id, self.trial_id)
        if run is not None:
            self.run_id = run.info.run_id
            if run.info.status == "FINISHED":
                return dict(run.data.metrics)
            mc.update_run(self.run_id, status="RUNNING")
            mc.set_tag(self.run_id, "restarts", int(run.data.tags.get("restarts", "0")) + 1)
            return None
        run = mc.create_run(self.experiment_id, run_name=self.trial_name,
                                tags={PARENT_TAG: self.parent_id, TRIAL_TAG: self.trial_id})
        self.run_id = run.info.run_id
        log_batch(mc, self.run_id, params=flatten(params))
        return None

    def tag(self, **tags: str) -> None:
        log_batch(client(self.uri), self.run_id, tags=tags)

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        step = int(metrics.get("step", 0))
        self._buffer.append((step, {k: v for k, v in metrics.items() if k in STEP_METRICS}))
        evaluated = {k: v for k, v in metrics.items() if k not in STEP_METRICS and k != "step"}
        if evaluated and checkpoint is None:
            # a mid-training validation (an early-stopping rung): written now, before the scheduler
            # can stop the trial, so a resumed sweep rebuilds its rung records from MLflow
            self.flush()
            log_batch(client(self.uri), self.run_id, metrics=evaluated, step=step)
        if checkpoint is not None:
            self.flush()
            items = Path(checkpoint) / EVAL_ITEMS
            if items.is_file():  # the final evaluation: per-item outcomes for bootstrap CIs
                client(self.uri).log_artifact(self.run_id, str(items))

    def flush(self) -> None:
        if not self._buffer or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for step, m in self._buffer for k, v in m.items()]
        mc = client(self.uri)
        for i in range(0, len(ms), 1000):
            mc.log_batch(self.run_id, metrics=ms[i : i + 1000])
        self._buffer.clear()

    def finish(self, final: dict[str, float] | None, status: str, step: int, reason: str | None = None) -> None:
        """Write the final metrics (at the real last step) and close the run FINISHED or FAILED."""
        self.flush()
        mc = client(self.uri)
        tags = {"failure": reason[:5000]} if reason else {}
        tags["final_step"] = str(step)
        log_batch(mc, self.run_id, metrics={k: v for k, v in (final or {}).items() if k not in STEP_METRICS and k != "step"},
               step=step, tags=tags)
        mc.set_terminated(self.run_id, status=status)


# -- reading a sweep back ---------------------------------------------------------------------


def run_row(run) -> dict[str, Any]:
    """A child run as one flat row: identity, searched params (typed back from strings), metrics."""
    row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                           "trial_id": run.data.tags.get(TRIAL_TAG), "status": run.info.status}
    for k, v in run.data.params.items():
        try:
            row[k] = json.loads(v)
        except (TypeError, ValueError):
            row[k] = v
    row.update(run.data.metrics)
    return row



def latest_parent(uri: str, experiment: str):
    """The most recent sweep (parent run) in an experiment."""
    mc = client(uri)
    exp = mc.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment '{experiment}' at {uri}")
    runs = mc.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` != ''",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"--experiment: '{experiment}' holds no alignsweep sweep")
    return exp.experiment_id, runs[0]


def latest_front(uri: str, experiment: str) -> dict[str, Any]:
    """The front of the latest sweep, recomputed on validation from its FINISHED trial runs (each
    row holds its ``test_*`` metrics too)."""
    from sweeps import pareto

    experiment_id, parent = latest_parent(uri, experiment)
    objectives = json.loads(parent.data.params["objectives"])
    metrics, modes = [o["metric"] for o in objectives], [o["mode"] for o in objectives]
    params = list(json.loads(parent.data.params.get("space", "{}")))
    rows = [run_row(r) for r in child_runs(uri, experiment_id, parent.info.run_id) if r.info.status == "FINISHED"]
    front = pareto.front_rows(rows, metrics, modes)
    m = parent.data.metrics
    return {"experiment": experiment, "parent_run_id": parent.info.run_id, "objectives": metrics, "modes": modes,
            "selected_on": "validation", "params": params, "hypervolume": m.get("hypervolume", float("nan")),
            "hypervolume_normalised": m.get("hypervolume_normalised", float("nan")),
            "test_hypervolume": m.get("test_hypervolume", float("nan")), "front": front}
