"""The loss terms and perturbations against hand computations (DESIGN §3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainable.config import TrainConfig
from trainable.losses import distill_loss, gradient_penalty, noise_robust_loss, unified_loss
from trainable.perturb import fgsm_delta, gaussian_delta, pgd_delta, rms_norm


def test_distill_loss_matches_hand_computation():
    z_s = torch.tensor([[1.0, 0.0, -1.0]])
    z_t = torch.tensor([[4.0, 0.0, 0.0]])
    tau = 2.0
    p_s = [math.exp(v / tau) for v in (1.0, 0.0, -1.0)]
    p_t = [math.exp(v / tau) for v in (4.0, 0.0, 0.0)]
    p_s = [v / sum(p_s) for v in p_s]
    p_t = [v / sum(p_t) for v in p_t]
    forward = tau**2 * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    reverse = tau**2 * sum(s * math.log(s / t) for t, s in zip(p_t, p_s))
    assert distill_loss(z_s, z_t, tau).item() == pytest.approx(forward, rel=1e-5)
    assert distill_loss(z_s, z_t, tau, "reverse").item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the knob really changes something


def test_distill_loss_is_zero_when_student_equals_teacher():
    z = torch.randn(5, 3)
    assert distill_loss(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_noise_robust_loss_is_alpha_mixture():
    g = torch.Generator().manual_seed(0)
    z, zp, y = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.randint(0, 2, (8,), generator=g)
    expected = 0.3 * F.cross_entropy(z, y) + 0.7 * F.cross_entropy(zp, y)
    assert noise_robust_loss(z, zp, y, 0.3).item() == pytest.approx(expected.item(), rel=1e-6)
    assert noise_robust_loss(z, zp, y, 1.0).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)


def test_gradient_penalty_matches_finite_differences():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])

    def l_nr(weights):
        return F.cross_entropy(x @ weights.T, y)

    penalty = gradient_penalty(l_nr(w), [w])
    h, fd = 1e-6, torch.zeros_like(w)
    for i in range(w.numel()):
        e = torch.zeros_like(w).view(-1)
        e[i] = h
        e = e.view_as(w)
        fd.view(-1)[i] = (l_nr(w.detach() + e) - l_nr(w.detach() - e)) / (2 * h)
    assert penalty.item() == pytest.approx(fd.pow(2).sum().item(), rel=1e-5)
    # and it is differentiable (double backprop): its own gradient exists and is finite
    (g,) = torch.autograd.grad(penalty, w)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_unified_loss_reduces_to_plain_ce():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 2)
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    z = head(x)
    out = unified_loss(z, None, torch.randn(10, 2), y, list(head.parameters()),
                       distill_weight=0.0, tau=2.0, alpha=1.0, lambda_reg=0.0)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    assert out["l_kd"].item() == 0.0 and out["l_reg"].item() == 0.0


@pytest.mark.parametrize("method,expected", [
    ("ckt_ro", {"distill_weight": 0.7, "alpha": 0.4, "lambda_reg": 0.05}),
    ("ce", {"distill_weight": 0.0, "alpha": 1.0, "lambda_reg": 0.0}),
    ("kd", {"distill_weight": 0.7, "alpha": 1.0, "lambda_reg": 0.05}),
    ("adv", {"distill_weight": 0.0, "alpha": 0.4, "lambda_reg": 0.05}),
])
def test_each_baseline_switches_off_exactly_its_terms(method, expected):
    cfg = TrainConfig(method=method, distill_weight=0.7, alpha=0.4, lambda_reg=0.05)
    assert cfg.terms() == expected


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("kind", ["fgsm", "pgd", "gaussian"])
def test_deltas_respect_the_norm_bound(kind, norm):
    torch.manual_seed(2)
    head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    x, y = torch.randn(20, 16) * 3, torch.randint(0, 3, (20,))
    eps = 0.1

    def loss(xp):
        return F.cross_entropy(head(xp), y)

    if kind == "fgsm":
        delta = fgsm_delta(loss, x, eps, norm)
    elif kind == "pgd":
        delta = pgd_delta(loss, x, eps, norm, steps=7)
    else:
        delta = gaussian_delta(x, eps, norm, torch.Generator().manual_seed(0))
    radius = eps * rms_norm(x, norm).item()
    sizes = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert (sizes <= radius * (1 + 1e-5)).all()
    assert sizes.max() >= radius * 0.99  # and the budget is actually used
    if kind != "gaussian":  # an attack must raise the loss it ascends
        assert loss(x + delta) > loss(x)


def test_pgd_beats_fgsm_or_ties():
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))

    def loss(xp):
        return F.cross_entropy(head(xp), y)

    assert loss(x + pgd_delta(loss, x, 0.2, "l2", steps=10)) >= loss(x + fgsm_delta(loss, x, 0.2, "l2")) - 1e-4
