"""The loss terms of contrastive knowledge transfer + robust optimization, in the paper's symbols.

    L_total = L_KD + L_NR + L_Reg                                           (DESIGN §3)

Each term is a small pure function of tensors; ``unified_loss`` only adds them up and returns
every term so the loop can log them and name the one that diverged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """mean_i(w_i * values_i); ``weight=None`` is the plain mean."""
    return values.mean() if weight is None else (weight.float() * values).mean()


def distill_loss(z_s: torch.Tensor, z_t: torch.Tensor, tau: float, direction: str = "forward",
                 weight: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)), batch mean.

    z_S: student logits, z_T: teacher logits (no gradient flows into the teacher), tau: the
    temperature. The tau^2 factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). ``direction="reverse"`` computes KL(p_S || p_T) instead, the order
    the paper's summary writes. The distillation weight is applied by ``unified_loss``.
    ``weight``: per-item w_i, giving mean_i(w_i * KL_i) (sot's n * w_i, hybrid's adaptive weights).
    ``target``: a distribution that replaces softmax(z_T / tau) (hybrid's target; zeros allowed).
    """
    log_p_s = F.log_softmax(z_s.float() / tau, dim=-1)
    if target is None:
        log_p_t = F.log_softmax(z_t.detach().float() / tau, dim=-1)
    else:
        log_p_t = target.detach().float().clamp_min(1e-12).log()  # a zero entry adds 0 * finite to forward KL
    if direction == "forward":
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    elif direction == "reverse":
        kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    else:
        raise ValueError(f"kd_direction: unknown '{direction}'; allowed: forward, reverse")
    return tau**2 * _weighted_mean(kl, weight)


def noise_robust_loss(z_clean: torch.Tensor, z_perturbed: torch.Tensor, y: torch.Tensor, alpha: float,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_NR = alpha * CE(y, f(x)) + (1 - alpha) * CE(y, f(x + delta)).

    z_clean = f(x), z_perturbed = f(x + delta) with ||delta||_p <= epsilon * rms(x); alpha in
    [0, 1] trades clean fit against fit under perturbation. At alpha = 1 the perturbed term
    is dropped entirely (not multiplied by zero) so it costs nothing. ``weight``: per-item w_i,
    each CE becoming mean_i(w_i * CE_i) (sot's sample weights).
    """
    ce = lambda z: _weighted_mean(F.cross_entropy(z.float(), y, reduction="none"), weight)  # noqa: E731
    loss = alpha * (F.cross_entropy(z_clean.float(), y) if weight is None else ce(z_clean))
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * (F.cross_entropy(z_perturbed.float(), y) if weight is None else ce(z_perturbed))
    return loss


def gradient_penalty(l_nr: torch.Tensor, params: Iterable[torch.Tensor], scale: float = 1.0,
                     world: int = 1) -> torch.Tensor:
    """||grad_theta L_NR||^2, the squared L2 norm of the noise-robust loss's gradient.

    Built with create_graph=True so the penalty itself is differentiable (double backprop):
    minimising it flattens L_NR around theta, which is what makes the head robust.

    ``scale``: the AMP grad scaler's factor S. The gradient is taken of S * L_NR and divided by S
    (PyTorch's AMP "gradient penalty" recipe), so fp16 gradients do not underflow; S = 1 is the
    plain gradient. GradScaler's factors are powers of two, so in fp32 the result does not change by a bit.

    ``world``: W data-parallel ranks, each holding an equal slice of the global batch with L_NR its
    slice's mean. The penalty is then ||g_bar||^2 of the global gradient g_bar = AR(g_r) / W
    (AR: a differentiable all-reduce sum), the same on every rank. AR's backward sums the ranks'
    upstream gradients, which hands each rank W times its share; the loop's averaging of the
    ranks' theta-gradients divides by W again, so no other factor is needed:
    mean_r d/dtheta [L_r + lambda ||g_bar||^2] = d/dtheta [L_global + lambda ||g_bar||^2].
    A per-rank penalty averaged over ranks would instead add lambda times the ranks' gradient variance.
    """
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(l_nr * scale if scale != 1.0 else l_nr, params, create_graph=True)
    if scale != 1.0:
        grads = [g / scale for g in grads]
    if world == 1:
        return sum(g.float().pow(2).sum() for g in grads)
    from torch.distributed.nn.functional import all_reduce  # differentiable, unlike dist.all_reduce

    with warnings.catch_warnings():
        # deprecated in recent torch for the private _functional_collectives.all_reduce, which is not
        # differentiable in every torch this package allows (>= 2.4); this one is
        warnings.simplefilter("ignore", FutureWarning)
        g_bar = all_reduce(torch.cat([g.float().flatten() for g in grads])) / world  # one collective in all
    return g_bar.pow(2).sum()


def unified_loss(
    z_s: torch.Tensor,
    z_s_perturbed: torch.Tensor | None,
    z_t: torch.Tensor,
    y: torch.Tensor,
    params: list[torch.Tensor],
    *,
    distill_weight: float,
    tau: float,
    alpha: float,
    lambda_reg: float,
    kd_direction: str = "forward",
    grad_scale: float = 1.0,
    world: int = 1,
    sample_weight: torch.Tensor | None = None,
    kd_weight: torch.Tensor | None = None,
    kd_target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """L_total = w * L_KD + L_NR + lambda * ||grad_theta L_NR||^2, with every term returned.

    A term whose weight is zero is not computed (it would only cost time), and is reported
    as 0. ``z_s_perturbed`` may be None when alpha == 1. ``grad_scale`` (the AMP scaler's factor)
    and ``world`` (data-parallel ranks) reach the penalty only: see ``gradient_penalty``.
    Per-item weights (trainable/methods.py): ``sample_weight`` scales each item's KD and CE terms
    (sot), ``kd_weight`` its KD term only (hybrid), ``kd_target`` replaces the teacher's distribution.
    """
    zero = z_s.new_zeros((), dtype=torch.float32)
    w_kd = sample_weight if kd_weight is None else kd_weight if sample_weight is None else sample_weight * kd_weight
    l_kd = (distill_weight * distill_loss(z_s, z_t, tau, kd_direction, w_kd, kd_target) if distill_weight > 0
            else zero)
    l_nr = noise_robust_loss(z_s, z_s_perturbed if z_s_perturbed is not None else z_s, y, alpha, sample_weight)
    l_reg = lambda_reg * gradient_penalty(l_nr, params, grad_scale, world) if lambda_reg > 0 else zero
    return {"loss": l_kd + l_nr + l_reg, "l_kd": l_kd, "l_nr": l_nr, "l_reg": l_reg}
