"""8. Packed trials (issue 15): trials per CPU-second with ``resources.pack`` vs unpacked, through run_sweep.

Every run is ``sweeps.tune.run_sweep`` on the built-in ``pareto`` spec (multi-objective TPE over its
knobs) with ``budget_steps`` fixed (100, then 400; the searched budget dimension is dropped), the
same number of trials, local Ray, MLflow on sqlite and Tune storage in a temp dir, the shared
artifacts already in the cache (run_all prepares them first). The hypervolume reference is fixed
for every run (the plain-CE baseline's validation point, measured once here), so no run pays for a
baseline and every hypervolume is on the same box.

- unpacked: ``resources.pack: 1``, concurrency 2 (one in-process trial per core of this machine);
- packed P (8, 16, 32): ``resources.pack: P``, concurrency P: one pack runner (1 CPU) trains the P
  trials in flight as one vectorised program; each trial is still a Tune trial that relays its
  member's reports to MLflow and Tune (sweeps/packing.py).

Rows 8a-8b first take the service away: the trainer alone, one thread, CPU time per trial of a
pack of 16 (``train_packed``) against the same 16 configs trained one by one (``train_loop``), for
the default head and for a linear head: what vectorising buys before any service cost. Between
them, the ceiling: a default trial's FLOPs (``FlopCounterMode``) at this core's fp32 matmul rate,
the least CPU a trial can cost however it is packed, so solo / floor bounds every packed ratio here.

CPU-seconds = the driver process's own CPU time + the last-seen CPU time of every descendant
(Ray's system processes, trial actors, the pack runner), sampled each second from a separate
process (``benchmarks.scale.sample_cpu``). Figure: trials per CPU-second, packed / unpacked at the
same budget (rows 8c-8h, the default MLP head, hidden 256; target >= 5x at pack 16; row 8i: a
linear head at pack 16, where a step is mostly Python overhead rather than FLOPs). Beside it:
each run's wall time, and its final normalised validation hypervolume; row 8j compares the hypervolume of unpacked and pack 16 over
three sampler seeds at 100 steps (medians, with each side's range), which must agree within the
seeds' spread. Packing changes the search too: 16 trials in flight instead of 2 means TPE's
constant liar sees 16 pending points when it suggests.

``--smoke``: 6 trials of 8 steps on the tiny model, unpacked vs pack 2 (the code path, not the figure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO, Row, base_train, log, median, row, run_clean, section_or_child_main

TARGET = 5.0
"""Trials per CPU-second at pack 16 / unpacked (issue 15)."""


def spec_dict(smoke: bool, work: Path, name: str, trials: int, steps: int, pack: int, seed: int,
              reference: list[float], head: dict | None = None) -> dict:
    from trainable.config import deep_merge

    spec = yaml.safe_load((REPO / "sweeps" / "specs" / "pareto.yaml").read_text())
    concurrency = 2 if pack == 1 else pack
    spec.update(name=name, trials=trials, concurrency=concurrency, reference=reference,
                resources={"pack": pack}, sampler={**spec.get("sampler", {}), "seed": seed})
    spec["train"] = deep_merge(deep_merge(spec.get("train", {}), base_train(smoke, work)), head or {})
    spec["space"].pop("budget_steps")
    spec["train"]["budget_steps"] = steps
    spec["train"]["checkpoint_every"] = steps
    return spec


def child(spec_path: Path, out: Path, work: Path) -> None:
    """One run_sweep, its CPU time over the whole process tree sampled from outside the driver."""
    import psutil

    import mlflow  # noqa: F401  (imports before the clock)
    import ray  # noqa: F401

    from sweeps.spec import load_spec
    from sweeps.tune import run_sweep

    me, samples = psutil.Process(), out.with_suffix(".cpu.json")
    sampler = subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--sample", str(os.getpid()), "--out",
                                str(samples)])
    try:
        spec = load_spec(spec_path)
        t_driver, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
        result = run_sweep(spec, f"sqlite:///{work / (spec.name + '.db')}", storage=str(work / "runs"))
        wall, driver = time.perf_counter() - t0, sum(me.cpu_times()[:2]) - t_driver
        samples.with_suffix(".stop").touch()
        sampler.wait(timeout=60)
        others = sum(c for _, c in json.loads(samples.read_text()))
    finally:
        if sampler.poll() is None:
            sampler.kill()
    out.write_text(json.dumps({"wall": wall, "cpu": driver + others, "driver_cpu": driver,
                               "finished": result.finished, "failed": result.failed,
                               "hv": result.hypervolume_normalised}))


def measure(smoke: bool, work: Path, trials: int, steps: int, pack: int, seed: int, reference: list[float],
            head: dict | None = None) -> dict:
    name = f"bench-pack{pack}-s{steps}-seed{seed}" + "".join(f"-{v}" for v in (head or {}).values())
    spec_path = work / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(smoke, work, name, trials, steps, pack, seed, reference, head)))
    out = work / f"{name}.json"
    log(f"{name}: {trials} trials of {steps} steps, pack {pack}")
    rc = run_clean([sys.executable, "-m", "benchmarks.packed", "--child", str(spec_path), "--work", str(work),
                    "--out", str(out)], work / f"{name}.log", timeout=3000)
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}: " + (work / f"{name}.log").read_text()[-3000:])
    res = json.loads(out.read_text())
    if res["finished"] != trials:
        raise RuntimeError(f"{name}: {res['finished']} of {trials} trials finished ({res['failed']} failed)")
    res["per_cpu_s"] = trials / res["cpu"]
    return res


def baseline_reference(smoke: bool, work: Path, steps: int) -> list[float]:
    """The plain-CE baseline's validation point at ``steps``: every run's hypervolume reference."""
    from benchmarks.common import noop_report, train_config
    from trainable.loop import train_loop

    final = train_loop(train_config(smoke, work, method="ce", budget_steps=steps), noop_report)
    return [final["kd_alignment"], final["noise_robustness"]]


def random_knobs(rng) -> dict:
    """The pareto space's four searched scalars, drawn at random: every loss term switched on."""
    return {"distill_weight": rng.uniform(0.1, 5), "epsilon": rng.uniform(0, 0.2), "alpha": rng.random(),
            "lambda_reg": 10 ** rng.uniform(-4, 0)}


def trainer_only(smoke: bool, work: Path, steps: int, size: int,
                 head: dict | None = None) -> tuple[float, float, str, float]:
    """CPU seconds per trial of the trainer alone, one thread: (``size`` members in one
    ``train_packed``, the same configs by ``train_loop`` one at a time, the head, one trial's FLOPs),
    on the cached artifacts, after one untimed run of each (first-call set-up). The FLOPs are
    counted by ``FlopCounterMode`` over that untimed solo run, training and evaluation."""
    import random

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import noop_report, train_config
    from trainable.loop import prepare_artifacts, train_loop
    from trainable.packed import Member, train_packed

    torch.set_num_threads(1)
    rng = random.Random(0)
    configs = [train_config(smoke, work, budget_steps=steps, checkpoint_every=steps, seed=i, **random_knobs(rng),
                            **(head or {})) for i in range(size)]
    art = prepare_artifacts(configs[0])
    with FlopCounterMode(display=False) as counter:
        train_loop(configs[0], noop_report, artifacts=art)
    train_packed([Member(configs[0], noop_report)], art)
    t = time.process_time()
    for cfg in configs:
        train_loop(cfg, noop_report, artifacts=art)
    solo = (time.process_time() - t) / size
    t = time.process_time()
    train_packed([Member(c, noop_report, name=f"m{i}") for i, c in enumerate(configs)], art)
    c = configs[0]
    what = f"{c.head} head" + (f", hidden {c.head_hidden}" if c.head == "mlp" else "")
    return (time.process_time() - t) / size, solo, what, counter.get_total_flops()


def matmul_rate() -> float:
    """This core's fp32 matmul rate, one thread, in FLOP per CPU-second, on a product far larger
    than any of a trial's (the rate is the same at the head's own shapes, batched or not)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 384), torch.randn(384, 4096)
    for _ in range(3):
        a @ b
    reps, t = 20, time.process_time()
    for _ in range(reps):
        a @ b
    return reps * 2 * 1024 * 384 * 4096 / (time.process_time() - t)


def run(smoke: bool, work: Path) -> list[Row]:
    trials, budgets, packs, seeds = (6, (8,), (2,), (0,)) if smoke else (32, (100, 400), (8, 16, 32), (0, 1, 2))
    aimed = 2 if smoke else 16  # the pack the target and the hypervolume comparison are about
    rows, keys = [], iter("abcdefghijklmnop")
    for head in [None] + ([] if smoke else [{"head": "linear"}]):
        packed, solo, what, flops = trainer_only(smoke, work, budgets[0], aimed, head)
        rows.append(row(8, f"8{next(keys)}", f"the trainer alone: trials per CPU-second, a pack of {aimed} / the same "
                        f"{aimed} configs one by one ({budgets[0]} steps, {what}, one thread, no service)", 1 / packed,
                        "trials/CPU-s", 1 / solo, "train_loop, one at a time",
                        note=f"{1e3 * packed:.0f} ms vs {1e3 * solo:.0f} ms of CPU per trial"))
        if head is None:  # the default head: how far any pack could go on this core. Packing changes how
            # a trial's work is issued, never how much there is: no trial costs less than its FLOPs at this rate
            rate = matmul_rate()
            floor = flops / rate
            rows.append(row(8, f"8{next(keys)}", f"the ceiling on this core: trials per CPU-second if every FLOP of a "
                            f"trial ran at this core's fp32 matmul rate / the same configs one by one ({what})",
                            1 / floor, "trials/CPU-s", 1 / solo, "train_loop, one at a time",
                            target="" if smoke else f">= {TARGET:g}x for the target to be reachable",
                            met=None if smoke else solo / floor >= TARGET,
                            note=f"{flops / 1e9:.3g} GFLOP per trial at {rate / 1e9:.0f} GFLOP/s = {1e3 * floor:.0f} "
                                 f"ms of CPU, against {1e3 * solo:.0f} ms one by one and {1e3 * packed:.0f} ms packed"))
    references = {steps: baseline_reference(smoke, work, steps) for steps in budgets}
    hv: dict[int, list[float]] = {1: [], aimed: []}

    def compare(steps: int, pack: int, solo: dict, head: dict | None = None, what: str = "") -> dict:
        res = measure(smoke, work, trials, steps, pack, 0, references[steps], head)
        ratio = res["per_cpu_s"] / solo["per_cpu_s"]
        target = pack == aimed and not smoke and head is None
        rows.append(row(8, f"8{next(keys)}", f"trials per CPU-second, pack {pack} / unpacked ({trials} trials of the "
                        f"pareto space, {steps} steps{what})", res["per_cpu_s"], "trials/CPU-s", solo["per_cpu_s"],
                        "unpacked, concurrency 2", ratio=ratio, target=f">= {TARGET:g}x" if target else "",
                        met=ratio >= TARGET if target else None,
                        note=f"CPU {res['cpu']:.0f} s (driver {res['driver_cpu']:.0f} s) vs {solo['cpu']:.0f} s "
                             f"(driver {solo['driver_cpu']:.0f} s); wall {res['wall']:.0f} s vs {solo['wall']:.0f} s; "
                             f"normalised validation hypervolume {res['hv']:.3f} vs {solo['hv']:.3f}"))
        return res

    for steps in budgets:  # the default head: MLP, hidden 256
        solo = measure(smoke, work, trials, steps, 1, 0, references[steps])
        for pack in packs:
            res = compare(steps, pack, solo)
            if steps == budgets[0] and pack == aimed:
                hv[1].append(solo["hv"])
                hv[aimed].append(res["hv"])
    if not smoke:  # where a head's step is mostly Python overhead rather than FLOPs: a linear head
        linear = {"head": "linear"}
        solo = measure(smoke, work, trials, budgets[0], 1, 0, references[budgets[0]], linear)
        compare(budgets[0], aimed, solo, linear, ", linear head")
        for seed in seeds[1:]:  # the other seeds at the first budget, for the hypervolume's spread
            for pack in (1, aimed):
                hv[pack].append(measure(smoke, work, trials, budgets[0], pack, seed, references[budgets[0]])["hv"])
    a, b = hv[aimed], hv[1]
    overlap = min(a) <= max(b) and min(b) <= max(a)
    rows.append(row(8, f"8{next(keys)}", f"normalised validation hypervolume after {trials} trials, pack {aimed} / "
                    f"unpacked (median over {len(a)} sampler seeds, {budgets[0]} steps)", median(a), "nHV", median(b),
                    "unpacked, concurrency 2", target="" if smoke else "within the seeds' spread",
                    met=None if smoke else overlap,
                    note=f"pack {aimed}: {', '.join(f'{v:.3f}' for v in a)}; unpacked: "
                         f"{', '.join(f'{v:.3f}' for v in b)}"))
    return rows

if __name__ == "__main__":
    section_or_child_main(run, child)
