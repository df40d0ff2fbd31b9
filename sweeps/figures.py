"""Sensitivity figures and the method comparison, read back from MLflow (DESIGN §2.5, §4).

Nothing here comes from memory: every figure is rebuilt from a sweep's child runs and the
per-item test outcomes each trial logged (``eval_items.json``), so anyone with the tracking URI
can regenerate it. Uncertainty is a two-level bootstrap: resample the runs of a point (seeds,
split seeds), then the test items within each run. A 256-item test set alone carries about
+-5 points; seed spread alone would hide that.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sweeps import tracking
from trainable.metrics import item_scores

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial is noise

N_BOOT = 2000
FIGURE_METRICS = ("kd_alignment", "noise_robustness", "alignment_stability")
COMPARE_METRICS = ("accuracy", "kd_alignment", "noise_robustness", "alignment_stability", "safety_score",
                   "noisy_text_accuracy", "hard_accuracy", "harmful_recall", "attack_success_rate")
BASELINES = ("ce", "kd", "adv")
RELATED = ("sot", "hybrid", "enchtable")
"""The seeds' other safety-transfer methods: compared with ckt_ro like the baselines."""


@dataclass
class Trial:
    run_id: str
    params: dict[str, Any]
    metrics: dict[str, float]
    items: dict[str, list]


@dataclass
class Estimate:
    mean: float
    lo: float
    hi: float
    runs: int
    items: int

    def text(self) -> str:
        return f"{self.mean:.1f} [{self.lo:.1f}, {self.hi:.1f}]"


def load_trials(uri: str, experiment: str) -> tuple[Any, list[Trial]]:
    """The latest sweep of an experiment: its parent run and every FINISHED trial with its items."""
    experiment_id, parent = tracking.latest_parent(uri, experiment)
    client = tracking.client(uri)
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in tracking.child_runs(uri, experiment_id, parent.info.run_id):
            if run.info.status != "FINISHED":
                continue
            path = client.download_artifacts(run.info.run_id, tracking.EVAL_ITEMS, tmp)
            row = tracking.run_row(run)
            params = {k: row[k] for k in run.data.params}
            trials.append(Trial(run.info.run_id, params, dict(run.data.metrics), json.loads(Path(path).read_text())))
    return parent, trials


def _test_set(items: dict[str, list]) -> tuple:
    """Identity of a run's test set: runs that share a split share their test items."""
    return (len(items["y"]), tuple(items["y"]), tuple(items["hard"]), tuple(items["teacher_pred"]))


def _clusters(units: list, key) -> list[list]:
    """Runs (or pairs of runs) grouped by the test set they share."""
    groups: dict[tuple, list] = defaultdict(list)
    for u in units:
        groups[_test_set(key(u).items)].append(u)
    return list(groups.values())


def _resample(clusters: list[list], stat, rng: np.random.Generator) -> float:
    """One bootstrap draw: test sets with replacement; within each, one resample of its items shared
    by all its runs (they saw the same items), and its runs (seeds) with replacement."""
    per_cluster = []
    for c in rng.integers(0, len(clusters), len(clusters)):
        runs = clusters[c]
        idx = rng.integers(0, stat.n_items(runs[0]), stat.n_items(runs[0]))
        per_cluster.append(np.nanmean([stat(runs[r], idx) for r in rng.integers(0, len(runs), len(runs))]))
    return float(np.nanmean(per_cluster))


class _Mean:
    """metric(run) on a resample idx of its test items."""

    def __init__(self, metric: str):
        self.metric = metric
        self._scores: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def scores(self, trial: Trial) -> tuple[np.ndarray, np.ndarray]:
        if id(trial) not in self._scores:  # computed once per run, not once per bootstrap draw
            self._scores[id(trial)] = item_scores(trial.items, trial.items["label_names"])[self.metric]
        return self._scores[id(trial)]

    def n_items(self, trial: Trial) -> int:
        return len(trial.items["y"])

    def __call__(self, trial: Trial, idx=None) -> float:
        value, mask = self.scores(trial)
        if idx is not None:
            value, mask = value[idx], mask[idx]
        return value[mask].mean() if mask.any() else np.nan


class _Diff(_Mean):
    """metric(a) - metric(b) for a pair (a, b) of runs on the same test set and items."""

    def n_items(self, pair) -> int:
        return len(pair[0].items["y"])

    def __call__(self, pair, idx=None) -> float:
        return super().__call__(pair[0], idx) - super().__call__(pair[1], idx)


def _estimate(units: list, stat, key, n_boot: int, seed: int, level: float) -> Estimate:
    rng = np.random.default_rng(seed)
    clusters = _clusters(units, key)
    point = float(np.nanmean([stat(u) for u in units])) * 100
    draws = np.array([_resample(clusters, stat, rng) for _ in range(n_boot)]) * 100
    a = (1 - level) / 2
    lo, hi = np.nanquantile(draws, [a, 1 - a])
    return Estimate(point, float(lo), float(hi), len(units), len(key(units[0]).items["y"]))


def bootstrap(trials: list[Trial], metric: str, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of a metric over runs, with a percentile CI from resampling test sets (split seeds), the
    items of each test set, and the runs (seeds) on it: test-set sampling error is in the interval."""
    return _estimate(trials, _Mean(metric), lambda t: t, n_boot, seed, level)


def paired_difference(a: list[Trial], b: list[Trial], metric: str, n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """Mean of metric(a) - metric(b) over pairs run on the same test set, with the same resampling
    as ``bootstrap`` and each draw's items shared by both sides of a pair."""
    return _estimate(list(zip(a, b)), _Diff(metric), lambda pair: pair[0], n_boot, seed, level)


def _group(trials: list[Trial], *keys: str) -> dict[tuple, list[Trial]]:
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for t in trials:
        groups[tuple(t.params.get(k) for k in keys)].append(t)
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(x) if not isinstance(x, (int, float)) else x
                                                            for x in kv[0])))


def _dataset(parent) -> str:
    return Path(parent.data.params.get("train.data.name", "safety")).name


# -- figures ----------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    x: list[float]
    estimates: list[Estimate]


@dataclass
class Panel:
    metric: str
    series: list[Series]


def _panels(trials: list[Trial], x_key: str, line_key: str | None, metrics=FIGURE_METRICS) -> list[Panel]:
    panels = []
    for metric in metrics:
        series = []
        lines = _group(trials, line_key) if line_key else {(None,): trials}
        for (line,), members in lines.items():
            points = _group(members, x_key)
            series.append(Series(str(line) if line is not None else metric,
                                 [float(k[0]) for k in points], [bootstrap(v, metric) for v in points.values()]))
        panels.append(Panel(metric, series))
    return panels


def _draw(panels: list[Panel], x_label: str, title: str, out: Path, stem: str, log_x: bool) -> list[Path]:
    """Write stem.png (matplotlib) and stem.html (plotly, offline) with means and 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    pfig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p.metric for p in panels])
    for col, (ax, panel) in enumerate(zip(axes[0], panels), start=1):
        for i, s in enumerate(panel.series):
            m = [e.mean for e in s.estimates]
            err = [[e.mean - e.lo for e in s.estimates], [e.hi - e.mean for e in s.estimates]]
            # Dodge series sideways a little, so overlapping lines (e.g. fp32 and bf16) stay visible.
            shift = 0.04 * (i - (len(panel.series) - 1) / 2)
            xs = [x * (1 + shift) if log_x else x + shift * (max(s.x) - min(s.x) or 1) for x in s.x]
            ax.errorbar(xs, m, yerr=err, marker="o", capsize=3, label=s.label, alpha=0.85)
            pfig.add_trace(go.Scatter(x=s.x, y=m, name=s.label, legendgroup=s.label, showlegend=col == 1,
                                      error_y={"type": "data", "symmetric": False, "array": err[1], "arrayminus": err[0]},
                                      hovertemplate=f"{s.label}<br>x=%{{x}}<br>{panel.metric}=%{{y:.1f}}<extra></extra>"),
                           row=1, col=col)
        if log_x:
            ax.set_xscale("symlog", linthresh=min([x for s in panel.series for x in s.x if x > 0] or [1.0]))
            pfig.update_xaxes(type="log", row=1, col=col)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{panel.metric} (0-100, mean and 95% CI)")
        ax.set_title(panel.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        pfig.update_xaxes(title_text=x_label, row=1, col=col)
        pfig.update_yaxes(title_text=f"{panel.metric} (0-100)", row=1, col=col)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png, html = out / f"{stem}.png", out / f"{stem}.html"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    pfig.update_layout(title=title, height=450, width=480 * len(panels))
    pfig.write_html(html, include_plotlyjs=True, full_html=True)
    return [png, html]


def _title(what: str, parent, trials: list[Trial], per_point: int) -> str:
    sizes = sorted({len(t.items["y"]) for t in trials})
    n_items = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"{what} - {_dataset(parent)}, n={n_items} test items x {per_point} runs per point, 95% bootstrap CI"


def make_figures(uri: str, experiment: str, out: Path, baselines_experiment: str | None = "methods") -> list[Path]:
    """The figure(s) the latest sweep of ``experiment`` supports, chosen by what it searched."""
    parent, trials = load_trials(uri, experiment)
    if not trials:
        from trainable.config import ConfigError

        raise ConfigError(f"--experiment: '{experiment}' has no finished trials with per-item outcomes")
    space = list(json.loads(parent.data.params.get("space", "{}")))
    seeds = [k for k in ("seed", "data.split_seed") if k in space]
    per_point = max(1, int(np.prod([len(set(t.params.get(k) for t in trials)) for k in seeds]))) if seeds else 1
    paths: list[Path] = []
    if parent.data.params.get("sampler.kind") != "grid":  # a searched (Pareto) sweep: figure D only
        space = []
    if "distill_weight" in space:
        paths += _draw(_panels(trials, "distill_weight", None), "distillation weight w (log scale; 0 at left)",
                       _title("A: sensitivity to the distillation weight", parent, trials, per_point), out, "A_distill_weight", True)
    if "budget_steps" in space:
        line = "precision" if "precision" in space else None
        paths += _draw(_panels(trials, "budget_steps", line), "compute budget (optimizer steps, log scale)",
                       _title("B: metrics vs compute budget, one line per precision", parent, trials, per_point), out,
                       "B_budget_precision", True)
    if "data.label_noise" in space:
        line = "method" if "method" in space else None
        clean = [t for t in trials if t.params.get("data.shift") in (None, "None", "null")] if "data.shift" in space else trials
        paths += _draw(_panels(clean, "data.label_noise", line), "training-label noise rate (fraction of flipped labels)",
                       _title("C: metrics vs label noise, method vs ce", parent, clean, per_point), out, "C_label_noise", False)
    if "data.shift" in space:
        shifted = [t for t in trials if t.params.get("data.label_noise", 0) in (0, 0.0)]
        paths += _shift_figure(shifted, parent, out, per_point)
    if not paths:  # a Pareto sweep, or a grid over knobs no one-factor figure covers: figure D
        paths += _pareto_figure(uri, parent, trials, out, baselines_experiment)
    client = tracking.client(uri)
    for p in paths:
        client.log_artifact(parent.info.run_id, str(p), artifact_path="figures")
    return paths


def _shift_figure(trials: list[Trial], parent, out: Path, per_point: int) -> list[Path]:
    """In-domain test vs a held-out source family, per method: bars with 95% CIs."""
    panels = []
    for metric in FIGURE_METRICS:
        series = []
        for (method,), members in _group(trials, "method").items():
            by_shift = _group(members, "data.shift")
            series.append(Series(str(method), list(range(len(by_shift))), [bootstrap(v, metric) for v in by_shift.values()]))
        panels.append(Panel(metric, series))
    labels = [str(k[0]) for k in _group(trials, "data.shift")]
    title = _title(f"C: distribution shift (x: {', '.join(f'{i}={v}' for i, v in enumerate(labels))}; None = in-domain)",
                   parent, trials, per_point)
    return _draw(panels, "test set (0 = in-domain split, 1 = held-out source family)", title, out, "C_shift", False)


def _pareto_figure(uri: str, parent, trials: list[Trial], out: Path, baselines_experiment: str | None) -> list[Path]:
    """Figure D: every trial and the front on test, the front chosen on validation as the sweep chose
    it, and the baselines' mean test points (with CIs) if a methods sweep exists."""
    from sweeps import pareto
    from sweeps.spec import test_metric

    objectives = json.loads(parent.data.params["objectives"])
    metrics, modes = [o["metric"] for o in objectives], [o["mode"] for o in objectives]
    rows = [{"run_id": t.run_id, **t.params, **t.metrics} for t in trials]
    front = pareto.front_rows(rows, metrics, modes)  # chosen on validation ...
    shown = [test_metric(m) for m in metrics]  # ... drawn on test
    base: dict[str, tuple[Estimate, Estimate]] = {}
    if baselines_experiment:
        try:
            _, method_trials = load_trials(uri, baselines_experiment)
        except Exception:  # noqa: BLE001 - no methods sweep yet: draw the front alone
            method_trials = []
        dataset = _dataset(parent)
        for (method,), members in _group(method_trials, "method").items():
            members = [t for t in members if t.params.get("data.name", "safety") == dataset]
            if members:
                base[str(method)] = (bootstrap(members, metrics[0]), bootstrap(members, metrics[1]))
    title = (f"D: Pareto front of '{parent.info.run_name}' ({len(front)} of {len(rows)} trials, chosen on validation) "
             "on test, with baselines (mean, 95% CI)")
    png = pareto.plot_png(rows, front, shown, modes, out / "D_pareto.png", title)
    html = pareto.plot_html(rows, front, shown, modes, out / "D_pareto.html", title, [*metrics, *trials[0].params])
    if base:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import plotly.graph_objects as go

        fig, ax = plt.subplots(figsize=(6, 5))
        x, y = shown
        front = sorted(front, key=lambda r: r[x])
        ax.scatter([r[x] for r in rows], [r[y] for r in rows], c="lightgrey", label="trials")
        ax.plot([r[x] for r in front], [r[y] for r in front], "o", c="#d62728", label="front (chosen on validation)")
        pfig = go.Figure([go.Scatter(x=[r[x] for r in rows], y=[r[y] for r in rows], mode="markers",
                                     name="trials", marker={"color": "lightgrey"}),
                          go.Scatter(x=[r[x] for r in front], y=[r[y] for r in front],
                                     mode="markers", name="front (chosen on validation)", marker={"color": "#d62728"})])
        for method, (ex, ey) in base.items():
            ax.errorbar([ex.mean], [ey.mean], xerr=[[ex.mean - ex.lo], [ex.hi - ex.mean]],
                        yerr=[[ey.mean - ey.lo], [ey.hi - ey.mean]], fmt="s", capsize=3, label=f"{method} (n={ex.runs})")
            pfig.add_trace(go.Scatter(x=[ex.mean], y=[ey.mean], mode="markers", name=f"{method} (n={ex.runs})",
                                      marker={"symbol": "square", "size": 10},
                                      error_x={"type": "data", "symmetric": False, "array": [ex.hi - ex.mean], "arrayminus": [ex.mean - ex.lo]},
                                      error_y={"type": "data", "symmetric": False, "array": [ey.hi - ey.mean], "arrayminus": [ey.mean - ey.lo]}))
        for a, label in ((ax.set_xlabel, metrics[0]), (ax.set_ylabel, metrics[1])):
            a(f"{label} on test (0-100, higher is better)")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pfig.update_layout(title=title, xaxis_title=f"{metrics[0]} on test", yaxis_title=f"{metrics[1]} on test")
        pfig.write_html(html, include_plotlyjs=True, full_html=True)
    return [Path(png), Path(html)]


# -- the method comparison --------------------------------------------------------------------


def compare_table(uri: str, experiment: str = "methods", metrics=COMPARE_METRICS) -> str:
    """Markdown: per dataset and metric, ckt_ro's mean [95% CI] and its paired difference to each baseline."""
    parent, trials = load_trials(uri, experiment)
    lines = [f"# Method comparison (experiment `{experiment}`, run `{parent.info.run_name}`)", "",
             "Means and differences on 0-100 scales with 95% bootstrap CIs: each draw resamples the test sets "
             "(split seeds), the items of each test set, and the seeds run on it, so test-set sampling error "
             "is in the interval. Differences are paired on the same seed, split and test items. A difference "
             "whose CI excludes 0 is marked *.", ""]
    for (dataset, poison), members in _group(trials, "data.name", "data.poison_rate").items():
        by_method = {m[0]: ts for m, ts in _group(members, "method").items()}
        if "ckt_ro" not in by_method:
            continue
        key = lambda t: (t.params.get("seed"), t.params.get("data.split_seed"))  # noqa: E731
        full = {key(t): t for t in by_method["ckt_ro"]}
        present = [b for b in (*BASELINES, *RELATED) if b in by_method]
        n_items = len(by_method["ckt_ro"][0].items["y"])
        poisoned = f", poison_rate {poison}" if poison is not None else ""
        lines += [f"## {dataset or 'safety'}{poisoned} ({len(full)} seed x split pairs, {n_items} test items each)", "",
                  "| metric | ckt_ro | " + " | ".join(f"{b} | ckt_ro - {b}" for b in present) + " |",
                  "|---|---|" + "---|---|" * len(present)]
        for metric in metrics:
            if metric not in item_scores(by_method["ckt_ro"][0].items, by_method["ckt_ro"][0].items["label_names"]):
                continue
            cells = [bootstrap(by_method["ckt_ro"], metric).text()]
            for b in present:
                other = {key(t): t for t in by_method[b]}
                shared = sorted(set(full) & set(other), key=str)
                d = paired_difference([full[k] for k in shared], [other[k] for k in shared], metric)
                star = "*" if d.lo > 0 or d.hi < 0 else ""
                cells += [bootstrap(by_method[b], metric).text(), f"{d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}]{star}"]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    tracking.client(uri).log_text(parent.info.run_id, text, "compare.md")
    return text


def methods_figure(uri: str, experiment: str, out: Path, x: str = "kd_alignment", y: str = "noise_robustness",
                   beside: tuple[str, ...] = ("harmful_recall", "attack_success_rate")) -> Path:
    """One panel per (dataset, poison_rate) of a methods sweep: every method's mean test point with its 95%
    CI (``bootstrap``) on the ``x`` vs ``y`` plane, with ``beside``'s means in its legend entry. Written to
    ``out`` (PNG) and logged to the sweep's parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent, trials = load_trials(uri, experiment)
    groups = _group(trials, "data.name", "data.poison_rate")
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5.5), squeeze=False)
    for ax, ((dataset, poison), members) in zip(axes[0], groups.items()):
        for (method,), runs in _group(members, "method").items():
            ex, ey = bootstrap(runs, x), bootstrap(runs, y)
            scores = item_scores(runs[0].items, runs[0].items["label_names"])
            extra = ", ".join(f"{m} {bootstrap(runs, m).mean:.1f}" for m in beside if m in scores)
            ax.errorbar([ex.mean], [ey.mean], xerr=[[ex.mean - ex.lo], [ex.hi - ex.mean]],
                        yerr=[[ey.mean - ey.lo], [ey.hi - ey.mean]], fmt="s" if method in RELATED else "o",
                        capsize=3, label=f"{method} (n={ex.runs}{'; ' + extra if extra else ''})")
        ax.set_xlabel(f"{x} on test (0-100)")
        ax.set_ylabel(f"{y} on test (0-100)")
        ax.set_title(f"{Path(str(dataset or 'safety')).name}" + (f", poison_rate {poison}" if poison is not None else "")
                     + " (mean, 95% CI)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    tracking.client(uri).log_artifact(parent.info.run_id, str(out))
    return out
