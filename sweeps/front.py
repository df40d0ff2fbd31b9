"""The end of a sweep: read every child run back from MLflow, tag the Pareto front, log it to the parent.

The front is chosen on validation (the plain metric names, what the searcher saw) and reported
on test (``test_<name>``), so the report is not biased by the selection (DESIGN §4). The
hypervolume reference is the spec's ``reference`` or else the plain-CE baseline's validation
point; the test hypervolume takes the front's test points against the baseline's test point."""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sweeps import mlflow_view, pareto, tracking
from sweeps.spec import SweepSpec, test_metric

log = logging.getLogger(__name__)


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
    """On validation, against ``reference``."""
    front: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False
    trials: int = 0
    """The number of trials the sweep was asked for."""
    reference: list[float] = field(default_factory=list)
    hypervolume_normalised: float = float("nan")
    test_hypervolume: float = float("nan")
    pruned: int = 0


def references(spec: SweepSpec, baseline) -> tuple[list[float], list[float], str]:
    """(validation reference, test reference, where they come from): the spec's explicit
    ``reference`` for both, else the baseline run's validation and test points, else (no
    baseline finished) the worst end of 0..100."""
    if spec.reference is not None:
        return list(spec.reference), list(spec.reference), "spec"
    if baseline is not None:
        m = baseline.data.metrics
        if all(k in m for k in spec.metrics) and all(test_metric(k) in m for k in spec.metrics):
            return [m[k] for k in spec.metrics], [m[test_metric(k)] for k in spec.metrics], "baseline"
    log.warning("no baseline run finished: the hypervolume reference is the worst end of 0..100")
    origin = pareto.default_reference(spec.modes)
    return origin, origin, "origin"


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
    pruned = sum(tracking.PRUNED_TAG in r.data.tags for r in runs)
    front = pareto.front_rows(rows, spec.metrics, spec.modes)
    baseline = tracking.baseline_run(uri, experiment_id, parent_id)
    ref, test_ref, ref_source = references(spec, baseline)
    tests = [test_metric(m) for m in spec.metrics]
    hv = pareto.hypervolume(_points(rows, spec.metrics), spec.modes, ref)
    hv_norm = pareto.normalised_hypervolume(hv, spec.modes, ref)
    test_hv = pareto.hypervolume(_points(front, tests), spec.modes, test_ref)  # the chosen front, on test
    test_hv_norm = pareto.normalised_hypervolume(test_hv, spec.modes, test_ref)
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
    mlflow_view.publish_sweep_view(client, experiment_id, parent_id, spec, rows, front_ids, hv, failed, killed=killed,
                                   reference=ref, test_hypervolume=test_hv,
                                   baseline_run_id=baseline.info.run_id if baseline is not None else None)

    searched = list(spec.space)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _write_csv(tmp_path / "pareto_front.csv", front, ["run_name", "trial_id", "run_id", *tests, *spec.metrics, *searched])
        (tmp_path / "pareto_front.json").write_text(json.dumps(
            {"objectives": spec.metrics, "modes": spec.modes, "selected_on": "validation",
             "reported": tests, "reference": ref, "reference_source": ref_source, "test_reference": test_ref,
             "hypervolume": hv, "hypervolume_normalised": hv_norm, "test_hypervolume": test_hv,
             "test_hypervolume_normalised": test_hv_norm, "front": front}, indent=2, default=str))
        title = f"{spec.name}: {len(front)} of {len(rows)} trials on the front (chosen on validation, shown on test)"
        if rows:
            pareto.plot_png(rows, front, tests, spec.modes, tmp_path / "pareto.png", title)
            pareto.plot_html(rows, front, tests, spec.modes, tmp_path / "pareto.html", title, [*spec.metrics, *searched])
        for f in tmp_path.iterdir():
            client.log_artifact(parent_id, str(f))
    incomplete = interrupted or len(rows) + failed + pruned < spec.num_trials()
    tags = {"interrupted": str(incomplete).lower()}
    if incomplete:
        tags["failure"] = (f"interrupted with {len(rows)} of {spec.num_trials()} trials finished; "
                           f"continue with: alignsweep sweep {spec.name} --resume")
    ref_params = {f"reference.{m}": v for m, v in zip(spec.metrics, ref)}
    tags["hypervolume_reference"] = json.dumps({"source": ref_source, "validation": ref, "test": test_ref})
    tracking.log_batch(client, parent_id, metrics={
        "hypervolume": hv, "hypervolume_normalised": hv_norm, "test_hypervolume": test_hv,
        "test_hypervolume_normalised": test_hv_norm, **ref_params, "trials_finished": len(rows),
        "trials_failed": failed, "trials_killed": killed, "trials_pruned": pruned,
        "front_size": len(front), "wall_s": wall_s}, tags=tags)
    client.set_terminated(parent_id, status="KILLED" if incomplete else "FINISHED")
    return SweepResult(spec.name, experiment_id, parent_id, sweep_path, len(rows), failed, killed, hv, front, wall_s,
                       interrupted=interrupted, trials=spec.num_trials(), reference=ref,
                       hypervolume_normalised=hv_norm, test_hypervolume=test_hv, pruned=pruned)


def _points(rows: list[dict], metrics: list[str]) -> np.ndarray:
    return np.asarray([[row.get(m, np.nan) for m in metrics] for row in rows], dtype=float).reshape(len(rows), len(metrics))


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in cols})
