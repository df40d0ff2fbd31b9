"""The seeds' other safety-transfer methods, adapted to a head on a frozen backbone (DESIGN §3).

Each was written for LLM fine-tuning; here each is a plain stage that ``train_loop`` calls where
its method needs it, built from small pure functions in the papers' symbols:

- ``sot`` ("Safeguarding LLM Fine-tuning via Push-Pull Distributional Alignment"): per-sample
  weights w on the simplex, before training (``sot_weights``).
- ``hybrid`` ("Rethinking Deep Alignment Through The Lens Of Incomplete Learning"): adaptive KD
  weights where a base model favours the unsafe class, and a hybrid target, before training
  (``hybrid_weights``, ``hybrid_target``).
- ``enchtable`` ("Unified Safety Alignment Transfer in Fine-tuned Large Language Models"; the
  reference code is AntCPLab/EnchTable ``merge/models/enchtable.py``): a safety vector from two
  NTK-linearised heads, merged into the task head after training (``linearised_fit``,
  ``interference``, ``enchtable_merge``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import ot
import torch
from torch.func import functional_call, jvp


def joint_space(features: torch.Tensor, labels: torch.Tensor, num_classes: int, label_scale: float,
                scale_from: torch.Tensor | None = None) -> torch.Tensor:
    """z = [phi(x); c * onehot(y)], with c = ``label_scale`` times the RMS norm of ``scale_from``'s rows
    (the train features), so label_scale=1 puts a label change on the scale of a typical feature vector."""
    ref = features if scale_from is None else scale_from
    c = label_scale * ref.double().pow(2).sum(-1).mean().sqrt()
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).double()
    return torch.cat([features.double(), c * onehot], dim=1)


def sot_weights(z: torch.Tensor, z_safe: torch.Tensor, z_harm: torch.Tensor, push: float, reg: float,
                temperature: float, steps: int = 100, lr: float = 0.05) -> torch.Tensor:
    """Safety Optimal Transport weights: w* = argmin_{w in simplex}
    OT_eps(w, safe) - lambda * OT_eps(w, harmful) + tau * KL(w || uniform).

    z: the n training items in the joint (feature, label) space; z_safe: the trusted safe anchor;
    z_harm: the harmful reference (harmful prompts paired with the benign label). OT_eps is POT's
    entropic transport cost (``ot.solve``, Sinkhorn, torch backend; its gradient in w comes from the
    dual potentials, ``grad="envelope"``) between w on z and the uniform measure on each reference, with
    squared Euclidean costs divided by the mean cost to the safe anchor, so eps (``reg``) is
    relative. w = softmax(logits), logits by Adam from zero (uniform w). lambda = ``push``,
    eps = ``reg``, tau = ``temperature``. Returns w (sums to 1).
    Departs from the paper: the weights are fitted once, before training, on frozen features, not
    alternated with the LLM's updates.
    """
    n = len(z)
    cost_safe = ot.dist(z.double(), z_safe.double())
    cost_harm = ot.dist(z.double(), z_harm.double())
    unit = cost_safe.mean().clamp_min(1e-12)
    cost_safe, cost_harm = cost_safe / unit, cost_harm / unit
    b_safe = torch.full((len(z_safe),), 1.0 / len(z_safe), dtype=torch.float64)
    b_harm = torch.full((len(z_harm),), 1.0 / len(z_harm), dtype=torch.float64)
    logits = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    warm: dict[str, tuple] = {}

    def transport(name: str, w: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        res = ot.solve(cost, w, b, reg=reg, max_iter=500, tol=1e-7, grad="envelope", potentials_init=warm.get(name))
        warm[name] = tuple(p.detach() for p in res.potentials)  # w moves little per step: warm-start the duals
        return res.value

    for _ in range(steps):
        w = torch.softmax(logits, 0)
        with warnings.catch_warnings():  # an inexact inner solve early on is corrected by the next steps
            warnings.filterwarnings("ignore", "Sinkhorn did not converge")
            pull, away = transport("safe", w, b_safe, cost_safe), transport("harm", w, b_harm, cost_harm)
        kl = (w * (n * w).clamp_min(1e-300).log()).sum()
        objective = pull - push * away + temperature * kl
        opt.zero_grad()
        objective.backward()
        opt.step()
    return torch.softmax(logits.detach(), 0)


def sot_stage(train_features: torch.Tensor, train_labels: torch.Tensor, trusted: list[int],
              trusted_labels: torch.Tensor, reference_features: torch.Tensor, benign: int, num_classes: int,
              push: float, reg: float, temperature: float, label_scale: float, steps: int,
              top_k: int | None) -> dict[str, torch.Tensor]:
    """What the loop trains sot on: ``{"sample_weight": n * w}`` (mean 1), or with ``top_k`` the K
    heaviest train rows (``{"rows": ...}``), uniformly weighted. The safe anchor is the trusted items
    with their verified labels; the harmful reference, the held-out harmful prompts labelled benign."""
    feats = train_features.cpu()
    z = joint_space(feats, train_labels.cpu(), num_classes, label_scale)
    z_safe = joint_space(feats[trusted], trusted_labels.cpu(), num_classes, label_scale, feats)
    harm_labels = torch.full((len(reference_features),), benign, dtype=torch.long)
    z_harm = joint_space(reference_features.cpu(), harm_labels, num_classes, label_scale, feats)
    w = sot_weights(z, z_safe, z_harm, push, reg, temperature, steps)
    if top_k is not None:
        return {"rows": torch.argsort(w, descending=True)[: min(top_k, len(w))].sort().values}
    return {"sample_weight": (len(w) * w).float()}


def hybrid_weights(z_base: torch.Tensor, z_t: torch.Tensor, kappa: float, temperature: float) -> torch.Tensor:
    """Incomplete-learning weights w_i = 1 + kappa * sigmoid(-Delta_i / T) on the distillation term.

    Delta_i = log p_base(s_i | x_i) - log p_T(s_i | x_i), where s_i = argmax z_T is the aligned
    teacher's (safe) answer and p_base the base model's (the plain-CE student on the same data):
    Delta_i < 0 where the base favours the unsafe class more than the teacher does, i.e. where safety
    learning is incomplete, and w_i grows toward 1 + kappa there; w_i is in [1, 1 + kappa].
    Departs from the paper: its position-dependent decay over response tokens has no analogue for a
    classifier, which gives one answer per prompt, so there is none here.
    """
    safe = z_t.argmax(-1, keepdim=True)
    delta = (torch.log_softmax(z_base.float(), -1).gather(-1, safe)
             - torch.log_softmax(z_t.float(), -1).gather(-1, safe)).squeeze(-1)
    return 1.0 + kappa * torch.sigmoid(-delta / temperature)


def hybrid_target(z_t: torch.Tensor, tau: float, trusted: list[int], trusted_labels: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """The hybrid distillation target q_i = beta * softmax(z_T / tau)_i + (1 - beta) * onehot(y_i) on the
    trusted items (their verified label y_i), and softmax(z_T / tau)_i on the others, which have none."""
    q = torch.softmax(z_t.float() / tau, -1)
    if trusted:
        onehot = torch.nn.functional.one_hot(trusted_labels.long(), z_t.shape[-1]).float()
        q[trusted] = beta * q[trusted] + (1.0 - beta) * onehot
    return q


def linearised_fit(head: torch.nn.Module, theta0: dict[str, torch.Tensor], x: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor], torch.Tensor], steps: int, lr: float) -> dict[str, torch.Tensor]:
    """theta trained from theta0 in NTK-linearised form, f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0)
    (theta - theta0), full batch, Adam on theta - theta0 from zero. The Jacobian-vector product is
    ``torch.func.jvp`` (exact for a linear head, where f_lin = f). ``head`` is only evaluated (in eval
    mode), never changed. Returns theta."""
    names = list(theta0)
    primals = tuple(theta0[n].detach() for n in names)
    f = lambda *params: functional_call(head, dict(zip(names, params)), (x,))  # noqa: E731
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            f0 = f(*primals)
        moves = [torch.zeros_like(p, requires_grad=True) for p in primals]
        opt = torch.optim.Adam(moves, lr=lr)
        for _ in range(steps):
            _, lin = jvp(f, primals, tuple(moves))
            loss = loss_fn(f0 + lin)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        head.train(was_training)
    return {n: (p + m).detach() for n, p, m in zip(names, primals, moves)}


def interference(tau_t: torch.Tensor, tau_s: torch.Tensor, keep: float, scale: float) -> torch.Tensor:
    """The interference of two weight-matrix updates, as AntCPLab/EnchTable's ``compute_interference``:
    take the top ``keep`` (gamma) fraction of each one's singular triplets, stack them as U = [U_t U_s],
    S = [S_t S_s], V^T = [V_t^T; V_s^T] (k in all), and

        I = scale * ||(U^T U - I_k) diag(S) (V^T V - I_k)||_1 / k^2      (entrywise 1-norm; scale 200 there)

    which is 0 when the two span orthogonal subspaces. Departs from the reference code: at least one
    triplet of each is kept, where ``int(gamma * rank)`` would keep none of a small head's matrix."""
    u1, s1, v1 = torch.linalg.svd(tau_t.double(), full_matrices=False)
    u2, s2, v2 = torch.linalg.svd(tau_s.double(), full_matrices=False)
    r1, r2 = max(1, int(len(s1) * keep)), max(1, int(len(s2) * keep))
    u = torch.cat([u1[:, :r1], u2[:, :r2]], dim=1)
    sv = torch.cat([s1[:r1], s2[:r2]])
    vt = torch.cat([v1[:r1], v2[:r2]], dim=0)
    eye = torch.eye(len(sv), dtype=torch.float64)
    result = (u.T @ u - eye) @ torch.diag(sv) @ (vt @ vt.T - eye)
    return scale * result.abs().sum() / result.shape[0] / result.shape[1]


def enchtable_merge(theta0: dict[str, torch.Tensor], theta_task: dict[str, torch.Tensor],
                    theta_aligned: dict[str, torch.Tensor], theta_harmful: dict[str, torch.Tensor], beta: float,
                    keep: float, interference_scale: float) -> dict[str, torch.Tensor]:
    """theta = theta_0 + tau_t + exp(-I) * alpha * tau_s for every weight matrix, where tau_t = theta_task -
    theta_0 (the downstream update), tau_s = theta_aligned - theta_harmful (the safety vector), alpha =
    beta * ||tau_t|| / ||tau_s|| (0 where tau_s = 0) and I = ``interference(tau_t, alpha * tau_s)``. Biases
    and other non-matrix parameters take alpha * tau_s unscaled, as in the reference code. Computed as
    theta_task + exp(-I) * alpha * tau_s, so beta = 0 returns theta_task exactly.
    Departs from the reference code: alpha is per weight matrix (the issue's rule); the reference takes one
    alpha from the norms of the whole model's vectors."""
    merged = {}
    for name, task in theta_task.items():
        tau_t, tau_s = (task - theta0[name]).double(), (theta_aligned[name] - theta_harmful[name]).double()
        norm_s = tau_s.norm().item()
        alpha = beta * tau_t.norm().item() / norm_s if norm_s > 0 else 0.0
        safety = alpha * tau_s
        weight = 1.0
        if task.dim() == 2 and alpha > 0:
            weight = math.exp(-interference(tau_t, safety, keep, interference_scale).item())
        merged[name] = task + (weight * safety).to(task.dtype) if alpha > 0 else task.clone()
    return merged
