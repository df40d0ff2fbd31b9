"""Perturbations delta with ||delta||_p <= epsilon * rms(x) (DESIGN §3).

epsilon is relative to the size of the tensor being perturbed, so the same value means the
same thing for pooled features (norm ~6 for MiniLM) and for token embeddings. The scale is
``rms_norm(x, p)``: the root mean square of the per-example L2 norms for p=2, and the root
mean square of the entries for p=inf. It is computed from the detached input, so it is a
constant of the batch, not part of the graph.

Each function takes the unperturbed input ``x`` (batch first) and returns ``delta`` of the
same shape, detached. ``loss_fn(x_adv) -> scalar`` is the loss the attacker ascends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Norm = str  # "l2" | "linf"


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm over every non-batch dimension, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def rms_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Scale that epsilon is relative to: RMS of per-example L2 norms (l2) or of entries (linf)."""
    x = x.detach().float()
    if norm == "l2":
        return x.flatten(1).norm(dim=1).pow(2).mean().sqrt()
    return x.pow(2).mean().sqrt()


def project(delta: torch.Tensor, radius: torch.Tensor | float, norm: Norm) -> torch.Tensor:
    """Project delta onto the ball ||delta||_p <= radius (per example)."""
    if norm == "l2":
        return delta * (radius / _flat_norm(delta)).clamp(max=1.0)
    return delta.clamp(-radius, radius)


def _steepest(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Unit steepest-ascent direction for the norm: g/||g||_2 (l2) or sign(g) (linf)."""
    return grad / _flat_norm(grad) if norm == "l2" else grad.sign()


def gaussian_delta(x: torch.Tensor, epsilon: float, norm: Norm, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random delta on the sphere of radius epsilon * rms(x): a Gaussian direction, rescaled.

    For l2 the direction is normalised to length r; for linf it is scaled so max|delta| = r.
    """
    radius = epsilon * rms_norm(x, norm)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    if norm == "l2":
        return (noise * radius / _flat_norm(noise)).to(x.dtype)
    peak = noise.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (noise * radius / peak).to(x.dtype)


def fgsm_delta(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, epsilon: float, norm: Norm) -> torch.Tensor:
    """One step of size r = epsilon * rms(x) along the loss gradient (FGSM; its L2 analogue FGM)."""
    return pgd_delta(loss_fn, x, epsilon, norm, steps=1, step_scale=1.0)


def pgd_delta(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_scale: float = 2.5,
) -> torch.Tensor:
    """Projected gradient ascent from delta=0: k steps of size step_scale * r / k, each projected
    back onto ||delta||_p <= r with r = epsilon * rms(x) (Madry et al., 2018)."""
    radius = epsilon * rms_norm(x, norm)
    x = x.detach()
    delta = torch.zeros_like(x)
    if epsilon == 0:
        return delta
    step = step_scale * radius / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() + step * _steepest(grad.float(), norm).to(x.dtype), radius, norm)
    return delta.detach()


def make_delta(
    kind: str,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_scale: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on the perturbation kind of PerturbConfig."""
    if kind == "gaussian":
        return gaussian_delta(x, epsilon, norm, generator)
    if kind == "fgsm":
        return fgsm_delta(loss_fn, x, epsilon, norm)
    if kind == "pgd":
        return pgd_delta(loss_fn, x, epsilon, norm, steps, step_scale)
    raise ValueError(f"perturb.kind: unknown '{kind}'; allowed: gaussian, fgsm, pgd")
