"""1. Step cost: one optimizer step of the full method vs one plain-CE step, same head, same batch.

The step is ``trainable.loop.train_step``, the one train_loop runs (represent -> classify -> delta
-> f(x+delta) -> unified_loss -> finite check -> backward -> clip -> AdamW), on one fixed batch;
the baseline is the same step with ``method=ce`` (w=0, alpha=1, lambda=0). Blocks of
steps of every configuration are interleaved round by round and the median block is kept, so
a burst of load on the machine hits all configurations alike. One thread (a Tune trial gets
OMP_NUM_THREADS=1 from Ray). A last row checks train_step on a fixed batch against the whole train_loop:
per-step time from the difference of two budgets, full default config vs method=ce.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Row, log, median, noop_report, row, section_main, train_config

FLOOR = 3.3  # the exact double-backprop floor, in plain-CE steps


def make_step(cfg, student, batch, y, z_t):
    """A closure running optimizer step ``i`` of the product's ``train_step`` on one fixed batch."""
    import torch

    from trainable.loop import train_step

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return lambda i: train_step(cfg, student, opt, scaler, batch, y, z_t, i)


def time_interleaved(steps: dict[str, callable], per_block: int, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each closure, blocks interleaved round by round."""
    for fn in steps.values():
        for i in range(warmup):
            fn(i)
    blocks: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for name, fn in steps.items():
            t = time.perf_counter()
            for i in range(per_block):
                fn(warmup + r * per_block + i)
            blocks[name].append((time.perf_counter() - t) / per_block)
    return {k: median(v) for k, v in blocks.items()}


def run(smoke: bool, work: Path) -> list[Row]:
    import torch

    from trainable import backbone as bb
    from trainable.loop import batch_indices, prepare_artifacts, train_loop

    torch.set_num_threads(1)
    base = train_config(smoke, work)
    art = prepare_artifacts(base)
    idx = batch_indices(len(art.labels["train"]), base.batch_size, base.seed, 0)
    feats = art.inputs["train"]["features"][idx]
    y, z_t = art.labels["train"][idx], art.teacher["train"][idx]
    in_dim, n_cls = feats.shape[1], art.splits.num_classes
    batch = {"features": feats}

    variants: dict[str, dict] = {}
    for head in ("linear", "mlp"):
        variants[f"{head}|ce"] = {"head": head, "method": "ce"}
        variants[f"{head}|floor"] = {"head": head, "method": "ckt_ro", "distill_weight": 0.0, "alpha": 1.0,
                                     "lambda_reg": 0.01}
        for kind in ("fgsm", "pgd"):
            for lam in (0.01, 0.0):
                variants[f"{head}|{kind}|{'reg' if lam else 'noreg'}"] = {
                    "head": head, "method": "ckt_ro", "lambda_reg": lam, "perturb": {"kind": kind, "steps": 3}}
    steps = {}
    for name, over in variants.items():
        cfg = train_config(smoke, work, **over)
        torch.manual_seed(0)
        student = bb.build_student(cfg.head, cfg.head_hidden, in_dim, n_cls, None, cfg.lora_rank)
        steps[name] = make_step(cfg, student, batch, y, z_t)
    per_block, rounds = (5, 2) if smoke else (60, 7)
    log(f"features-space steps: {len(steps)} configurations x {rounds} rounds x {per_block} steps")
    t = time_interleaved(steps, per_block, rounds, warmup=2 if smoke else 10)

    rows: list[Row] = []
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    keys: dict[str, str] = {}
    for head in ("linear", "mlp"):
        ce = t[f"{head}|ce"]
        for kind in ("fgsm", "pgd"):
            for reg in ("reg", "noreg"):
                v = t[f"{head}|{kind}|{reg}"]
                keys[f"{head}|{kind}|{reg}"] = key = f"1{next(letters)}"
                label = f"{head}, {'FGSM' if kind == 'fgsm' else 'PGD-3'}, {'+L_Reg' if reg == 'reg' else 'no L_Reg'}"
                rows.append(row(1, key, f"features step: full method ({label}) / CE step", v * 1e3, "ms",
                                ce * 1e3, f"CE step, {head}", target=f"floor ~{FLOOR}x" if reg == "reg" else "",
                                note=f"{v / ce / FLOOR:.2f}x the {FLOOR}x floor" if reg == "reg" else ""))
        fl = t[f"{head}|floor"]
        rows.append(row(1, f"1{next(letters)}", f"features step: CE + L_Reg only (double backprop, {head}) / CE step",
                        fl * 1e3, "ms", ce * 1e3, f"CE step, {head}", target=f"floor ~{FLOOR}x",
                        note="the double-backprop floor as measured here (no KD, no attack)"))

    # One embeddings-space step: the backbone runs in the loop (PGD-3 on token embeddings).
    eb = 4 if smoke else 16
    emb_over = {"head": "mlp", "perturb": {"space": "embeddings", "kind": "pgd", "steps": 3}}
    cfg_e = train_config(smoke, work, **emb_over)
    art_e = prepare_artifacts(cfg_e)
    idx_e = idx[:eb]
    batch_e = {k: v[idx_e] for k, v in art_e.inputs["train"].items()}
    _, model = bb.load_backbone(cfg_e.backbone)
    e_steps = {}
    for name, over in {"full": emb_over, "ce": {**emb_over, "method": "ce"}}.items():
        cfg = train_config(smoke, work, **over)
        torch.manual_seed(0)
        student = bb.build_student("mlp", cfg.head_hidden, in_dim, n_cls, bb.Encoder(model, cfg.pooling), cfg.lora_rank)
        e_steps[name] = make_step(cfg, student, batch_e, art_e.labels["train"][idx_e], art_e.teacher["train"][idx_e])
    log(f"embeddings-space step, batch {eb}")
    te = time_interleaved(e_steps, per_block=1, rounds=1 if smoke else 3, warmup=1)
    rows.append(row(1, f"1{next(letters)}", f"embeddings step (backbone in loop, MLP, PGD-3, +L_Reg, batch {eb}) / CE step",
                    te["full"] * 1e3, "ms", te["ce"] * 1e3, "CE step, embeddings, same batch",
                    note=f"{'tiny random BERT' if smoke else 'all-MiniLM-L6-v2'}, max_len {cfg_e.data.max_len}; "
                         f"{te['full'] / te['ce'] / FLOOR:.2f}x the {FLOOR}x floor"))

    # train_step on a fixed batch against the whole loop: per-step seconds from two budgets of train_loop.
    lo, hi = (4, 24) if smoke else (20, 220)
    per = {"full": [], "ce": []}
    for _ in range(1 if smoke else 3):
        for name, over in {"full": {}, "ce": {"method": "ce"}}.items():
            ts = []
            for budget in (lo, hi):
                cfg = train_config(smoke, work, budget_steps=budget, log_every=10_000, **over)
                t0 = time.perf_counter()
                train_loop(cfg, noop_report, artifacts=art)
                ts.append(time.perf_counter() - t0)
            per[name].append((ts[1] - ts[0]) / (hi - lo))
    full_loop, ce_loop = median(per["full"]), median(per["ce"])
    micro = t["mlp|pgd|reg"]
    rows.append(row(1, f"1{next(letters)}", "train_loop per step: default full method (MLP, PGD-3, +L_Reg) / method=ce",
                    full_loop * 1e3, "ms", ce_loop * 1e3, "train_loop per step, method=ce", target=f"floor ~{FLOOR}x",
                    note=f"per-step time from the difference of budgets {lo} and {hi}; train_loop's full step is "
                         f"{full_loop / micro:.2f}x train_step on a fixed batch, row {keys['mlp|pgd|reg']} ({micro * 1e3:.2f} ms): "
                         "batch sampling and indexing per step are the difference"))
    return rows


if __name__ == "__main__":
    section_main(run)
