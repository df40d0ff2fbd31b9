"""Perturbations delta with ||delta||_p <= epsilon * rms(x) (DESIGN §3).

epsilon is relative to the size of the tensor being perturbed, so the same value means the
same thing for pooled features (norm ~6 for MiniLM) and for token embeddings. The scale is
``rms_norm(x, p)``: the root mean square of the per-example L2 norms for p=2, and the root
mean square of the entries for p=inf. It is computed from the detached input, so it is a
constant of the batch, not part of the graph.

Each function takes the unperturbed input ``x`` (batch first) and returns ``delta`` of the
same shape, detached. ``loss_fn(x_adv) -> scalar`` is the loss the attacker ascends.

Under data parallelism (``Shard``) each rank holds only its rows of the global batch, yet delta
must be the one world=1 would draw for those rows: rms(x) is taken over the global batch, and
the Gaussian noise is drawn for the global batch and sliced, so ranks never share noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainable.config import ConfigError

Norm = str  # "l2" | "linf"


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel global batch: rank r of W holds rows r, r+W, r+2W, ...

    The default (rank 0 of 1) is the whole batch and communicates nothing. With W > 1 the sums go
    through torch.distributed's default group, so every rank must call them at the same point."""

    rank: int = 0
    world: int = 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global-batch tensor ``t``.

        Refuses a batch that does not split evenly: the loop averages the ranks' batch means, which
        is the global batch mean only when every rank holds the same number of rows."""
        if self.world == 1:
            return t
        if len(t) % self.world:
            raise ConfigError(f"batch_size: a batch of {len(t)} rows does not split evenly over workers={self.world} "
                              "(resources.workers_per_trial, or train --workers); choose a batch_size that is a multiple "
                              "of the workers")
        return t[self.rank :: self.world]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks, outside autograd (for constants of the batch, like rms(x))."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)  # SUM
        return t


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm over every non-batch dimension, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def rms_norm(x: torch.Tensor, norm: Norm, shard: Shard = Shard()) -> torch.Tensor:
    """Scale that epsilon is relative to: RMS of per-example L2 norms (l2) or of entries (linf),
    over the global batch that ``x`` is ``shard``'s rows of."""
    x = x.detach().float()
    squares = x.flatten(1).norm(dim=1).pow(2) if norm == "l2" else x.pow(2)
    if shard.world == 1:
        return squares.mean().sqrt()
    # mean over the global batch = (sum of every rank's squares) / (every rank's count); float64
    # so that the count of a large embedding batch stays exact
    total = shard.sum(torch.stack([squares.sum().double(), squares.new_tensor(squares.numel(), dtype=torch.float64)]))
    return (total[0] / total[1]).sqrt().float()


def project(delta: torch.Tensor, radius: torch.Tensor | float, norm: Norm) -> torch.Tensor:
    """Project delta onto the ball ||delta||_p <= radius (per example)."""
    if norm == "l2":
        return delta * (radius / _flat_norm(delta)).clamp(max=1.0)
    return delta.clamp(-radius, radius)


def _steepest(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Unit steepest-ascent direction for the norm: g/||g||_2 (l2) or sign(g) (linf)."""
    return grad / _flat_norm(grad) if norm == "l2" else grad.sign()


def gaussian_delta(x: torch.Tensor, epsilon: float, norm: Norm, generator: torch.Generator | None = None,
                   shard: Shard = Shard()) -> torch.Tensor:
    """Random delta on the sphere of radius epsilon * rms(x): a Gaussian direction, rescaled.

    For l2 the direction is normalised to length r; for linf it is scaled so max|delta| = r.
    The noise is drawn for the whole global batch and ``shard`` takes its rows: each rank gets
    distinct noise (stronger than folding the rank into the seed), and world=W draws exactly
    the noise of world=1.
    """
    radius = epsilon * rms_norm(x, norm, shard)
    noise = torch.randn((len(x) * shard.world, *x.shape[1:]), generator=generator, dtype=torch.float32)
    noise = shard.rows(noise).to(x.device)
    if norm == "l2":
        return (noise * radius / _flat_norm(noise)).to(x.dtype)
    peak = noise.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (noise * radius / peak).to(x.dtype)


def fgsm_delta(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, epsilon: float, norm: Norm,
               shard: Shard = Shard()) -> torch.Tensor:
    """One step of size r = epsilon * rms(x) along the loss gradient (FGSM; its L2 analogue FGM)."""
    return pgd_delta(loss_fn, x, epsilon, norm, steps=1, step_scale=1.0, shard=shard)


def pgd_delta(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    epsilon: float,
    norm: Norm,
    steps: int,
    step_scale: float = 2.5,
    shard: Shard = Shard(),
) -> torch.Tensor:
    """Projected gradient ascent from delta=0: k steps of size step_scale * r / k, each projected
    back onto ||delta||_p <= r with r = epsilon * rms(x) (Madry et al., 2018).

    Each step's direction is per example (g/||g|| or sign g), so a rank's rows follow the same
    path as in the global batch: only the radius needs the other ranks."""
    if epsilon == 0:
        return torch.zeros_like(x.detach())
    radius = epsilon * rms_norm(x, norm, shard)
    x = x.detach()
    delta = torch.zeros_like(x)
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
    shard: Shard = Shard(),
) -> torch.Tensor:
    """Dispatch on the perturbation kind of PerturbConfig; ``shard``: which rows of the global batch ``x`` is."""
    if kind == "gaussian":
        return gaussian_delta(x, epsilon, norm, generator, shard)
    if kind == "fgsm":
        return fgsm_delta(loss_fn, x, epsilon, norm, shard)
    if kind == "pgd":
        return pgd_delta(loss_fn, x, epsilon, norm, steps, step_scale, shard)
    raise ValueError(f"perturb.kind: unknown '{kind}'; allowed: gaussian, fgsm, pgd")
