"""Pareto front and hypervolume of a sweep's trials (DESIGN §2.4, §4, §7).

Every function takes a per-objective direction (``"max"`` or ``"min"``) and converts to
minimisation internally, so callers never negate metrics themselves. Non-dominance and
k >= 3 hypervolume come from moocore (fast, exact, any dimension); the 2-D hypervolume is a
short sweep line so the default two-objective front has a result that can be checked by eye.
matplotlib and plotly are imported inside the plot functions: the CLI imports this module
and must stay fast to start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Direction = Literal["max", "min"]

__all__ = ["Direction", "non_dominated", "hypervolume", "default_reference", "ideal_point",
           "normalised_hypervolume", "front_rows", "plot_png", "plot_html"]

#: Keys shown first in hover text to identify a trial, when a row has them.
_ID_KEYS = ("run_name", "trial_id", "run_id")
FRONT_COLOR = "#d62728"
TRIAL_COLOR = "#9e9e9e"


def _signs(directions: Sequence[Direction], k: int) -> np.ndarray:
    """+1 for 'min', -1 for 'max': multiplying by it turns every objective into minimisation."""
    if len(directions) != k:
        raise ValueError(f"{len(directions)} directions given for {k} objectives")
    bad = [d for d in directions if d not in ("max", "min")]
    if bad:
        raise ValueError(f"direction must be 'max' or 'min', got {bad[0]!r}")
    return np.array([-1.0 if d == "max" else 1.0 for d in directions])


def _as_2d(points: Any) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 1)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"points must have shape (n, k) with k >= 1, got {arr.shape}")
    return arr


def non_dominated(points: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """Boolean mask (n,) of the non-dominated rows of ``points`` (n, k), any k >= 1.

    Duplicated points all stay on the front (``keep_weakly``): two trials that reach the same
    metrics are equally good and both deserve the ``pareto=true`` tag. Rows containing a
    non-finite value (NaN from a failed trial, or inf) are never on the front and never
    dominate: moocore would otherwise return garbage for the whole set.
    """
    arr = _as_2d(points)
    signs = _signs(directions, arr.shape[1])
    mask = np.zeros(arr.shape[0], dtype=bool)
    finite = np.isfinite(arr).all(axis=1)
    if finite.any():
        import moocore

        mask[finite] = moocore.is_nondominated(arr[finite] * signs, keep_weakly=True)
    return mask


def _hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact 2-D hypervolume (minimisation; points already strictly better than reference).

    Sorted by the first objective, each point adds the rectangle between its own second
    coordinate and the best second coordinate seen so far; dominated points add nothing.
    """
    order = np.lexsort((points[:, 1], points[:, 0]))
    volume, best_y = 0.0, float(reference[1])
    for x, y in points[order]:
        if y < best_y:
            volume += (float(reference[0]) - x) * (best_y - y)
            best_y = float(y)
    return volume


def hypervolume(points: np.ndarray, directions: Sequence[Direction],
                reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` w.r.t. ``reference``: one number that grows when the
    front moves outwards, so sweeps (and sweep settings) can be compared.

    ``reference`` must be worse than every useful point in each objective (see
    :func:`default_reference`). Points not strictly better than it in every objective, and
    rows with non-finite values, contribute nothing. Exact sweep line in 1-D/2-D,
    ``moocore.hypervolume`` for k >= 3. No points -> 0.0.
    """
    arr = _as_2d(points)
    k = arr.shape[1]
    signs = _signs(directions, k)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape != (k,) or not np.isfinite(ref).all():
        raise ValueError(f"reference must be {k} finite numbers, got {list(reference)}")
    pts, ref = arr * signs, ref * signs
    pts = pts[np.isfinite(pts).all(axis=1) & (pts < ref).all(axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    if k == 1:
        return float(ref[0] - pts[:, 0].min())
    if k == 2:
        return _hypervolume_2d(pts, ref)
    import moocore

    return float(moocore.hypervolume(pts, ref=ref))


def default_reference(directions: Sequence[Direction], lower: float = 0.0,
                      upper: float = 100.0) -> list[float]:
    """Reference point for our metrics, which all live on 0..100 (DESIGN §4): the worst
    possible value of each objective, ``lower`` for 'max' and ``upper`` for 'min'. A fixed
    reference keeps hypervolumes of different sweeps comparable."""
    _signs(directions, len(directions))
    return [float(lower) if d == "max" else float(upper) for d in directions]


def ideal_point(directions: Sequence[Direction], lower: float = 0.0, upper: float = 100.0) -> list[float]:
    """The best possible value of each objective on 0..100 scales: ``upper`` for 'max', ``lower`` for 'min'."""
    _signs(directions, len(directions))
    return [float(upper) if d == "max" else float(lower) for d in directions]


def normalised_hypervolume(volume: float, directions: Sequence[Direction], reference: Sequence[float]) -> float:
    """``volume`` as a fraction of the box between ``reference`` and the ideal point: 1.0 is a front
    at 100 on every maximised axis (0 on minimised ones); 0.0 is nothing beyond the reference.
    NaN when the reference is the ideal point on some axis (the box is empty)."""
    box = float(np.prod(np.abs(np.asarray(ideal_point(directions)) - np.asarray(reference, dtype=float))))
    return volume / box if box > 0 else math.nan


def _objective_value(row: dict, key: str) -> float | None:
    """The row's finite float value for ``key``, or None (missing, None, NaN, not a number)."""
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _valid(rows: list[dict], objectives: Sequence[str]) -> tuple[list[dict], np.ndarray]:
    """Rows whose objectives are all finite numbers (failed trials dropped), and their matrix."""
    kept, values = [], []
    for row in rows:
        vals = [_objective_value(row, key) for key in objectives]
        if all(v is not None for v in vals):
            kept.append(row)
            values.append(vals)
    return kept, np.asarray(values, dtype=float).reshape(len(kept), len(objectives))


def front_rows(rows: list[dict], objectives: Sequence[str],
               directions: Sequence[Direction]) -> list[dict]:
    """The non-dominated rows (the original dict objects), best first on the first objective.

    Rows whose objective values are missing, None or non-finite (failed trials) are skipped.
    Ties on the first objective are broken by the next objectives, each best first, so the
    order is deterministic for tables and CSV artifacts.
    """
    if not objectives:
        raise ValueError("at least one objective is needed")
    signs = _signs(directions, len(objectives))
    kept, values = _valid(rows, objectives)
    if not kept:
        return []
    mask = non_dominated(values, directions)
    minimised = values[mask] * signs
    order = np.lexsort(minimised.T[::-1])  # lexsort's last key is primary
    front = [row for row, on in zip(kept, mask) if on]
    return [front[i] for i in order]


def _axis_label(name: str, direction: Direction) -> str:
    better = "higher" if direction == "max" else "lower"
    return f"{name} (0-100, {better} is better)"


def _plot_setup(rows: list[dict], front: list[dict], objectives: Sequence[str],
                directions: Sequence[Direction], title: str):
    """Shared by both plots: the two plotted objectives, the trial and front coordinates,
    the front's staircase and the title (noting hidden objectives when k > 2)."""
    if len(objectives) < 2:
        raise ValueError("a Pareto plot needs at least two objectives")
    _signs(directions, len(objectives))
    obj, dirs = list(objectives[:2]), list(directions[:2])
    trials, trial_xy = _valid(rows, obj)
    front_kept, front_xy = _valid(front, obj)
    if len(objectives) > 2:
        title = f"{title} (first 2 of {len(objectives)} objectives shown)"
    return obj, dirs, trials, trial_xy, front_kept, front_xy, _staircase(front_xy, dirs), title


def _staircase(xy: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """Vertices of the front's attainment boundary: the step line that separates what the
    front dominates from what it does not, for any mix of directions."""
    if xy.shape[0] == 0:
        return xy.reshape(0, 2)
    signs = _signs(directions, 2)
    # a front chosen on validation and drawn on test may hold points dominated there: the
    # boundary is that of the points that are not
    pts = xy[non_dominated(xy, directions)] * signs
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    verts = [pts[0]]
    for nxt in pts[1:]:
        verts.append(np.array([nxt[0], verts[-1][1]]))
        verts.append(nxt)
    return np.asarray(verts) * signs


def plot_png(rows: list[dict], front: list[dict], objectives: Sequence[str],
             directions: Sequence[Direction], path: str | Path, title: str) -> Path:
    """Static Pareto plot for reports and the MLflow artifact view: every trial as a grey dot,
    the front as red dots joined by its step line. Only the first two objectives are drawn."""
    import matplotlib

    matplotlib.use("Agg")  # headless: set here, not at import, so importers keep their backend
    import matplotlib.pyplot as plt

    obj, dirs, _, trial_xy, _, front_xy, steps, title = _plot_setup(
        rows, front, objectives, directions, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    try:
        ax.scatter(trial_xy[:, 0], trial_xy[:, 1], s=18, color=TRIAL_COLOR, alpha=0.7,
                   label=f"trials ({len(trial_xy)})", zorder=1)
        if len(steps):
            ax.plot(steps[:, 0], steps[:, 1], color=FRONT_COLOR, linewidth=1.2, zorder=2)
        ax.scatter(front_xy[:, 0], front_xy[:, 1], s=36, color=FRONT_COLOR,
                   label=f"Pareto front ({len(front_xy)})", zorder=3)
        ax.set_xlabel(_axis_label(obj[0], dirs[0]))
        ax.set_ylabel(_axis_label(obj[1], dirs[1]))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _hover_text(row: dict, objectives: Sequence[str], hover_keys: Sequence[str]) -> str:
    """One trial's hover text: its identity, its objective values, its searched params."""
    lines = [f"{key}: {row[key]}" for key in _ID_KEYS if row.get(key) not in (None, "")]
    for key in list(objectives) + [k for k in hover_keys if k not in objectives]:
        if key in row:
            value = row[key]
            lines.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return "<br>".join(lines)


def plot_html(rows: list[dict], front: list[dict], objectives: Sequence[str],
              directions: Sequence[Direction], path: str | Path, title: str,
              hover_keys: Sequence[str]) -> Path:
    """Interactive Pareto plot (same content as :func:`plot_png`) whose hover text names each
    trial and its searched params, so a front point can be traced back to its run.

    plotly.js is embedded (``include_plotlyjs=True``): MLflow serves artifacts from machines
    that may be offline, where a CDN script would leave a blank page. The plot div has the
    stable id ``pareto-plot``.
    """
    import plotly.graph_objects as go

    obj, dirs, trials, trial_xy, front_kept, front_xy, steps, title = _plot_setup(
        rows, front, objectives, directions, title)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=trial_xy[:, 0], y=trial_xy[:, 1], mode="markers", name=f"trials ({len(trials)})",
        marker={"color": TRIAL_COLOR, "size": 7, "opacity": 0.7},
        text=[_hover_text(r, objectives, hover_keys) for r in trials],
        hovertemplate="%{text}<extra>trial</extra>"))
    fig.add_trace(go.Scatter(
        x=steps[:, 0], y=steps[:, 1], mode="lines", name="front boundary",
        line={"color": FRONT_COLOR, "width": 1.5}, hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(
        x=front_xy[:, 0], y=front_xy[:, 1], mode="markers",
        name=f"Pareto front ({len(front_kept)})", marker={"color": FRONT_COLOR, "size": 10},
        text=[_hover_text(r, objectives, hover_keys) for r in front_kept],
        hovertemplate="%{text}<extra>Pareto front</extra>"))
    fig.update_layout(title=title, xaxis_title=_axis_label(obj[0], dirs[0]),
                      yaxis_title=_axis_label(obj[1], dirs[1]), template="plotly_white",
                      hovermode="closest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True, div_id="pareto-plot")
    return path
