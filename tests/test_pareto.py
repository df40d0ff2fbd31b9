"""Pareto front and hypervolume against hand computations, brute force and moocore (DESIGN §4, §7)."""

from __future__ import annotations

import moocore
import numpy as np
import pytest

from sweeps.pareto import (default_reference, front_rows, hypervolume, non_dominated, plot_html,
                           plot_png)


def _brute_force(points: np.ndarray, directions: list[str]) -> np.ndarray:
    """O(n^2) reference: a row is on the front unless some other row is at least as good in
    every objective and strictly better in one; NaN rows are never on the front."""
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    pts = points * signs
    ok = ~np.isnan(pts).any(axis=1)
    mask = np.zeros(len(pts), dtype=bool)
    for i in range(len(pts)):
        if not ok[i]:
            continue
        mask[i] = not any(ok[j] and np.all(pts[j] <= pts[i]) and np.any(pts[j] < pts[i])
                          for j in range(len(pts)))
    return mask


def test_non_dominated_mixed_directions_duplicates_and_nan():
    # objective 0 maximised, objective 1 minimised
    pts = np.array([
        [90.0, 10.0],  # front
        [90.0, 10.0],  # duplicate of a front point: stays
        [95.0, 20.0],  # front (better on 0, worse on 1)
        [80.0, 5.0],   # front (best on 1)
        [85.0, 15.0],  # dominated by [90, 10]
        [80.0, 20.0],  # dominated by everything above
        [np.nan, 0.0],  # failed trial: never on the front, never dominates
        [100.0, np.nan],
    ])
    mask = non_dominated(pts, ["max", "min"])
    assert mask.tolist() == [True, True, True, True, False, False, False, False]
    # the same set read as (min, max) flips which points win
    assert non_dominated(pts, ["min", "max"]).tolist() == [
        False, False, False, False, False, True, False, False]


def test_non_dominated_nan_row_does_not_dominate():
    pts = np.array([[np.nan, 100.0], [50.0, 50.0]])
    assert non_dominated(pts, ["max", "max"]).tolist() == [False, True]


def test_non_dominated_three_objectives():
    pts = np.array([
        [1.0, 1.0, 1.0],  # front: nothing is at least as good on all three
        [2.0, 2.0, 2.0],
        [1.0, 1.0, 2.0],  # dominated by [1, 1, 1] (equal on 0, 1; worse on 2)
        [0.0, 3.0, 5.0],  # only one with y = 3
        [0.0, 0.0, 0.0],  # best on the minimised objective
        [2.0, 2.0, 2.0],  # duplicate
    ])
    mask = non_dominated(pts, ["max", "max", "min"])
    assert mask.tolist() == [True, True, False, True, True, True]


def test_non_dominated_edge_cases():
    assert non_dominated(np.empty((0, 2)), ["max", "max"]).tolist() == []
    assert non_dominated(np.array([[3.0], [5.0], [5.0]]), ["max"]).tolist() == [False, True, True]
    with pytest.raises(ValueError):
        non_dominated(np.ones((2, 2)), ["max"])
    with pytest.raises(ValueError):
        non_dominated(np.ones((2, 2)), ["max", "up"])


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_dominated_matches_brute_force(k, seed):
    rng = np.random.default_rng(seed)
    directions = list(rng.choice(["max", "min"], size=k))
    # integers on a small grid so ties and duplicates really occur
    pts = rng.integers(0, 12, size=(200, k)).astype(float)
    pts[rng.choice(200, size=5, replace=False), rng.integers(0, k)] = np.nan
    assert np.array_equal(non_dominated(pts, directions), _brute_force(pts, directions))


def test_hypervolume_hand_computation_2d():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # staircase under (1,3),(2,2),(3,1) above (0,0): 3 + 2 + 1
    assert hypervolume(pts, ["max", "max"], [0.0, 0.0]) == pytest.approx(6.0)
    # a dominated point and a duplicate add nothing; order does not matter
    more = np.vstack([pts, [[1.0, 1.0], [2.0, 2.0]]])[::-1]
    assert hypervolume(more, ["max", "max"], [0.0, 0.0]) == pytest.approx(6.0)


def test_hypervolume_mixed_directions_and_reference_filter():
    # maximise x, minimise y, reference (0, 10): (4, 6) -> 4*4, (2, 2) adds 2*(6-2)
    pts = np.array([[4.0, 6.0], [2.0, 2.0]])
    assert hypervolume(pts, ["max", "min"], [0.0, 10.0]) == pytest.approx(16.0 + 8.0)
    # points on or beyond the reference, and NaN rows, contribute nothing
    extra = np.vstack([pts, [[0.0, 1.0], [5.0, 10.0], [-1.0, 0.0], [np.nan, 0.0]]])
    assert hypervolume(extra, ["max", "min"], [0.0, 10.0]) == pytest.approx(24.0)
    assert hypervolume(np.empty((0, 2)), ["max", "min"], [0.0, 10.0]) == 0.0
    assert hypervolume(np.array([[-1.0, 20.0]]), ["max", "min"], [0.0, 10.0]) == 0.0


def test_hypervolume_default_reference_on_metric_scale():
    assert default_reference(["max", "min", "max"]) == [0.0, 100.0, 0.0]
    assert default_reference(["min"], lower=-1, upper=1) == [1.0]
    # a single perfect trial dominates the whole 0..100 square
    ref = default_reference(["max", "min"])
    assert hypervolume(np.array([[100.0, 0.0]]), ["max", "min"], ref) == pytest.approx(1e4)


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_2d_matches_moocore(seed):
    rng = np.random.default_rng(seed)
    directions = list(rng.choice(["max", "min"], size=2))
    pts = rng.uniform(0, 100, size=(60, 2))
    pts[:5] = np.round(pts[:5] / 10) * 10  # some ties
    ref = default_reference(directions)
    maximise = [d == "max" for d in directions]
    expected = moocore.hypervolume(pts, ref=ref, maximise=maximise)
    assert hypervolume(pts, directions, ref) == pytest.approx(expected, rel=1e-12)


def test_hypervolume_3d_unit_cubes():
    ref = [0.0, 0.0, 0.0]
    d = ["max", "max", "max"]
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), d, ref) == pytest.approx(1.0)
    # two boxes 2x1x1 and 1x2x1 overlap in one unit cube: 2 + 2 - 1
    assert hypervolume(np.array([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]]), d, ref) == pytest.approx(3.0)
    # three 2x1x1-shaped boxes along each axis: 2 + 2 + 2 - 3 overlaps + 1 = 4
    pts = np.array([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    assert hypervolume(pts, d, ref) == pytest.approx(4.0)
    # same set with the last objective minimised against reference 3: z' = 3 - z
    flipped = pts.copy()
    flipped[:, 2] = 3.0 - flipped[:, 2]
    assert hypervolume(flipped, ["max", "max", "min"], [0.0, 0.0, 3.0]) == pytest.approx(4.0)


ROWS = [
    {"run_id": "r1", "trial_id": "t1", "kd_alignment": 96.1, "noise_robustness": 74.0,
     "epsilon": 0.1, "alpha": 0.5},
    {"run_id": "r2", "trial_id": "t2", "kd_alignment": 90.0, "noise_robustness": 80.0,
     "epsilon": 0.2, "alpha": 0.3},
    {"run_id": "r3", "trial_id": "t3", "kd_alignment": 89.0, "noise_robustness": 70.0,
     "epsilon": 0.05, "alpha": 0.9},
    {"run_id": "r4", "trial_id": "t4", "kd_alignment": None, "noise_robustness": 99.0,
     "epsilon": 0.3},
    {"run_id": "r5", "trial_id": "t5", "kd_alignment": float("nan"), "noise_robustness": 99.0},
    {"run_id": "r6", "trial_id": "t6", "noise_robustness": 99.0},
    {"run_id": "r7", "trial_id": "t7", "kd_alignment": 97.5, "noise_robustness": 60.0,
     "epsilon": 0.0, "alpha": 1.0},
]
OBJ = ["kd_alignment", "noise_robustness"]


def test_front_rows_skips_failed_and_sorts_best_first():
    front = front_rows(ROWS, OBJ, ["max", "max"])
    assert [r["trial_id"] for r in front] == ["t7", "t1", "t2"]
    assert front[0] is ROWS[6]  # the original dicts come back
    # minimising the first objective reverses the order of the same points
    front_min = front_rows(ROWS, OBJ, ["min", "max"])
    assert [r["trial_id"] for r in front_min] == ["t3", "t2"]
    assert front_rows([], OBJ, ["max", "max"]) == []
    assert front_rows(ROWS[3:6], OBJ, ["max", "max"]) == []


def test_plot_png_writes_png(tmp_path):
    front = front_rows(ROWS, OBJ, ["max", "max"])
    out = plot_png(ROWS, front, OBJ, ["max", "max"], tmp_path / "sub" / "pareto.png", "sweep")
    data = out.read_bytes()
    assert out.exists() and len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_png_three_objectives(tmp_path):
    obj = OBJ + ["epsilon"]
    dirs = ["max", "max", "min"]
    out = plot_png(ROWS, front_rows(ROWS, obj, dirs), obj, dirs, tmp_path / "p3.png", "k3")
    assert out.stat().st_size > 1000


def test_plot_html_is_offline_and_has_hover(tmp_path):
    front = front_rows(ROWS, OBJ, ["max", "max"])
    out = plot_html(ROWS, front, OBJ, ["max", "max"], tmp_path / "pareto.html", "my sweep",
                    hover_keys=["epsilon", "alpha", "not_a_param"])
    html = out.read_text(encoding="utf-8")
    assert len(html) > 1_000_000  # plotly.js itself is inline (~4.5 MB)
    assert "plotly.js v" in html or "Plotly" in html
    assert '<script src="https://cdn' not in html
    assert 'id="pareto-plot"' in html
    assert "epsilon: 0.1" in html and "alpha: 0.5" in html
    assert "trial_id: t7" in html
    assert "not_a_param" not in html
    assert "higher is better" in html and "my sweep" in html


def test_plots_need_two_objectives(tmp_path):
    with pytest.raises(ValueError):
        plot_png(ROWS, [], ["kd_alignment"], ["max"], tmp_path / "x.png", "t")


def test_module_import_is_light():
    import subprocess
    import sys

    code = ("import sys, sweeps.pareto; "
            "print(any(m in sys.modules for m in ('matplotlib', 'plotly', 'moocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
