"""The end of a sweep: read every child run back from MLflow, tag the Pareto front, log it to the parent."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sweeps import mlflow_view, pareto, tracking
from sweeps.spec import SweepSpec


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
    interrupted: bool = False
    trials: int = 0
    """The number of trials the sweep was asked for."""


def finalize(spec: SweepSpec, uri: str, experiment_id: str, parent_id: str, sweep_path: str, checkpoints: dict,
             study, wall_s: float, interrupted: bool) -> SweepResult:
    """Close what the sweep left open and publish its front.

    Children still RUNNING are KILLED (a resume reopens them). Optuna trials still RUNNING are
    told FAIL only when the sweep ran to its end: after an interruption Tune still owns them,
    and a resumed trial must be able to tell its values (DESIGN §7).
    """
    client = tracking.client(uri)
    killed = tracking.close_orphans(uri, experiment_id, parent_id)
    if not interrupted and study is not None:
        from sweeps.searcher import fail_orphaned_trials

        fail_orphaned_trials(study, owned=set())

    runs = tracking.child_runs(uri, experiment_id, parent_id)
    rows = [tracking.run_row(r) for r in runs if r.info.status == "FINISHED"]
    failed = sum(r.info.status == "FAILED" for r in runs)
    front = pareto.front_rows(rows, spec.metrics, spec.modes)
    ref = spec.reference or pareto.default_reference(spec.modes)
    pts = np.asarray([[row[m] for m in spec.metrics] for row in rows], dtype=float).reshape(len(rows), len(spec.metrics))
    hv = pareto.hypervolume(pts, spec.modes, ref)
    front_ids = {row["run_id"] for row in front}
    finished = {row["run_id"] for row in rows}
    for run in runs:  # one write per run: each sqlite write costs 12-80 ms
        tags = {"pareto": str(run.info.run_id in front_ids).lower()} if run.info.run_id in finished else {}
        if ckpt := checkpoints.get(run.data.tags.get(tracking.TRIAL_TAG)):
            tags["checkpoint_uri"] = ckpt
        if tags:
            tracking.log_batch(client, run.info.run_id, tags=tags)
    # The MLflow UI as the sweep's dashboard: saved Pareto view, coloured front, parent description.
    # Never raises: a refused view is a warning, not a failed sweep.
    mlflow_view.publish_sweep_view(client, experiment_id, parent_id, spec, rows, front_ids, hv, failed, killed=killed)

    searched = list(spec.space)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _write_csv(tmp_path / "pareto_front.csv", front, ["run_name", "trial_id", "run_id", *spec.metrics, *searched])
        (tmp_path / "pareto_front.json").write_text(json.dumps(
            {"objectives": spec.metrics, "modes": spec.modes, "reference": ref, "hypervolume": hv, "front": front},
            indent=2, default=str))
        title = f"{spec.name}: {len(front)} of {len(rows)} trials on the front"
        if rows:
            pareto.plot_png(rows, front, spec.metrics, spec.modes, tmp_path / "pareto.png", title)
            pareto.plot_html(rows, front, spec.metrics, spec.modes, tmp_path / "pareto.html", title, searched)
        for f in tmp_path.iterdir():
            client.log_artifact(parent_id, str(f))
    incomplete = interrupted or len(rows) + failed < spec.num_trials()
    tags = {"interrupted": str(incomplete).lower()}
    if incomplete:
        tags["failure"] = (f"interrupted with {len(rows)} of {spec.num_trials()} trials finished; "
                           f"continue with: alignsweep sweep {spec.name} --resume")
    tracking.log_batch(client, parent_id, metrics={"hypervolume": hv, "trials_finished": len(rows),
                                                   "trials_failed": failed, "trials_killed": killed,
                                                   "front_size": len(front), "wall_s": wall_s}, tags=tags)
    client.set_terminated(parent_id, status="KILLED" if incomplete else "FINISHED")
    return SweepResult(spec.name, experiment_id, parent_id, sweep_path, len(rows), failed, killed, hv, front, wall_s,
                       interrupted=interrupted, trials=spec.num_trials())


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in cols})
