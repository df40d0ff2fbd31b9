"""4. Search efficiency: hypervolume vs trials for TPE, NSGA-II, GP and random (several seeds),
against the hypervolume of a dense grid over the same space.

The objective is real training, kept cheap: ``train_loop`` on the shared cached features
(default config: MiniLM features of `safety`, MLP head, PGD-3 L2 training, fp32, seed 0) at a
small fixed ``budget_steps``, returning (kd_alignment, noise_robustness), both maximised; the
hypervolume is ``sweeps.pareto.hypervolume`` with the sweeps' default reference (0, 0). The
space is the built-in ``pareto`` spec's four continuous knobs (distill_weight log [0.05, 10],
epsilon [0, 0.2], alpha [0, 1], lambda_reg log [1e-4, 1]); precision and budget are fixed.
Samplers are built by the product's ``sweeps.searcher.make_sampler`` for a 32-trial, concurrency-2
spec (TPE: multivariate + constant liar, 10 startup trials; NSGA-II: population 4) and run in a
plain Optuna loop, one trial at a time. The grid takes ``levels`` values per knob (log-spaced
for log knobs). Evaluations run in 2 processes, one torch thread each.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import REPO, Row, base_train, log, median, row, section_main

SAMPLERS = ("tpe", "nsga2", "gp", "random")
NAMES = {"tpe": "TPE (the sweeps' default)", "nsga2": "NSGA-II", "gp": "GP", "random": "random"}
_STATE: dict = {}


def search_spec(smoke: bool, work: Path, kind: str, seed: int, trials: int, budget: int):
    from sweeps.spec import SweepSpec
    from trainable.config import build_config, deep_merge

    spec = yaml.safe_load((REPO / "sweeps" / "specs" / "pareto.yaml").read_text())
    for fixed in ("precision", "budget_steps"):
        spec["space"].pop(fixed)
    spec.update(name="bench-search", trials=trials, concurrency=2, sampler={"kind": kind, "seed": seed})
    spec["train"] = deep_merge(deep_merge(spec["train"], base_train(smoke, work)),
                               {"budget_steps": budget, "precision": "fp32", "checkpoint_every": 0, "log_every": 10_000})
    return build_config(SweepSpec, spec)


def _init(smoke: bool, work: str, budget: int) -> None:
    import optuna
    import torch

    from trainable.loop import prepare_artifacts

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = search_spec(smoke, Path(work), "random", 0, 1, budget)
    _STATE.update(smoke=smoke, work=Path(work), budget=budget, spec=spec,
                  art=prepare_artifacts(spec.trial_config({})))


def _evaluate(params: dict) -> list[float]:
    from benchmarks.common import noop_report
    from sweeps.spec import nest
    from trainable.loop import train_loop

    spec = _STATE["spec"]
    final = train_loop(spec.trial_config(nest(params)), noop_report, artifacts=_STATE["art"])
    return [final[m] for m in spec.metrics]


def _study(job: tuple[str, int, int]) -> tuple[str, int, list[list[float]]]:
    import optuna

    from benchmarks.common import suggest
    from sweeps.searcher import make_sampler

    kind, seed, trials = job
    spec = search_spec(_STATE["smoke"], _STATE["work"], kind, seed, trials, _STATE["budget"])
    study = optuna.create_study(directions=["maximize"] * len(spec.metrics), sampler=make_sampler(spec))
    values: list[list[float]] = []

    def objective(trial):
        v = _evaluate({path: suggest(trial, path, d) for path, d in spec.space.items()})
        values.append(v)
        return v

    study.optimize(objective, n_trials=trials)
    return kind, seed, values


def _grid_chunk(points: list[dict]) -> list[list[float]]:
    return [_evaluate(p) for p in points]


def grid_points(spec, levels: int) -> list[dict]:
    axes = {}
    for path, d in spec.space.items():
        if d.kind == "loguniform":
            axes[path] = list(np.geomspace(d.low, d.high, levels))
        else:
            axes[path] = list(np.linspace(d.low, d.high, levels))
    return [dict(zip(axes, map(float, combo))) for combo in itertools.product(*axes.values())]


def hv(values: list[list[float]], reference: list[float]) -> float:
    from sweeps import pareto

    return pareto.hypervolume(np.asarray(values, dtype=float), ["max", "max"], reference) if values else 0.0


def run(smoke: bool, work: Path) -> list[Row]:
    from sweeps import pareto

    trials, seeds, levels, budget = (4, 2, 2, 8) if smoke else (32, 5, 4, 30)
    checkpoints = [n for n in (2, 4) if n <= trials] if smoke else [8, 16, 32]
    spec = search_spec(smoke, work, "random", 0, trials, budget)
    points = grid_points(spec, levels)
    jobs = [(k, s, trials) for k in SAMPLERS for s in range(seeds)]
    chunks = [points[i:i + 25] for i in range(0, len(points), 25)]
    log(f"{len(jobs)} sampler runs x {trials} trials + grid of {len(points)} points, budget {budget} steps, 2 processes")
    ctx = mp.get_context("spawn")
    with ctx.Pool(2, initializer=_init, initargs=(smoke, str(work), budget)) as pool:
        grid_async = pool.map_async(_grid_chunk, chunks)
        runs = pool.map(_study, jobs, chunksize=1)
        grid_values = [v for chunk in grid_async.get() for v in chunk]

    ref = pareto.default_reference(["max", "max"])
    grid_hv = hv(grid_values, ref)
    nadir = list(np.min(np.asarray(grid_values), axis=0))  # the grid's worst point: a tighter reference
    grid_hv_tight = hv(grid_values, nadir)
    by_kind: dict[str, list[list[list[float]]]] = {k: [] for k in SAMPLERS}
    for kind, _, values in runs:
        by_kind[kind].append(values)

    def curve(kind: str, n: int, reference) -> list[float]:
        return [hv(v[:n], reference) for v in by_kind[kind]]

    rand_med = median(curve("random", trials, ref))
    rows: list[Row] = []
    for key, kind in zip("abcd", SAMPLERS):
        at = {n: median(curve(kind, n, ref)) for n in checkpoints}
        final = curve(kind, trials, ref)
        tight = median(curve(kind, trials, nadir)) / grid_hv_tight if grid_hv_tight else math.nan
        reach = [next((i + 1 for i in range(len(v)) if hv(v[: i + 1], ref) >= 0.99 * grid_hv), None) for v in by_kind[kind]]
        reached = sorted(r for r in reach if r is not None)
        frac = at[trials] / grid_hv
        is_default = kind == "tpe"
        met = (frac >= 0.90 and at[trials] > rand_med) if is_default else None
        rows.append(row(4, f"4{key}", f"{NAMES[kind]}: median hypervolume after {trials} trials / dense grid's",
                        at[trials], "HV", grid_hv, f"grid, {len(points)} points ({levels}/knob)", ratio=frac,
                        target=">= 0.90 and > random's median" if is_default else "", met=met,
                        note=(f"median HV after " + ", ".join(f"{n}: {at[n] / grid_hv:.3f}" for n in checkpoints)
                              + f" of the grid's; {seeds} seeds, range {min(final) / grid_hv:.3f}-{max(final) / grid_hv:.3f}"
                              + f"; vs random's median {at[trials] / rand_med:.3f}x"
                              + f"; trials to 99% of the grid's HV: {reached[len(reached) // 2] if len(reached) * 2 > len(reach) else 'not reached'} (median), "
                              + f"{len(reached)}/{len(reach)} seeds got there"
                              + f"; with the reference at the grid's worst point ({nadir[0]:.1f}, {nadir[1]:.1f}): "
                              + f"{tight:.3f} of the grid's")))
    rows[0].note += (f". Objective: train_loop on cached features, {budget} steps, fp32, seed 0 -> (kd_alignment, "
                     f"noise_robustness), reference (0, 0); grid values span kd {min(v[0] for v in grid_values):.1f}-"
                     f"{max(v[0] for v in grid_values):.1f}, robustness {min(v[1] for v in grid_values):.1f}-"
                     f"{max(v[1] for v in grid_values):.1f}")
    return rows


if __name__ == "__main__":
    section_main(run)
