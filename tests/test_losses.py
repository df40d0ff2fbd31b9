"""The loss terms and perturbations against hand computations (DESIGN §3), and the AMP gradient-penalty
recipe: the penalty taken on the grad scaler's scaled gradients, through the real train_step."""

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


# -- AMP: the gradient penalty on the scaled loss's gradients, unscaled ---------------------------------


def _head_and_batch(seed: int = 0, scale: float = 1.0):
    from trainable.backbone import build_student

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 16, generator=g) * scale
    y, z_t = torch.randint(0, 3, (32,), generator=g), torch.randn(32, 3, generator=g)
    torch.manual_seed(seed)
    return build_student("mlp", 32, 16, 3, None, 2), {"features": x}, y, z_t


def _todays_penalty(l_nr, params):
    """The penalty as it was before the scale was threaded through: no scale at all."""
    grads = torch.autograd.grad(l_nr, params, create_graph=True)
    return sum(g.float().pow(2).sum() for g in grads)


def test_a_disabled_grad_scaler_gives_todays_penalty_bit_for_bit():
    student, batch, y, _ = _head_and_batch()
    params = [p for p in student.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # what train_loop builds for fp32 / bf16
    assert scaler.get_scale() == 1.0
    l_nr = F.cross_entropy(student(batch), y)
    assert torch.equal(gradient_penalty(l_nr, params, scaler.get_scale()), _todays_penalty(l_nr, params))


def test_a_fixed_scale_leaves_the_penalty_unchanged():
    student, batch, y, _ = _head_and_batch(1)
    params = [p for p in student.parameters() if p.requires_grad]
    l_nr = F.cross_entropy(student(batch), y)
    plain = gradient_penalty(l_nr, params)
    assert plain.item() > 0
    # a power of two (every GradScaler factor) scales and unscales exactly
    assert torch.equal(gradient_penalty(l_nr, params, 2.0**12), plain)
    assert gradient_penalty(l_nr, params, 1000.0).item() == pytest.approx(plain.item(), rel=1e-6)
    # and it stays differentiable: d(penalty)/d(theta) is the same with and without the scale
    (g_plain,) = torch.autograd.grad(gradient_penalty(l_nr, params[:1]), params[0], retain_graph=True)
    (g_scaled,) = torch.autograd.grad(gradient_penalty(l_nr, params[:1], 2.0**12), params[0])
    torch.testing.assert_close(g_scaled, g_plain, rtol=1e-6, atol=0)


def test_under_fp16_autocast_the_unscaled_penalty_underflows_and_the_scaled_one_does_not():
    """Why the recipe exists: fp16 gradients of a small loss flush to zero unless the loss is scaled first."""
    student, batch, y, _ = _head_and_batch(2)
    params = [p for p in student.parameters() if p.requires_grad]

    def penalty(scale: float, fp16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            l_nr = 1e-6 * F.cross_entropy(student(batch).float(), y)  # gradients ~1e-8: below fp16's smallest
            return gradient_penalty(l_nr, params, scale).item()

    fp32 = penalty(1.0, fp16=False)
    assert fp32 > 0
    assert penalty(1.0, fp16=True) < 0.5 * fp32  # unscaled: the fp16 gradients underflowed
    assert penalty(2.0**16, fp16=True) == pytest.approx(fp32, rel=1e-2)  # GradScaler's initial scale


def _one_sgd_step(scaler, seed: int = 3, scale: float = 1.0, **over):
    """theta after one real train_step (SGD, so the update is the gradient itself) and its losses."""
    from trainable.loop import train_step

    cfg = TrainConfig(lambda_reg=1.0, alpha=1.0, clip_grad_norm=None, **over)
    student, batch, y, z_t = _head_and_batch(seed, scale)
    params = [p for p in student.parameters() if p.requires_grad]
    losses = train_step(cfg, student, torch.optim.SGD(params, lr=0.5), scaler, batch, y, z_t, step=0)
    return [p.detach().clone() for p in params], losses, (student, batch, y, z_t, cfg)


def test_train_step_with_a_disabled_scaler_is_the_plain_double_backprop_step():
    after, losses, (_, batch, y, z_t, cfg) = _one_sgd_step(torch.amp.GradScaler("cuda", enabled=False))
    fresh = _head_and_batch(3)[0]  # the same initial theta, stepped by hand with today's formula
    params = [p for p in fresh.parameters() if p.requires_grad]
    z = fresh(batch)
    l_nr = F.cross_entropy(z.float(), y)
    total = cfg.distill_weight * distill_loss(z, z_t, cfg.tau) + l_nr + cfg.lambda_reg * _todays_penalty(l_nr, params)
    grads = torch.autograd.grad(total, params)
    for p, g, a in zip(params, grads, after):
        assert torch.equal(p.detach() - 0.5 * g, a)
    assert losses["l_reg"] > 0


def test_train_step_under_an_enabled_scaler_takes_the_same_fp32_step():
    """The whole recipe through train_step: scaled penalty, scaled backward, unscale, step."""
    plain, plain_losses, _ = _one_sgd_step(torch.amp.GradScaler("cuda", enabled=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled, scaled_losses, _ = _one_sgd_step(scaler)
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
    assert scaled_losses == plain_losses
    assert scaler.get_scale() == 2.0**10  # no overflow, no growth yet: the step was taken


def test_an_overflow_of_the_scaled_penalty_skips_the_step_and_a_real_one_diverges():
    from trainable.loop import Diverged

    # 2^127 times gradients of size ~100 overflows float32 in the penalty's scaled gradients
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    after, losses, _ = _one_sgd_step(scaler, scale=100.0)
    assert not math.isfinite(losses["l_reg"]) and math.isfinite(losses["l_nr"]) and math.isfinite(losses["l_kd"])
    start = [p.detach() for p in _head_and_batch(3, 100.0)[0].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, start))  # the scaler skipped the step...
    assert scaler.get_scale() == 2.0**126  # ...and backed off, instead of a Diverged
    # with nothing left to unscale (scale 1) a non-finite penalty is divergence again
    with pytest.raises(Diverged) as info:
        _one_sgd_step(torch.amp.GradScaler("cpu", init_scale=1.0), scale=1e20)
    assert info.value.term in ("loss", "l_reg") and info.value.step == 1
