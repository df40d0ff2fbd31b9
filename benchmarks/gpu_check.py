#!/usr/bin/env python
"""GPU checks, for when a machine with CUDA is lent (CI has none; nothing here is a test). Prints figures:

  a. fp16 + grad scaler, the default method (its gradient penalty included), N steps of the real
     ``train_step``: finite losses, steps the scaler skipped, its scale, ms per step; and on the
     first batch the penalty under fp16 with and without the AMP recipe (scaled gradients,
     unscaled) against fp32: the underflow the recipe exists for
  b. bf16, the same (no scaler)
  c. four in-process trials packed on one GPU: a real sweep (``sweeps.tune.run_sweep``) with
     ``resources.gpus_per_worker: 0.25`` and concurrency 4; how many trials ran at once (from their
     MLflow runs' start and end times) and the sweep's wall time
  d. ms per step on the GPU vs the CPU, the same fp32 config and batch
  e. a pack of 16 heads (``resources.pack``, trainable/packed.py) vs the same configs trained one by
     one on the same device: time per trial

Offline throughout: the embedded MiniLM (backbone ``all-MiniLM-L6-v2``), or with ``--tiny`` a random
BERT written by ``tests/helpers.write_tiny_bert``; the toy prompts of ``tests/helpers.toy_prompts``
written to a CSV. Without CUDA it prints one line and exits 0; ``--cpu`` runs a-c and e on the CPU instead
(fp16 autocast with a CPU grad scaler) so the code paths can be checked anywhere: ~35 s with --tiny
on 2 busy CPU cores. Expected well under 5 minutes on an H200 (not yet measured on one).

    python benchmarks/gpu_check.py [--cpu] [--tiny] [--steps N] [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_smoke_assets  # noqa: E402  (also sets HF_HUB_OFFLINE, as every benchmark)


def train_fields(work: Path, tiny: bool, device: str) -> dict:
    """TrainConfig fields of every check: the default method on the toy prompts."""
    assets = make_smoke_assets(work / "assets")
    fields = {"backbone": assets["backbone"] if tiny else "all-MiniLM-L6-v2", "cache_dir": assets["cache"],
              "data": {"name": assets["csv"], "max_len": 32}, "device": device, "batch_size": 64}
    if tiny:
        fields |= {"teacher": {"epochs": 1, "lr": 1e-3}, "head_hidden": 32}
    return fields


def config(fields: dict, **over):
    from trainable.config import TrainConfig, build_config, deep_merge

    return build_config(TrainConfig, deep_merge(fields, over))


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(cfg, art, device: str, steps: int, warmup: int = 0) -> dict:
    """``steps`` real train_steps on the loop's batches, from a fresh head; what each step returned,
    the scaler's scale after it, and its wall time (after ``warmup`` untimed steps)."""
    import torch

    from trainable import backbone as bb
    from trainable.loop import batch_indices, train_step

    train = {k: v.to(device) for k, v in art.inputs["train"].items()}
    y_train, z_t_train = art.labels["train"].to(device), art.teacher["train"].to(device)
    torch.manual_seed(cfg.seed)
    student = bb.build_student(cfg.head, cfg.head_hidden, train["features"].shape[1], art.splits.num_classes,
                               None, cfg.lora_rank).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device, enabled=cfg.precision == "fp16")
    out = {"losses": [], "scales": [], "seconds": []}
    for step in range(warmup + steps):
        idx = batch_indices(len(y_train), cfg.batch_size, cfg.seed, step)
        batch, y, z_t = {k: v[idx] for k, v in train.items()}, y_train[idx], z_t_train[idx]
        sync(device)
        start = time.perf_counter()
        losses = train_step(cfg, student, opt, scaler, batch, y, z_t, step)
        sync(device)
        if step >= warmup:
            out["seconds"].append(time.perf_counter() - start)
            out["losses"].append(losses)
            out["scales"].append(scaler.get_scale() if scaler.is_enabled() else 1.0)
    return out


def penalty_underflow(cfg, art, device: str) -> dict[str, float]:
    """||grad_theta L_NR||^2 (L_NR at alpha = 1: clean CE) on the first batch at theta_0: in fp32, in
    fp16 unscaled, and in fp16 scaled by GradScaler's initial factor then unscaled (train_step's recipe)."""
    import torch

    from trainable import backbone as bb
    from trainable.losses import gradient_penalty, noise_robust_loss

    x = art.inputs["train"]["features"][: cfg.batch_size].to(device)
    y = art.labels["train"][: cfg.batch_size].to(device)
    torch.manual_seed(cfg.seed)
    student = bb.build_student(cfg.head, cfg.head_hidden, x.shape[1], art.splits.num_classes, None,
                               cfg.lora_rank).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    scale = torch.amp.GradScaler(device).get_scale()

    def penalty(fp16: bool, s: float) -> float:
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=fp16):
            z = student.classify(x, {"features": x}, "features")
            l_nr = noise_robust_loss(z, z, y, 1.0)
            return gradient_penalty(l_nr, params, s).item()

    return {"fp32": penalty(False, 1.0), "fp16_unscaled": penalty(True, 1.0), "fp16_scaled": penalty(True, scale),
            "scale": scale}


def check_precision(key: str, fields: dict, art, device: str, precision: str, steps: int) -> None:
    cfg = config(fields, precision=precision)
    res = run_steps(cfg, art, device, steps)
    finite = sum(all(math.isfinite(v) for k, v in step.items() if k != "grad_norm") for step in res["losses"])
    skipped = sum(not math.isfinite(step["l_reg"]) for step in res["losses"])
    last = res["losses"][-1]
    scaler = (f"steps the scaler skipped (its scaled penalty overflowed) {skipped}; scale after step 1 "
              f"{res['scales'][0]:g}, after step {steps} {res['scales'][-1]:g}; ") if precision == "fp16" else ""
    print(f"{key}. {precision}{' + grad scaler' if precision == 'fp16' else ' (no scaler)'}, method {cfg.method} "
          f"(lambda_reg {cfg.lambda_reg}, {cfg.perturb.kind}-{cfg.perturb.steps}), {steps} steps on {device}: "
          f"every term finite in {finite}/{steps} steps; {scaler}{1e3 * statistics.median(res['seconds']):.2f} ms/step "
          f"median; last loss {last['loss']:.4f} (l_reg {last['l_reg']:.3g})", flush=True)
    if precision == "fp16":
        pen = penalty_underflow(cfg, art, device)
        rel = {k: abs(pen[k] - pen["fp32"]) / pen["fp32"] for k in ("fp16_unscaled", "fp16_scaled")}
        print(f"   penalty ||grad L_NR||^2 on batch 0: fp32 {pen['fp32']:.6g}; "
              f"fp16 unscaled {pen['fp16_unscaled']:.6g} "
              f"(rel. err {rel['fp16_unscaled']:.2e}); fp16 scaled by {pen['scale']:g} then unscaled "
              f"{pen['fp16_scaled']:.6g} (rel. err {rel['fp16_scaled']:.2e})", flush=True)


def max_at_once(intervals: list[tuple[int, int]]) -> int:
    """The most intervals (start, end) open at one time."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts before a start
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def check_packed_sweep(fields: dict, work: Path, device: str) -> None:
    import yaml
    from mlflow import MlflowClient

    from sweeps.spec import load_spec
    from sweeps.tune import run_sweep

    per_trial = {"gpus_per_worker": 0.25} if device == "cuda" else {"cpus_per_worker": 0.5}
    spec_path = work / "packed.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "gpu-packed", "trials": 4, "concurrency": 4,
        "objectives": [{"metric": "kd_alignment", "mode": "max"}, {"metric": "noise_robustness", "mode": "max"}],
        "sampler": {"kind": "random", "seed": 0},
        "train": {**fields, "budget_steps": 100, "log_every": 25},
        "space": {"epsilon": {"kind": "uniform", "low": 0.0, "high": 0.2},
                  "alpha": {"kind": "uniform", "low": 0.2, "high": 1.0}},
        "resources": per_trial,
        "reference": [0.0, 0.0],  # no plain-CE baseline run: only the packing is measured
        "max_failures": 0,
    }))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    start = time.monotonic()
    result = run_sweep(load_spec(spec_path), uri, storage=str(work / "runs"))
    wall = time.monotonic() - start
    mc = MlflowClient(uri)
    exp = mc.get_experiment_by_name("gpu-packed")
    runs = [r for r in mc.search_runs([exp.experiment_id], max_results=100)
            if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("role") != "baseline"]
    spans = [(r.info.start_time, r.info.end_time) for r in runs if r.info.end_time]
    trial_s = sorted((e - s) / 1e3 for s, e in spans)
    print(f"c. 4 trials, resources {per_trial}, concurrency 4, 100 steps each on {device}: finished {result.finished}, "
          f"failed {result.failed}; at most {max_at_once(spans)} ran at once; sweep wall {wall:.1f} s "
          f"(Ray start and shared artifacts included), trials {', '.join(f'{s:.1f}' for s in trial_s)} s", flush=True)


def check_pack(fields: dict, art, device: str, steps: int, size: int = 16) -> None:
    """A pack of ``size`` heads (trainable/packed.py) against the same configs trained alone, on one device."""
    import random

    from benchmarks.packed import random_knobs
    from trainable.loop import train_loop
    from trainable.packed import Member, train_packed

    rng = random.Random(0)
    configs = [config(fields, device=device, budget_steps=steps, checkpoint_every=steps, seed=i, **random_knobs(rng))
               for i in range(size)]
    noop = lambda metrics, checkpoint=None: None  # noqa: E731
    solo_n = 4  # solo time per trial from a few of them
    sync(device)
    t = time.perf_counter()
    for cfg in configs[:solo_n]:
        train_loop(cfg, noop, artifacts=art)
    sync(device)
    solo = (time.perf_counter() - t) / solo_n
    t = time.perf_counter()
    outcome = train_packed([Member(c, noop, name=f"m{i}") for i, c in enumerate(configs)], art)
    sync(device)
    packed = (time.perf_counter() - t) / size
    failed = sum(isinstance(o, BaseException) for o in outcome)
    print(f"e. a pack of {size} heads vs alone, {steps} steps each on {device}: {1e3 * packed:.0f} ms per trial packed, "
          f"{1e3 * solo:.0f} ms alone ({solo / packed:.2f}x trials per second); {failed} members failed", flush=True)


def check_step_time(fields: dict, art, steps: int) -> None:
    import torch

    times = {}
    for device in ("cuda", "cpu"):
        res = run_steps(config(fields, device=device), art, device, steps, warmup=5)
        times[device] = statistics.median(res["seconds"])
    print(f"d. fp32 default method, batch {fields['batch_size']}, ms/step median of {steps}: cuda "
          f"{1e3 * times['cuda']:.2f}, cpu ({torch.get_num_threads()} threads) {1e3 * times['cpu']:.2f}: "
          f"the GPU step is {times['cpu'] / times['cuda']:.2f}x faster", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run a-c and e on the CPU (no GPU needed): checks the code paths")
    ap.add_argument("--tiny", action="store_true", help="a random tiny BERT instead of the embedded MiniLM")
    ap.add_argument("--steps", type=int, default=50, help="train steps of checks a, b and d")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    args = ap.parse_args()

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--cpu runs the checks' code paths on the CPU)")
        return 0
    device = "cpu" if args.cpu else "cuda"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="alignsweep-gpu-check-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from trainable.loop import prepare_artifacts

        fields = train_fields(work, args.tiny, device)
        where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(f"gpu_check on {where}, torch {torch.__version__}, backbone "
              f"{'tiny random BERT' if args.tiny else 'all-MiniLM-L6-v2'}", flush=True)
        art = prepare_artifacts(config(fields), device)
        check_precision("a", fields, art, device, "fp16", args.steps)
        check_precision("b", fields, art, device, "bf16", args.steps)
        check_packed_sweep(fields, work, device)
        if device == "cuda":
            check_step_time(fields, art, args.steps)
        else:
            print("d. skipped: GPU vs CPU step time needs a GPU", flush=True)
        check_pack(fields, art, device, 2 * args.steps)
    print(f"total wall {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
