"""Shared pieces of the benchmarks: the row every figure becomes, the train settings of a full or
smoke run, a process-tree memory sampler, and the entry point each section module runs under.

Each section runs in its own Python process (``python -m benchmarks.<section> --work DIR --out
FILE [--smoke]``), started by ``benchmarks/run_all.py``: a clean process per section keeps
memory figures, Ray sessions and torch thread settings from leaking between sections.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
SMOKE_ASSETS_ENV = "ALIGNSWEEP_BENCH_SMOKE_ASSETS"


@dataclass
class Row:
    """One figure of the table: ``value`` measured against ``baseline`` taken side by side in the
    same run; ``ratio`` is value / baseline unless the row says otherwise in its ``measure``."""

    section: int
    key: str  # e.g. "1a": stable across full and smoke runs
    measure: str
    value: float
    unit: str
    baseline: float
    baseline_name: str
    ratio: float
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row(section: int, key: str, measure: str, value: float, unit: str, baseline: float, baseline_name: str,
        ratio: float | None = None, target: str = "", met: bool | None = None, note: str = "") -> Row:
    if ratio is None:
        ratio = value / baseline if baseline else float("nan")
    met = None if met is None else bool(met)
    return Row(section, key, measure, float(value), unit, float(baseline), baseline_name, float(ratio), target, met, note)


# -- train settings of a run ------------------------------------------------------------------------

def make_smoke_assets(root: Path) -> dict[str, str]:
    """The tiny random BERT and a 240-row toy CSV, built once under ``root`` (by the tests' builders)."""
    from tests.helpers import toy_prompts, write_tiny_bert

    root.mkdir(parents=True, exist_ok=True)
    bert = root / "tiny-bert"
    if not (bert / "config.json").is_file():
        write_tiny_bert(bert)
    csv = root / "prompts.csv"
    if not csv.is_file():
        csv.write_text("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in toy_prompts()) + "\n")
    return {"backbone": str(bert), "csv": str(csv), "cache": str(root / "cache")}


def base_train(smoke: bool, work: Path) -> dict[str, Any]:
    """TrainConfig fields every section starts from: the defaults (safety data, MiniLM, the shared
    cache in ~/.cache/alignsweep) for a full run; the tiny model and toy CSV for a smoke run."""
    if not smoke:
        return {}
    # run_all points every section at one set of assets (and so one smoke cache) via the env
    assets = make_smoke_assets(Path(os.environ.get(SMOKE_ASSETS_ENV, work / "smoke")))
    return {"backbone": assets["backbone"], "cache_dir": assets["cache"],
            "data": {"name": assets["csv"], "max_len": 16}, "teacher": {"epochs": 1, "lr": 1e-3},
            "head_hidden": 32, "batch_size": 32, "budget_steps": 12, "log_every": 4}


def train_config(smoke: bool, work: Path, **over: Any):
    from trainable.config import TrainConfig, build_config, deep_merge

    return build_config(TrainConfig, deep_merge(base_train(smoke, work), over))


def noop_report(metrics: dict[str, float], checkpoint: Any = None) -> None:
    """The ``report`` a bare loop hands to train_loop: drop everything."""


def suggest(trial, path: str, d) -> Any:
    """A bare Optuna loop's define-by-run for one SweepSpec dimension (the sweep's own domains)."""
    if d.kind == "uniform":
        return trial.suggest_float(path, d.low, d.high)
    if d.kind == "loguniform":
        return trial.suggest_float(path, d.low, d.high, log=True)
    if d.kind == "int":
        return trial.suggest_int(path, int(d.low), int(d.high))
    return trial.suggest_categorical(path, list(d.values))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- memory ------------------------------------------------------------------------------------------


def classify(cmdline: list[str], name: str) -> str:
    """'trial' for a process running a Tune trial or a Ray Train worker, 'ray' for the rest of Ray
    (gcs_server, raylet, agents, idle workers), 'other' for anything else."""
    title = " ".join(cmdline) if cmdline else name
    if title.startswith("ray::"):
        if any(t in title for t in ("ImplicitFunc", "RayTrainWorker", "TrainController", "_Inner", "run_trial")):
            return "trial"
        return "ray"
    if any(t in title for t in ("gcs_server", "raylet", "ray/_private", "ray/dashboard", "ray/autoscaler",
                                "default_worker.py", "runtime_env")):
        return "ray"
    return "other"


@dataclass
class MemoryPeaks:
    root_rss: int = 0
    trial_rss: int = 0  # the largest single trial / Train worker process
    tree_rss: int = 0  # sum over the whole process tree (counts shared pages once per process)
    tree_pss: int = 0  # sum of proportional set sizes: shared pages split between sharers
    root_pss: int = 0
    procs: int = 0
    samples: int = 0
    trial_titles: list[str] = field(default_factory=list)


class TreeSampler(threading.Thread):
    """Samples this process and all its descendants every ``interval`` s and keeps the peaks."""

    def __init__(self, interval: float = 0.25, pss: bool = True):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.root = psutil, psutil.Process()
        self.interval, self.pss = interval, pss
        self.peaks = MemoryPeaks()
        self._halt = threading.Event()
        self._kinds: dict[int, tuple[str, str]] = {}

    def _kind(self, p) -> tuple[str, str]:
        # ray workers rename themselves (ray::IDLE -> ray::ImplicitFunc...): re-read while 'ray'
        cached = self._kinds.get(p.pid)
        if cached and cached[0] != "ray":
            return cached
        try:
            title = " ".join(p.cmdline()) or p.name()
        except self.psutil.Error:
            title = ""
        kind = classify(title.split(" "), title)
        self._kinds[p.pid] = (kind, title[:60])
        return self._kinds[p.pid]

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        tree_rss = tree_pss = 0
        pk = self.peaks
        for p in procs:
            try:
                if self.pss:
                    info = p.memory_full_info()
                    rss, pss = info.rss, info.pss
                else:
                    rss = pss = p.memory_info().rss
            except ps.Error:
                continue
            tree_rss += rss
            tree_pss += pss
            if p.pid == self.root.pid:
                pk.root_rss, pk.root_pss = max(pk.root_rss, rss), max(pk.root_pss, pss)
            else:
                kind, title = self._kind(p)
                if kind == "trial":
                    pk.trial_rss = max(pk.trial_rss, rss)
                    short = title.split(" ")[0]
                    if short not in pk.trial_titles:
                        pk.trial_titles.append(short)
        pk.tree_rss, pk.tree_pss = max(pk.tree_rss, tree_rss), max(pk.tree_pss, tree_pss)
        pk.procs = max(pk.procs, len(procs))
        pk.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> MemoryPeaks:
        self._halt.set()
        self.join(timeout=10)
        self.sample()
        return self.peaks


MB = 1024 * 1024


# -- section entry point -----------------------------------------------------------------------------


def section_main(run: Callable[[bool, Path], list[Row]]) -> None:
    """``python -m benchmarks.<section> --work DIR --out FILE [--smoke]``: run one section, write
    its rows as JSON. Progress goes to stderr; stdout stays free for the table of run_all."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = run(args.smoke, work)
    Path(args.out).write_text(json.dumps({"rows": [r.as_dict() for r in rows], "wall_s": time.monotonic() - started}))


def section_or_child_main(run: Callable[[bool, Path], list[Row]], child: Callable[[Path, Path, Path], None]) -> None:
    """``section_main(run)``, or with ``--child SPEC --work DIR --out FILE`` one measured sweep in a
    clean process: ``child(spec, out, work)`` (the sections that time whole ``run_sweep`` calls)."""
    if "--child" not in sys.argv:
        section_main(run)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    child(a.child, a.out, a.work)


def run_clean(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> int:
    """Run ``cmd`` (output to ``log_path``); on timeout, SIGINT it (a sweep driver then shuts Ray
    down itself), and after a grace period kill whatever of its process tree is left, by pid.
    Returns the exit code (124 on timeout)."""
    import psutil

    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        tree: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    tree.setdefault(p.pid, p)
            except psutil.Error:
                pass
            time.sleep(1.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
        else:
            rc = proc.returncode
    for p in tree.values():  # processes this command started that outlived it (Ray after a crash)
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass
    return rc


def log(msg: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)
