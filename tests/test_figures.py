"""Figures and the method comparison, rebuilt from MLflow: the bootstrap against known answers, and
real (tiny-model) sweeps rendered into figures and a comparison table."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sweeps import figures
from tests.test_sweep import sweep, write_spec

BIN = Path(sys.executable).parent / "alignsweep"


def fake_trial(correct: np.ndarray, run_id: str = "r") -> figures.Trial:
    n = len(correct)
    y = np.zeros(n, dtype=int)
    pred = np.where(correct, 0, 1)
    items = {"label_names": ["a", "b"], "y": y.tolist(), "pred": pred.tolist(), "pred_attacked": pred.tolist(),
             "pred_noisy": pred.tolist(), "teacher_pred": y.tolist(), "js": [0.0] * n, "hard": [False] * n}
    return figures.Trial(run_id, {}, {}, items)


def test_bootstrap_matches_the_normal_interval_of_a_proportion():
    rng = np.random.default_rng(1)
    correct = rng.random(400) < 0.8
    est = figures.bootstrap([fake_trial(correct)], "accuracy", n_boot=4000)
    p = correct.mean()
    assert est.mean == pytest.approx(100 * p)
    half = 100 * 1.959964 * math.sqrt(p * (1 - p) / len(correct))  # the textbook 95% half-width
    assert (est.hi - est.lo) / 2 == pytest.approx(half, rel=0.12)
    assert est.lo <= est.mean <= est.hi


def test_run_resampling_widens_the_interval_when_runs_disagree():
    rng = np.random.default_rng(2)
    same = [fake_trial(rng.random(300) < 0.7, str(i)) for i in range(4)]
    spread = [fake_trial(rng.random(300) < p, str(i)) for i, p in enumerate((0.5, 0.6, 0.8, 0.9))]
    a, b = figures.bootstrap(same, "accuracy"), figures.bootstrap(spread, "accuracy")
    assert (b.hi - b.lo) > 1.5 * (a.hi - a.lo)


def test_paired_difference_known_answers():
    rng = np.random.default_rng(3)
    base = [rng.random(200) < 0.6 for _ in range(3)]
    same = figures.paired_difference([fake_trial(c) for c in base], [fake_trial(c) for c in base], "accuracy")
    assert same.mean == 0 and same.lo == 0 and same.hi == 0  # identical predictions: no difference, no spread
    better = figures.paired_difference([fake_trial(np.ones(200, bool))] * 3, [fake_trial(c) for c in base], "accuracy")
    assert better.mean == pytest.approx(100 - 100 * np.mean([c.mean() for c in base]))
    assert better.lo > 0


@pytest.mark.slow
def test_figures_and_compare_from_real_tiny_sweeps(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="dw", trials=None, sampler={"kind": "grid", "seed": 0},
                      space={"distill_weight": {"kind": "grid", "values": [0.0, 1.0]},
                             "data.split_seed": {"kind": "grid", "values": [0, 1]}})
    raw = yaml.safe_load(spec.read_text())
    raw.pop("trials")
    spec.write_text(yaml.safe_dump(raw))
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    parent, trials = figures.load_trials(uri, "dw")
    assert len(trials) == 4 and all(len(t.items["y"]) == 48 for t in trials)  # 20% of the 240-item toy set
    panels = figures._panels(trials, "distill_weight", None)
    for panel in panels:
        (series,) = panel.series
        assert series.x == [0.0, 1.0]  # one point per grid value
        for e in series.estimates:
            assert e.runs == 2 and e.lo <= e.mean <= e.hi

    done = subprocess.run([str(BIN), "figures", "--experiment", "dw", "--tracking-uri", uri, "--out", str(tmp_path / "fig")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    png, html = tmp_path / "fig" / "A_distill_weight.png", tmp_path / "fig" / "A_distill_weight.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = html.read_text()
    assert '<script src="https://cdn.plot.ly' not in text and "Plotly.newPlot" in text and "distillation weight" in text
    from mlflow.tracking import MlflowClient

    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/A_distill_weight.png", "figures/A_distill_weight.html"} <= logged

    methods = write_spec(tmp_path, tiny_backbone, toy_csv, name="methods", trials=None,
                         sampler={"kind": "grid", "seed": 0},
                         space={"method": {"kind": "grid", "values": ["ckt_ro", "ce", "kd", "adv"]},
                                "seed": {"kind": "grid", "values": [0, 1]}})
    raw = yaml.safe_load(methods.read_text())
    raw.pop("trials")
    methods.write_text(yaml.safe_dump(raw))
    out, uri = sweep(tmp_path, methods)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    table = subprocess.run([str(BIN), "compare", "--experiment", "methods", "--tracking-uri", uri],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    for col in ("ckt_ro", "ckt_ro - ce", "ckt_ro - kd", "ckt_ro - adv"):
        assert col in table.stdout
    for metric in ("accuracy", "kd_alignment", "noise_robustness", "alignment_stability", "safety_score"):
        assert f"| {metric} |" in table.stdout
