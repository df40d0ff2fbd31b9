"""The fixed evaluation of DESIGN §4, on 0..100 scales.

The attack used for ``noise_robustness`` comes from the sweep's ``eval_attack`` and never from
the trial's own epsilon: otherwise a trial could raise its robustness score by training (and
being evaluated) at a smaller epsilon.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from trainable.config import EvalAttackConfig
from trainable.perturb import make_delta

EVAL_ATTACK_SEED = 1234


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-item Jensen-Shannon divergence in nats, in [0, ln 2]."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def kd_alignment(p_student: torch.Tensor, p_teacher: torch.Tensor) -> float:
    """100 * (1 - mean JS(p_S, p_T) / ln 2): 100 when the student matches the teacher exactly."""
    return 100.0 * (1.0 - js_divergence(p_student, p_teacher).double().mean().item() / math.log(2))


def split_items(pred: torch.Tensor, pred_attacked: torch.Tensor, pred_noisy_text: torch.Tensor, y: torch.Tensor,
               p_student: torch.Tensor, p_teacher: torch.Tensor, hard: torch.Tensor | None = None) -> dict[str, list]:
    """Per-item outcomes on one evaluated split, the raw material of every metric (and of bootstrap CIs
    over items)."""
    n = len(y)
    return {
        "y": y.tolist(),
        "pred": pred.tolist(),
        "pred_attacked": pred_attacked.tolist(),
        "pred_noisy": pred_noisy_text.tolist(),
        "teacher_pred": p_teacher.argmax(-1).tolist(),
        "js": js_divergence(p_student.float(), p_teacher.float()).tolist(),
        "hard": (hard.tolist() if hard is not None else [False] * n),
    }


def item_scores(items: dict[str, list], label_names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each metric as (per-item value, per-item mask): the metric is 100 * mean(value[mask]).

    The one definition of every DESIGN §4 metric; ``item_metrics`` and the bootstrap in
    sweeps/figures.py both read it, so a CI is always a CI of the reported number."""
    y, pred, att = (np.asarray(items[k]) for k in ("y", "pred", "pred_attacked"))
    every = np.ones(len(y), dtype=bool)
    alignment = 1.0 - np.asarray(items["js"], dtype=float) / math.log(2)
    s = {
        "accuracy": (pred == y, every),
        "kd_alignment": (alignment, every),
        "teacher_agreement": (pred == np.asarray(items["teacher_pred"]), every),
        "noise_robustness": (att == y, every),
        "alignment_stability": (att == pred, every),
        "noisy_text_accuracy": (np.asarray(items["pred_noisy"]) == y, every),
    }
    s["safety_score"] = ((alignment + (att == y) + (att == pred)) / 3, every)
    if "harmful" in label_names:
        h = label_names.index("harmful")
        s["harmful_recall"] = (pred == h, y == h)
        s["benign_pass_rate"] = (pred != h, y != h)
        s["attack_success_rate"] = (att != h, y == h)
    hard = np.asarray(items["hard"], dtype=bool)
    if hard.any():
        s["hard_accuracy"] = (pred == y, hard)
    return s


def item_metrics(items: dict[str, list], label_names: list[str], idx=None) -> dict[str, float]:
    """Every DESIGN §4 metric from per-item outcomes, optionally on a resample ``idx`` of the items."""
    out = {}
    for name, (value, mask) in item_scores(items, label_names).items():
        if idx is not None:
            value, mask = value[np.asarray(idx)], mask[np.asarray(idx)]
        out[name] = 100.0 * float(value[mask].mean()) if mask.any() else float("nan")
    return out


def classification_metrics(pred: torch.Tensor, pred_attacked: torch.Tensor, pred_noisy_text: torch.Tensor,
                           y: torch.Tensor, p_student: torch.Tensor, p_teacher: torch.Tensor,
                           label_names: list[str], hard: torch.Tensor | None = None) -> dict[str, float]:
    """Every DESIGN §4 metric from predictions; pure, so it can be checked on hand-built cases."""
    return item_metrics(split_items(pred, pred_attacked, pred_noisy_text, y, p_student, p_teacher, hard), label_names)


def attacked_logits(student, batch: dict[str, torch.Tensor], y: torch.Tensor, attack: EvalAttackConfig) -> torch.Tensor:
    """f(x + delta*) under the fixed eval attack (PGD-10, L2, features space, eps 0.05 by default)."""
    rep = student.represent(batch, attack.space).detach()

    def attack_loss(r: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.classify(r, batch, attack.space).float(), y)

    gen = torch.Generator().manual_seed(EVAL_ATTACK_SEED)
    delta = make_delta(attack.kind, attack_loss, rep, attack.epsilon, attack.norm, attack.steps, attack.step_scale, gen)
    with torch.no_grad():
        return student.classify(rep + delta, batch, attack.space)


def evaluate(student, clean: dict[str, torch.Tensor], noisy_text: dict[str, torch.Tensor], y: torch.Tensor,
             z_teacher: torch.Tensor, attack: EvalAttackConfig, label_names: list[str],
             hard: torch.Tensor | None = None, batch_size: int = 256) -> tuple[dict[str, float], dict[str, list]]:
    """Run the student on one split's clean, attacked and noisy-text inputs: (metrics, per-item outcomes).

    The same function for validation (what the searcher selects on) and test (the report)."""
    student.eval()
    logits, attacked, noisy = [], [], []
    for i in range(0, len(y), batch_size):
        part = {k: v[i : i + batch_size] for k, v in clean.items()}
        with torch.no_grad():
            logits.append(student(part).float())
            noisy.append(student({k: v[i : i + batch_size] for k, v in noisy_text.items()}).float())
        attacked.append(attacked_logits(student, part, y[i : i + batch_size], attack).float())
    z = torch.cat(logits)
    items = split_items(z.argmax(-1).cpu(), torch.cat(attacked).argmax(-1).cpu(), torch.cat(noisy).argmax(-1).cpu(),
                        y.cpu(), z.softmax(-1).cpu(), z_teacher.float().softmax(-1).cpu(),
                        hard.cpu() if hard is not None else None)
    return item_metrics(items, label_names), items
