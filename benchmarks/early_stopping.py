"""7. Early stopping: normalised hypervolume against optimizer steps spent, MO-ASHA vs FIFO, with
the same searcher and seeds.

Real training, as a sweep runs it: ``train_loop`` on the shared cached features (default config:
MiniLM features of `safety`, MLP head, PGD-3 L2 training, fp32) over the built-in ``pareto``
spec's space without precision (distill_weight, epsilon, alpha, lambda_reg and budget_steps
100-400). Objectives are validation (kd_alignment, noise_robustness), the hypervolume reference is
the plain-CE baseline's validation point and the hypervolume is normalised by the box up to
(100, 100), as ``run_sweep`` reports it. Each searcher seed runs the product's TPE
(``make_sampler``) twice, in a plain Optuna loop, one trial at a time:
- FIFO: ``trials`` trials, each to its own budget;
- MO-ASHA: the product's rung rule (``sweeps.moasha.Rungs``; grace 25 steps, reduction factor 3,
  rungs at 25, 75, 225): each trial reports validation at its rungs (``train_loop(eval_at=...)``)
  and a trial outside the top 1/3 at a rung stops there and is told PRUNED, as in a sweep. It
  runs until it has spent FIFO's steps.
Steps spent are optimizer steps (a stopped trial counts the steps it ran); the rung evaluations
themselves (one validation pass each) are not steps. The figure: one line per seed, both
schedulers, saved as a PNG. Evaluations run in 2 processes, one torch thread each.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import REPO, Row, base_train, log, median, row, section_main

PNG = REPO / "docs" / "early_stopping.png"
_STATE: dict = {}


class _Stopped(Exception):
    def __init__(self, step: int):
        self.step = step


def es_spec(smoke: bool, work: Path, seed: int, trials: int, grace: int):
    from sweeps.spec import SweepSpec
    from trainable.config import build_config, deep_merge

    spec = yaml.safe_load((REPO / "sweeps" / "specs" / "pareto.yaml").read_text())
    spec["space"].pop("precision")
    if smoke:
        spec["space"]["budget_steps"] = {"kind": "int", "low": 8, "high": 24}
    spec.update(name="bench-es", trials=trials, concurrency=1, sampler={"kind": "tpe", "seed": seed},
                scheduler={"kind": "moasha", "grace_steps": grace, "reduction_factor": 3})
    spec["train"] = deep_merge(deep_merge(spec["train"], base_train(smoke, work)),
                               {"precision": "fp32", "checkpoint_every": 0, "log_every": 10_000})
    spec["train"].pop("budget_steps", None)  # searched
    return build_config(SweepSpec, spec)


def _init(smoke: bool, work: str, trials: int, grace: int) -> None:
    import optuna
    import torch

    from trainable.loop import prepare_artifacts

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = es_spec(smoke, Path(work), 0, trials, grace)
    _STATE.update(smoke=smoke, work=Path(work), trials=trials, grace=grace, spec=spec,
                  art=prepare_artifacts(spec.trial_config({"budget_steps": 100})))


def _baseline(_: int) -> list[float]:
    from benchmarks.common import noop_report
    from trainable.loop import train_loop

    spec = _STATE["spec"]
    final = train_loop(spec.baseline_config(), noop_report, artifacts=_STATE["art"])
    return [final[m] for m in spec.metrics]


def _run(job: tuple[int, str, int]) -> tuple[int, str, list[tuple[int, list[float] | None]]]:
    """One searcher seed under one scheduler: [(steps this trial spent, its values or None if stopped)]."""
    import optuna
    from optuna.trial import TrialState

    from benchmarks.common import suggest
    from sweeps.moasha import Rungs, rung_steps
    from sweeps.searcher import make_sampler
    from sweeps.spec import nest
    from trainable.loop import train_loop

    seed, scheduler, step_budget = job
    spec = es_spec(_STATE["smoke"], _STATE["work"], seed, _STATE["trials"], _STATE["grace"])
    study = optuna.create_study(directions=["maximize"] * len(spec.metrics), sampler=make_sampler(spec))
    rungs = Rungs(spec.modes, spec.scheduler.reduction_factor)
    out: list[tuple[int, list[float] | None]] = []
    spent = 0
    while (scheduler == "fifo" and len(out) < _STATE["trials"]) or (scheduler == "moasha" and spent < step_budget):
        trial = study.ask()
        params = {path: suggest(trial, path, d) for path, d in spec.space.items()}
        config = spec.trial_config(nest(params))
        tid = f"trial-{trial.number}"

        def report(metrics, checkpoint=None):
            if checkpoint is None and all(m in metrics for m in spec.metrics):  # a rung
                if not rungs.record(tid, int(metrics["step"]), [metrics[m] for m in spec.metrics]):
                    raise _Stopped(int(metrics["step"]))

        eval_at = rung_steps(spec.scheduler.grace_steps, spec.scheduler.reduction_factor, config.budget_steps) \
            if scheduler == "moasha" else []
        try:
            final = train_loop(config, report, artifacts=_STATE["art"], eval_at=eval_at)
        except _Stopped as stop:
            study.tell(trial, state=TrialState.PRUNED)
            out.append((stop.step, None))
            spent += stop.step
            continue
        values = [final[m] for m in spec.metrics]
        study.tell(trial, values)
        out.append((config.budget_steps, values))
        spent += config.budget_steps
    return seed, scheduler, out


def curve(trials: list[tuple[int, list[float] | None]], reference: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative steps, normalised hypervolume of the finished trials so far) after each trial."""
    from sweeps import pareto

    steps, hvs, done = [], [], []
    total = 0
    for spent, values in trials:
        total += spent
        if values is not None:
            done.append(values)
        volume = pareto.hypervolume(np.asarray(done, dtype=float).reshape(len(done), 2), ["max", "max"], reference)
        steps.append(total)
        hvs.append(pareto.normalised_hypervolume(volume, ["max", "max"], reference))
    return np.asarray(steps), np.asarray(hvs)


def steps_to_reach(steps: np.ndarray, hvs: np.ndarray, target: float) -> float:
    hit = np.nonzero(hvs >= target - 1e-12)[0]
    return float(steps[hit[0]]) if len(hit) else math.inf


def plot(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {"fifo": "#1f77b4", "moasha": "#d62728"}
    labels = {"fifo": "FIFO (every trial to its budget)", "moasha": "MO-ASHA (grace 25, factor 3)"}
    for scheduler, runs in curves.items():
        for i, (x, y) in enumerate(runs):
            ax.step(x, y, where="post", color=colours[scheduler], alpha=0.6, linewidth=1.2,
                    label=labels[scheduler] if i == 0 else None)
    ax.set_xlabel("optimizer steps spent (all trials)")
    ax.set_ylabel("normalised hypervolume (validation)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(smoke: bool, work: Path) -> list[Row]:
    trials, seeds, grace = (4, 2, 4) if smoke else (24, 5, 25)
    ctx = mp.get_context("spawn")
    log(f"{seeds} TPE seeds x (FIFO {trials} trials, then MO-ASHA on FIFO's steps), 2 processes")
    with ctx.Pool(2, initializer=_init, initargs=(smoke, str(work), trials, grace)) as pool:
        reference = pool.map(_baseline, [0])[0]
        fifo = {seed: out for seed, _, out in pool.map(_run, [(s, "fifo", 0) for s in range(seeds)], chunksize=1)}
        budgets = {seed: sum(spent for spent, _ in out) for seed, out in fifo.items()}
        asha = {seed: out for seed, _, out in pool.map(_run, [(s, "moasha", budgets[s]) for s in range(seeds)],
                                                       chunksize=1)}
    fifo_curves = {s: curve(fifo[s], reference) for s in range(seeds)}
    asha_curves = {s: curve(asha[s], reference) for s in range(seeds)}
    fractions, finals, asha_finals, counts, pruned = [], [], [], [], []
    for s in range(seeds):
        target = fifo_curves[s][1][-1]
        finals.append(target)
        asha_finals.append(float(asha_curves[s][1][-1]))
        fractions.append(steps_to_reach(*asha_curves[s], target) / budgets[s])
        counts.append(len(asha[s]))
        pruned.append(sum(v is None for _, v in asha[s]))
    png = work / "early_stopping.png" if smoke else PNG
    plot({"fifo": list(fifo_curves.values()), "moasha": list(asha_curves.values())}, png,
         f"normalised hypervolume vs steps: {seeds} TPE seeds, FIFO {trials} trials vs MO-ASHA on the same steps")
    med_fraction = median(fractions)
    reached = sum(math.isfinite(f) for f in fractions)
    rows = [
        row(7, "7a", "MO-ASHA: steps to reach FIFO's final normalised hypervolume / FIFO's steps (median over seeds)",
            med_fraction * median(list(budgets.values())) if math.isfinite(med_fraction) else math.inf, "steps",
            median(list(budgets.values())), f"FIFO, {trials} trials to their budgets", ratio=med_fraction,
            target="<= 0.33", met=med_fraction <= 1 / 3,
            note=(f"per seed: {', '.join('not reached' if not math.isfinite(f) else f'{f:.2f}' for f in fractions)}; "
                  f"{reached}/{seeds} seeds reached it within FIFO's steps; MO-ASHA ran "
                  f"{median(counts):.0f} trials (median; {median(pruned):.0f} stopped at rungs) on those steps; "
                  f"curves in {png.relative_to(REPO) if not smoke else png.name}")),
        row(7, "7b", "normalised hypervolume on FIFO's steps: MO-ASHA / FIFO (median over seeds)",
            median(asha_finals), "nHV", median(finals), f"FIFO, {trials} trials", ratio=median(asha_finals) / median(finals),
            note=(f"per seed MO-ASHA {', '.join(f'{v:.3f}' for v in asha_finals)} vs FIFO "
                  f"{', '.join(f'{v:.3f}' for v in finals)}; reference = the plain-CE baseline's validation point "
                  f"({reference[0]:.1f}, {reference[1]:.1f})")),
    ]
    return rows


if __name__ == "__main__":
    section_main(run)
