"""Packed trials: many heads of one shape trained as one vectorised program (issue 15).

A trial on cached features is one small head trained in a Python loop of ~4 ms steps, which
leaves the cores idle most of each step. A ``Pack`` holds K such trials ("members") as stacked
parameters (``theta[k]``: member k's head) and takes one optimizer step for all of them at once,
with batched matrix products:

    L_k = w_k * L_KD(z_k, z_T) + L_NR(z_k, z_k(x + delta_k), y; alpha_k) + lambda_k * ||grad_theta_k L_NR,k||^2

for every member k with its own searched scalars (w, epsilon, alpha, lambda, tau, lr, weight
decay, clipping), its own seed (its init, its batches, its delta) and its own budget. Summing the
L_k and differentiating once gives every member the gradient it would get alone, because member
k's loss depends on theta[k] only; the same holds for the gradient penalty (the gradient of
sum_k L_NR,k with respect to theta[k] is grad L_NR,k) and for PGD's ascent on delta[k]. Clipping
and AdamW are taken per member. So a member's result equals the same configuration trained alone
by ``trainable.loop.train_loop`` within float tolerance (tests/test_packed.py checks a pack of 4).

Members join and leave between steps: a member that reaches its budget, diverges or is removed
(stopped by the scheduler) drops out and the rest go on; each member is at its own step, so one
that joins later, or resumes from a checkpoint, still sees exactly its own batches and deltas.

Checkpoints are the solo loop's (``trainable.loop.save_checkpoint``: theta and a torch AdamW state
dict), so a packed trial resumes alone and a solo checkpoint resumes in a pack. The evaluation of
a member, at its rungs and at the end, is the solo loop's own ``evaluate_split`` on that member's
head unstacked into a ``Student``.

What packs: heads over cached features (``linear``, ``mlp``) and the methods that are the unified
loss with terms switched off (``ckt_ro``, ``ce``, ``kd``, ``adv``), in fp32 or bf16 on one process.
Knobs that change shapes or programs form the ``group_key``; only members with equal keys share
a pack. ``TrainConfig.unpackable`` names what a config needs that a pack does not do.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainable import backbone as bb
from trainable.config import TrainConfig
from trainable.loop import (DTYPES, EVAL_ITEMS, Artifacts, Diverged, artifact_key, batch_indices, evaluate_split,
                            save_checkpoint)

Report = Callable[..., None]
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which the solo loop uses


def group_key(config: TrainConfig) -> tuple:
    """What must be equal for two members to share one vectorised program: shapes (head, hidden,
    batch), the program itself (precision, perturbation, KD direction, eval attack, device) and
    the data (the shared artifacts). Everything else is a member's own."""

    p = config.perturb
    return (config.head, config.head_hidden, config.batch_size, config.precision, p.kind, p.norm, p.steps,
            p.step_scale, config.kd_direction, config.eval_attack.model_dump_json(), config.resolve_device(),
            artifact_key(config))


# -- one vectorised step ------------------------------------------------------------------------


def head_logits(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """z[k] = h_theta[k](x[k]) for stacked heads: x [K, B, D] -> z [K, B, C].

    ``theta`` holds the solo head's parameters by name (``weight``/``bias`` for linear, ``0.*`` and
    ``2.*`` for the MLP's two layers), each with a leading member dimension, and each weight in the
    pack's layout [K, in, out] (``to_pack_layout``): the product and its gradient then read and
    write the weight as stored, where the solo layout [K, out, in] costs a transposed copy of the
    largest tensor in every backward."""
    if "weight" in theta:
        return torch.baddbmm(theta["bias"].unsqueeze(1), x, theta["weight"])
    h = F.gelu(torch.baddbmm(theta["0.bias"].unsqueeze(1), x, theta["0.weight"]))
    return torch.baddbmm(theta["2.bias"].unsqueeze(1), h, theta["2.weight"])


def to_pack_layout(t: torch.Tensor) -> torch.Tensor:
    """One member's parameter (or its AdamW moment) between nn.Linear's layout and the pack's: a
    weight [out, in] <-> [in, out], a bias unchanged. A transpose, so it is its own inverse."""
    return t.transpose(-2, -1).contiguous() if t.dim() >= 2 else t


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-member [K] tensor shaped to broadcast against ``like`` [K, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm of [K, B, D], shaped [K, B, 1] (trainable.perturb._flat_norm, per member)."""
    return t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def packed_delta(kind: str, attack_ce: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 epsilon: torch.Tensor, norm: str, steps: int, step_scale: float,
                 generators: Sequence[torch.Generator]) -> torch.Tensor:
    """delta[k] with ||delta[k]_i||_p <= epsilon_k * rms(x[k]) for every member (trainable.perturb, vectorised).

    ``attack_ce(x_adv)`` returns each member's batch-mean CE, shape [K]; its sum's gradient with
    respect to delta[k] is member k's own. ``generators``: member k's (seed, step) stream, used by
    the gaussian kind only, as the solo loop uses it."""
    x = x.detach().float()
    squares = x.norm(dim=-1).pow(2) if norm == "l2" else x.pow(2).flatten(1)
    radius = _per_row(epsilon * squares.mean(dim=1).sqrt(), x)  # epsilon_k * rms(x[k])
    if kind == "gaussian":
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(x.device)
        if norm == "l2":
            return noise * radius / _flat_norm(noise)
        return noise * radius / noise.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    if kind == "fgsm":
        steps, step_scale = 1, 1.0
    delta = torch.zeros_like(x)
    step = step_scale * radius / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(attack_ce(x + delta).sum(), delta)
        grad = grad.float()
        direction = grad / _flat_norm(grad) if norm == "l2" else grad.sign()
        delta = delta.detach() + step * direction
        delta = delta * (radius / _flat_norm(delta)).clamp(max=1.0) if norm == "l2" else delta.clamp(-radius, radius)
    return delta.detach() * (radius > 0)  # epsilon = 0: no perturbation, as pgd_delta returns


def packed_losses(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, z_t: torch.Tensor,
                  scalars: dict[str, torch.Tensor], kind: str, norm: str, steps: int, step_scale: float,
                  kd_direction: str, generators: Sequence[torch.Generator]) -> dict[str, torch.Tensor]:
    """Every member's loss terms, each a [K] tensor: L_total = w L_KD + L_NR + lambda ||grad_theta L_NR||^2.

    The terms are trainable.losses' (distill_loss, noise_robust_loss, gradient_penalty) with every
    scalar a per-member tensor in ``scalars`` (distill_weight, tau, alpha, epsilon, lambda_reg). A
    term that no member weighs is not computed; a member whose weight is zero gets exactly 0 from it."""
    k, b = y.shape
    ce = lambda z: F.cross_entropy(z.float().flatten(0, 1), y.flatten(), reduction="none").view(k, b).mean(1)  # noqa: E731
    w, tau, alpha, lam = (scalars[n] for n in ("distill_weight", "tau", "alpha", "lambda_reg"))
    perturbed = bool((alpha < 1).any())
    if perturbed:
        fixed = {n: p.detach() for n, p in theta.items()}  # the attacker differentiates in delta only
        delta = packed_delta(kind, lambda xp: ce(head_logits(fixed, xp)), x, scalars["epsilon"], norm, steps,
                             step_scale, generators)
        # f(x) and f(x + delta) as one product over 2B rows: each weight then has one use in the
        # graph, so its gradient (and the penalty's second derivative) is one batched product
        # rather than two plus a sum of weight-sized tensors
        z, z_p = head_logits(theta, torch.cat([x, x + delta.to(x.dtype)], 1)).split(b, 1)
    else:
        z = head_logits(theta, x)
    zero = z.new_zeros(k, dtype=torch.float32)

    l_kd = zero
    if bool((w > 0).any()):
        t = _per_row(tau, z)
        log_p_s, log_p_t = F.log_softmax(z.float() / t, -1), F.log_softmax(z_t.float() / t, -1)
        kl = ((log_p_t.exp() * (log_p_t - log_p_s)) if kd_direction == "forward"
              else (log_p_s.exp() * (log_p_s - log_p_t))).sum(-1)
        l_kd = w * tau.pow(2) * kl.mean(1)

    l_nr = alpha * ce(z)
    if perturbed:
        l_nr = l_nr + (1 - alpha) * ce(z_p)

    l_reg = zero
    if bool((lam > 0).any()):
        params = list(theta.values())
        grads = torch.autograd.grad(l_nr.sum(), params, create_graph=True)
        # ||g||^2 as the square of the norm: its forward reads g without a weight-sized temporary and
        # its backward makes two passes over g (g / ||g||, times the upstream); pow(2) made a
        # temporary and three backward passes over the largest, weight-sized gradient (profiled)
        penalty = sum(torch.linalg.vector_norm(g.float().flatten(1), dim=1).square() for g in grads)
        l_reg = lam * penalty
    return {"loss": l_kd + l_nr + l_reg, "l_kd": l_kd, "l_nr": l_nr, "l_reg": l_reg}


CHUNK_BYTES = 1 << 19
"""Bytes of one parameter tensor that the optimizer updates at a time. Stacked, the MLP's first
weight is 6 MiB at K = 16, and each of AdamW's seven elementwise passes over it (and its gradient
and two moments) then streams from memory; a member at a time (384 KiB), all seven run in L2."""


def _member_chunks(t: torch.Tensor) -> list[slice]:
    """Slices of the member dimension of ``t`` that are each about CHUNK_BYTES or one member."""
    size = max(1, CHUNK_BYTES // max(1, t[0].numel() * t.element_size()))
    return [slice(i, i + size) for i in range(0, len(t), size)]


def adamw_step(theta: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], m: dict[str, torch.Tensor],
               v: dict[str, torch.Tensor], step: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor,
               grad_coef: torch.Tensor | None = None) -> None:
    """One AdamW step per member, in place: torch.optim.AdamW's update with betas (0.9, 0.999),
    eps 1e-8, and each member's own lr, weight decay and step count t (already incremented):

        g <- c g (c: the clipping coefficient, ``grad_coef``);  theta <- theta (1 - lr wd)
        m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
        theta <- theta - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)"""
    (b1, b2), t = BETAS, step.double()
    step_size = (lr.double() / (1 - b1**t)).float()
    bc2_sqrt = (1 - b2**t).sqrt().float()
    decay = 1 - lr * weight_decay
    with torch.no_grad():
        for name, theta_n in theta.items():
            for c in _member_chunks(theta_n):
                p, g, m_c, v_c = theta_n[c], grads[name][c], m[name][c], v[name][c]
                if grad_coef is not None:
                    g.mul_(_per_row(grad_coef[c], g).to(g.dtype))
                p.mul_(_per_row(decay[c], p))
                m_c.lerp_(g, 1 - b1)
                v_c.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v_c.sqrt() / _per_row(bc2_sqrt[c], p)).add_(ADAM_EPS)
                p.addcdiv_(m_c * _per_row(step_size[c], p), denom, value=-1.0)


def clip_coefficients(grads: dict[str, torch.Tensor], max_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_ per member: (each member's gradient norm before clipping, the
    factor min(1, max_norm / (norm + 1e-6)) that ``adamw_step`` scales its gradient by). As
    clip_grad_norm_, the norm of the per-tensor norms."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.float().flatten(1), dim=1) for g in grads.values()])
    norm = torch.linalg.vector_norm(per_tensor, dim=0)
    return norm, (max_norm / (norm + 1e-6)).clamp(max=1.0)


# -- members and the pack ---------------------------------------------------------------------


@dataclass
class Member:
    """One trial in a pack: its config, where its results go, and where it starts."""

    config: TrainConfig
    report: Report
    """``report(metrics, checkpoint=None)``, the solo loop's contract (trainable.loop.train_loop)."""
    resume_from: str | Path | None = None
    eval_at: Sequence[int] = ()
    name: str = ""
    step: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] | None = None
    paused: bool = False
    """Skipped by ``Pack.step`` while set: its owner waits on a decision about its last report (a rung)."""


SCALARS = ("distill_weight", "tau", "alpha", "epsilon", "lambda_reg", "lr", "weight_decay", "clip")


class Pack:
    """K members of one ``group_key`` on one set of artifacts, stepped together.

    ``add`` and ``remove`` change the pack between steps; ``step`` advances every member one optimizer
    step and calls each member's ``report`` where its solo loop would (log_every, checkpoint_every,
    rungs, the end). ``step`` returns the members that left in it: finished, or failed (with the error)."""

    def __init__(self, artifacts: Artifacts, checkpoint_root: Path, device: str = "cpu"):
        self.art, self.root, self.device = artifacts, Path(checkpoint_root), device
        to_dev = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        self.features = to_dev(artifacts.inputs["train"])["features"]
        self.y, self.z_t = artifacts.labels["train"].to(device), artifacts.teacher["train"].to(device)
        self.members: list[Member] = []
        self.theta: dict[str, torch.Tensor] = {}
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.adam_steps = torch.zeros(0, dtype=torch.long)
        self.key: tuple | None = None

    def __len__(self) -> int:
        return len(self.members)

    # membership ---------------------------------------------------------------------------------

    def _solo(self, config: TrainConfig) -> tuple[bb.Student, torch.optim.AdamW]:
        """The solo loop's student and optimizer for ``config``, initialised as train_loop does."""
        torch.manual_seed(config.seed)
        student = bb.build_student(config.head, config.head_hidden, self.features.shape[1],
                                   self.art.splits.num_classes, None, config.lora_rank).to(self.device)
        return student, torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def add(self, member: Member) -> None:
        """Add a member at its start, or at its checkpoint's step (a solo or packed checkpoint)."""
        why = member.config.unpackable()
        if why:
            raise ValueError(why)
        key = group_key(member.config)
        if self.key is not None and key != self.key and self.members:
            raise ValueError("this member's head, batch, precision, perturbation or data differ from the pack's")
        self.key = key
        student, opt = self._solo(member.config)
        names = [n for n, _ in student.head.named_parameters()]
        m = {n: torch.zeros_like(p) for n, p in student.head.named_parameters()}
        v = {n: torch.zeros_like(p) for n, p in student.head.named_parameters()}
        step = 0
        if member.resume_from is not None:
            state = torch.load(Path(member.resume_from) / "state.pt", weights_only=True, map_location=self.device)
            student.load_trainable_state(state["student"])
            opt.load_state_dict(state["optimizer"])
            for i, n in enumerate(names):
                s = opt.state_dict()["state"].get(i)
                if s:
                    m[n], v[n] = s["exp_avg"].clone(), s["exp_avg_sq"].clone()
            step = int(state["step"])
        member.step = step
        new = {n: to_pack_layout(p.detach().clone()) for n, p in student.head.named_parameters()}
        m, v = ({n: to_pack_layout(t) for n, t in d.items()} for d in (m, v))
        cat = lambda old, n, t: torch.cat([old[n], t.unsqueeze(0)]) if old else t.unsqueeze(0)  # noqa: E731
        self.theta = {n: cat(self.theta, n, new[n]) for n in names}
        self.m = {n: cat(self.m, n, m[n]) for n in names}
        self.v = {n: cat(self.v, n, v[n]) for n in names}
        self.adam_steps = torch.cat([self.adam_steps, torch.tensor([step])])
        self.members.append(member)

    def remove(self, member: Member) -> None:
        """Drop a member (finished, failed or stopped); the others keep their state."""
        i = self.members.index(member)
        keep = torch.tensor([j for j in range(len(self.members)) if j != i], dtype=torch.long)
        for d in (self.theta, self.m, self.v):
            for n in d:
                d[n] = d[n].index_select(0, keep.to(d[n].device))
        self.adam_steps = self.adam_steps[keep]
        self.members.pop(i)

    def student_of(self, i: int) -> tuple[bb.Student, torch.optim.AdamW]:
        """Member i unstacked into the solo loop's student and AdamW (for evaluation and checkpoints)."""
        config = self.members[i].config
        student, opt = self._solo(config)
        with torch.no_grad():
            for n, p in student.head.named_parameters():
                p.copy_(to_pack_layout(self.theta[n][i]))
        if int(self.adam_steps[i]) > 0:
            for n, p in student.head.named_parameters():
                opt.state[p] = {"step": torch.tensor(float(self.adam_steps[i])),
                                "exp_avg": to_pack_layout(self.m[n][i]).clone(),
                                "exp_avg_sq": to_pack_layout(self.v[n][i]).clone()}
        return student, opt

    # the step -----------------------------------------------------------------------------------

    def _scalars(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        values = []
        for i in rows:
            c = self.members[i].config
            t = c.terms()
            values.append([t["distill_weight"], c.tau, t["alpha"], c.epsilon, t["lambda_reg"], c.lr, c.weight_decay,
                           c.clip_grad_norm or math.inf])
        cols = torch.tensor(values, dtype=torch.float32, device=self.device).T
        return dict(zip(SCALARS, cols))

    def step(self) -> list[tuple[Member, BaseException | None]]:
        """One optimizer step for every member not ``paused`` (waiting on a decision about its last
        report); returns the members that left in it, with their error if any."""
        rows = [i for i, m in enumerate(self.members) if not m.paused]
        if not rows:
            return []
        whole = len(rows) == len(self.members)
        index = torch.tensor(rows, dtype=torch.long)
        take = (lambda d: d) if whole else (lambda d: {n: t[index] for n, t in d.items()})  # noqa: E731
        members = [self.members[i] for i in rows]
        cfg0 = members[0].config
        pcfg = cfg0.perturb
        idx = torch.stack([batch_indices(len(self.y), m.config.batch_size, m.config.seed, m.step) for m in members])
        x, y, z_t = self.features[idx], self.y[idx], self.z_t[idx]
        gens = [torch.Generator().manual_seed(m.config.seed * 1_000_003 + m.step) for m in members]
        s = self._scalars(rows)
        theta = {n: p.detach().requires_grad_(True) for n, p in take(self.theta).items()}
        m1, m2 = take(self.m), take(self.v)
        autocast = torch.autocast(device_type=y.device.type, dtype=DTYPES[cfg0.precision],
                                  enabled=cfg0.precision != "fp32")
        with autocast:
            out = packed_losses(theta, x, y, z_t, s, pcfg.kind, pcfg.norm, pcfg.steps, pcfg.step_scale,
                                cfg0.kd_direction, gens)
        values = torch.stack([t.detach().double() for t in out.values()], 1)  # [K, 4]
        grads = dict(zip(theta, torch.autograd.grad(out["loss"].sum(), list(theta.values()))))
        norms, coef = clip_coefficients(grads, s["clip"])
        adam_steps = self.adam_steps[index] + 1
        adamw_step(theta, grads, m1, m2, adam_steps, s["lr"], s["weight_decay"], coef)
        if whole:  # updated in place
            self.theta = {n: p.detach() for n, p in theta.items()}
        else:
            for n in self.theta:
                self.theta[n][index], self.m[n][index], self.v[n][index] = theta[n].detach(), m1[n], m2[n]
        self.adam_steps[index] = adam_steps

        left: list[tuple[Member, BaseException | None]] = []
        for k, (i, mem) in enumerate(zip(rows, members)):
            losses = dict(zip(out, values[k].tolist()))
            bad = next(((t, val) for t, val in losses.items() if not math.isfinite(val)), None)
            if bad is not None:  # as the solo loop: diverged at this step, before its update counts
                left.append((mem, Diverged(mem.step + 1, *bad)))
                continue
            mem.step += 1
            mem.losses = losses | {"grad_norm": float(norms[k])}
            try:
                if self._report(i, mem):
                    left.append((mem, None))
            except Exception as err:  # noqa: BLE001 - a member that raises leaves alone; the pack goes on
                left.append((mem, err))
        for mem, _ in left:
            self.remove(mem)
        return left

    def _report(self, i: int, mem: Member) -> bool:
        """Call ``mem.report`` where the solo loop would after this step; True when the member is done."""
        c, done = mem.config, mem.step
        if done < c.budget_steps:
            if done % c.log_every == 0:
                mem.report({"step": done, **mem.losses})
            if c.checkpoint_every and done % c.checkpoint_every == 0:
                student, opt = self.student_of(i)
                mem.report({"step": done, **mem.losses}, checkpoint=save_checkpoint(student, opt, done, self._dir(mem)))
            if done in {s for s in mem.eval_at if 0 < s < c.budget_steps}:
                student, _ = self.student_of(i)
                mem.report({"step": done, **evaluate_split(student, self.art, "val", c, self.device)[0]})
            return False
        student, opt = self.student_of(i)
        validation, _ = evaluate_split(student, self.art, "val", c, self.device)
        test, items = evaluate_split(student, self.art, "test", c, self.device)
        final = validation | {f"test_{k}": v for k, v in test.items()}
        ckpt = save_checkpoint(student, opt, c.budget_steps, self._dir(mem))
        (ckpt / EVAL_ITEMS).write_text(json.dumps({"label_names": self.art.splits.label_names, **items}))
        mem.report({"step": c.budget_steps, **mem.losses, **final}, checkpoint=ckpt)
        mem.final = final
        return True

    def _dir(self, mem: Member) -> Path:
        path = self.root / (mem.name or f"member-{id(mem)}")
        path.mkdir(parents=True, exist_ok=True)
        return path


def train_packed(members: Sequence[Member], artifacts: Artifacts,
                 checkpoint_root: str | Path | None = None) -> list[dict[str, float] | BaseException]:
    """Train ``members`` (one ``group_key``) as one pack until every one has left; returns each
    member's final metrics (as ``train_loop`` returns them) or the error it left with.

    Without ``checkpoint_root`` the checkpoints live in a temporary directory removed at the end,
    so ``report`` must take what it keeps of a checkpoint before it returns (as for train_loop)."""
    with tempfile.TemporaryDirectory(prefix="alignsweep-pack-") as tmp:
        pack = Pack(artifacts, Path(checkpoint_root or tmp), members[0].config.resolve_device() if members else "cpu")
        for mem in members:
            pack.add(mem)
        outcome: dict[int, dict[str, float] | BaseException] = {}
        while len(pack):
            for mem, err in pack.step():
                outcome[id(mem)] = err if err is not None else mem.final
        return [outcome[id(m)] for m in members]
