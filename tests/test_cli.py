"""`alignsweep train` through the real console script: bad input, JSON output, Ray Train workers,
and one slow end-to-end run on the real MiniLM backbone and the real `safety` data."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "alignsweep"


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("setting,field,allowed", [
    ("alpha=1.5", "alpha", "<= 1.0"),
    ("epsilon=-0.1", "epsilon", ">= 0.0"),
    ("precision=fp8", "precision", "fp32, bf16, fp16"),
    ("perturb.kind=blur", "perturb.kind", "gaussian, fgsm, pgd"),
    ("data.name=/nonexistent/prompts.csv", "data.name", "safety, sentiment"),
    ("alhpa=0.3", "alhpa", "alpha"),
    ("backbone=bert-base-uncased", "backbone", "all-MiniLM-L6-v2 or a local directory"),
    (f"backbone={Path(__file__).parent}", "backbone", "not a Hugging Face model"),  # a directory, but no model
    ("precision=fp16", "precision", "fp32, bf16"),  # no CUDA here
])
def test_bad_input_exits_2_with_one_line(setting, field, allowed, tmp_path):
    start = time.monotonic()
    out = run_cli("train", "--set", setting, "--set", f"cache_dir={tmp_path}")
    elapsed = time.monotonic() - start
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {field}:") and allowed in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "features").exists()  # nothing was computed
    if setting.startswith("backbone"):
        assert elapsed < 2.0  # an offline hub id fails fast, not after a network timeout


def test_train_json_on_tiny_model(tiny_backbone, toy_csv, tmp_path):
    out = run_cli("train", "--json", "--set", f"backbone={tiny_backbone}", "--set", f"data.name={toy_csv}",
                  "--set", f"cache_dir={tmp_path}", "--set", "budget_steps=8", "--set", "teacher.epochs=1",
                  "--set", "data.max_len=16")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    for name in ("accuracy", "kd_alignment", "noise_robustness", "alignment_stability", "noisy_text_accuracy",
                 "safety_score", "teacher_agreement", "harmful_recall", "benign_pass_rate", "attack_success_rate"):
        assert 0.0 <= metrics[name] <= 100.0


def test_train_under_ray_train_with_two_workers(tiny_backbone, toy_csv, tmp_path):
    out = run_cli("train", "--json", "--workers", "2", "--set", f"backbone={tiny_backbone}",
                  "--set", f"data.name={toy_csv}", "--set", f"cache_dir={tmp_path}", "--set", "budget_steps=6",
                  "--set", "teacher.epochs=1", "--set", "data.max_len=16")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout)
    assert 0.0 <= metrics["accuracy"] <= 100.0 and 0.0 <= metrics["noise_robustness"] <= 100.0


@pytest.mark.slow
def test_safety_end_to_end_on_real_minilm(tmp_path):
    cache = os.environ.get("ALIGNSWEEP_TEST_CACHE", str(Path.home() / ".cache" / "alignsweep-test"))
    out = run_cli("train", "--json", "--set", f"cache_dir={cache}", "--set", "budget_steps=20",
                  "--set", "teacher.epochs=1", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout)
    assert m["teacher_agreement"] > 50.0 and m["accuracy"] > 60.0  # real signal, not chance
    assert 0.0 <= m["attack_success_rate"] <= 100.0 and "hard_accuracy" in m


@pytest.mark.parametrize("args, named", [
    (["sweep", "--trials", "0"], "'--trials'"),
    (["sweep", "--trails", "4"], "--trails"),
    (["sweep", "--concurrency", "x"], "'--concurrency'"),
    (["nonsense"], "'nonsense'"),
])
def test_usage_errors_exit_2_without_a_traceback(args, named, tmp_path):
    """Typer brings its own copy of click: its usage errors once escaped as a traceback, exit 1."""
    out = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert named in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "mlflow.db").exists()
