"""MLflow tracking: one parent run per sweep, one nested child run per trial (DESIGN §2.4).

Trials log from inside the trial process through :class:`TrialLogger`, not through Tune's
driver callback (DESIGN §7: that leaves runs RUNNING and is not wired to Ray Train V2). A trial
finds its run by the ``tune_trial_id`` tag, so a retried or resumed trial reopens its own run
instead of splitting it, and a trial whose run is already FINISHED reports the stored values.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainable.config import ConfigError

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune_trial_id"
SWEEP_TAG = "alignsweep.sweep_path"
STEP_METRICS = ("loss", "l_kd", "l_nr", "l_reg", "grad_norm")
EVAL_ITEMS = "eval_items.json"  # written by trainable.loop beside the final checkpoint


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


def artifact_root_for(uri: str) -> str | None:
    """Artifacts beside a sqlite database (not in the current directory); servers decide their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """Create (or find) the experiment in the driver, before any trial can race to create the store."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root_for(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _batch(client, run_id: str, metrics: dict[str, float] | None = None, step: int = 0,
           params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> None:
    """One log_batch call: each write to sqlite costs 12-80 ms, so never log key by key."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if isinstance(v, (int, float))]
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(ms), 1), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=ms[i : i + 1000], params=ps if i == 0 else [], tags=ts if i == 0 else [])


# -- the driver side --------------------------------------------------------------------------


def start_parent(uri: str, experiment_id: str, spec, sweep_path: str, dataset_hashes: list[str]) -> str:
    """The sweep's parent run, or the existing one for this sweep path when resuming."""
    client = _client(uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_path}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={SWEEP_TAG: sweep_path, "alignsweep.spec": spec.name, "git_sha": git_sha(),
                                  "dataset_hash": ",".join(dataset_hashes), **versions()})
    params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
              for k, v in _flatten(spec.model_dump(exclude={"space"})).items()}
    params["space"] = json.dumps({k: d.model_dump(exclude_none=True) for k, d in spec.space.items()})
    _batch(client, run.info.run_id, params=params)
    client.log_text(run.info.run_id, _yaml(spec), "spec.yaml")
    return run.info.run_id


def _yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def child_runs(uri: str, experiment_id: str, parent_id: str) -> list:
    client = _client(uri)
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def close_orphans(uri: str, experiment_id: str, parent_id: str) -> int:
    """Children still RUNNING after the sweep ended belong to trials no one will finish: KILLED."""
    client, n = _client(uri), 0
    for run in child_runs(uri, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "failure", "trial did not finish (driver interrupted or trial lost)")
            client.set_terminated(run.info.run_id, status="KILLED")
            n += 1
    return n


def abort_parent(uri: str, experiment_id: str, parent_id: str, reason: str) -> None:
    """The driver itself failed: children still RUNNING are KILLED, the parent FAILED with the reason."""
    close_orphans(uri, experiment_id, parent_id)
    client = _client(uri)
    client.set_tag(parent_id, "failure", reason[:5000])
    client.set_terminated(parent_id, status="FAILED")


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
        client = _client(self.uri)
        found = client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{TRIAL_TAG}` = '{self.trial_id}'"))
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            if run.info.status == "FINISHED":
                return dict(run.data.metrics)
            client.update_run(self.run_id, status="RUNNING")
            client.set_tag(self.run_id, "restarts", int(run.data.tags.get("restarts", "0")) + 1)
            return None
        run = client.create_run(self.experiment_id, run_name=self.trial_name,
                                tags={PARENT_TAG: self.parent_id, TRIAL_TAG: self.trial_id})
        self.run_id = run.info.run_id
        _batch(client, self.run_id, params=_flatten(params))
        return None

    def tag(self, **tags: str) -> None:
        _batch(_client(self.uri), self.run_id, tags=tags)

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        step = int(metrics.get("step", 0))
        self._buffer.append((step, {k: v for k, v in metrics.items() if k in STEP_METRICS}))
        if checkpoint is not None:
            self.flush()
            items = Path(checkpoint) / EVAL_ITEMS
            if items.is_file():  # the final evaluation: per-item outcomes for bootstrap CIs
                _client(self.uri).log_artifact(self.run_id, str(items))

    def flush(self) -> None:
        if not self._buffer or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for step, m in self._buffer for k, v in m.items()]
        client = _client(self.uri)
        for i in range(0, len(ms), 1000):
            client.log_batch(self.run_id, metrics=ms[i : i + 1000])
        self._buffer.clear()

    def finish(self, final: dict[str, float] | None, status: str, step: int, reason: str | None = None) -> None:
        """Write the final metrics (at the real last step) and close the run FINISHED or FAILED."""
        self.flush()
        client = _client(self.uri)
        tags = {"failure": reason[:5000]} if reason else {}
        _batch(client, self.run_id, metrics={k: v for k, v in (final or {}).items() if k not in STEP_METRICS and k != "step"},
               step=step, tags=tags)
        client.set_terminated(self.run_id, status=status)


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
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment '{experiment}' at {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` != ''",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"--experiment: '{experiment}' holds no alignsweep sweep")
    return exp.experiment_id, runs[0]


def latest_front(uri: str, experiment: str) -> dict[str, Any]:
    """The front of the latest sweep, recomputed from its FINISHED child runs."""
    from sweeps import pareto

    experiment_id, parent = latest_parent(uri, experiment)
    objectives = json.loads(parent.data.params["objectives"])
    metrics, modes = [o["metric"] for o in objectives], [o["mode"] for o in objectives]
    params = list(json.loads(parent.data.params.get("space", "{}")))
    rows = [run_row(r) for r in child_runs(uri, experiment_id, parent.info.run_id) if r.info.status == "FINISHED"]
    front = pareto.front_rows(rows, metrics, modes)
    return {"experiment": experiment, "parent_run_id": parent.info.run_id, "objectives": metrics, "modes": modes,
            "params": params, "hypervolume": parent.data.metrics.get("hypervolume", float("nan")), "front": front}
