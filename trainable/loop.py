"""train_loop(config, report): the one training loop, readable top to bottom.

Features:
- student h_theta (linear | mlp | lora) on a frozen backbone, trained with
  L_total = w * L_KD + L_NR + lambda * ||grad_theta L_NR||^2 (trainable/losses.py);
- delta by gaussian / FGSM / PGD, L2 or Linf, in pooled-feature or input-embedding space;
- gradient clipping, AdamW, fp32 / bf16 autocast (fp16 + grad scaler on CUDA only);
- a compute budget in optimizer steps; checkpoints of theta, optimizer, grad-scaler and RNG
  state, and resume from one (loaded weights-only, strict on theta); data order and delta depend
  on the step alone, so a resumed run reproduces the uninterrupted one exactly;
- the frozen backbone stays in eval mode (no dropout) even while h_theta trains;
- inputs that cannot work (``validate_inputs``) refused with a ConfigError before any feature;
- data parallel across processes when torch.distributed is initialised (Ray Train
  TorchTrainer), optimising the same objective as one process: each rank takes an equal shard of
  the global batch, the gradient penalty is taken on the all-reduced gradient, epsilon's radius on
  the global batch, and a non-finite term on any rank stops every rank;
- a non-finite loss term raises ``Diverged`` naming the step and the term;
- the fixed evaluation (DESIGN §4) on validation, reported under the plain metric names (what a
  searcher selects on, also at early-stopping rungs), and on test as ``test_<name>`` (the report).

It knows nothing of Ray Tune or MLflow: progress and checkpoints go through
``report(metrics, checkpoint=None)``, which the caller provides.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainable import backbone as bb
from trainable.config import TrainConfig
from trainable.data import TextSplits, checked_splits
from trainable.data import validate_inputs  # noqa: F401  (re-exported; import it from trainable.data to skip torch)
from trainable.losses import unified_loss
from trainable.losses import distill_loss
from trainable.methods import enchtable_merge, hybrid_target, hybrid_weights, linearised_fit, sot_stage
from trainable.metrics import evaluate
from trainable.perturb import Shard, make_delta
from trainable.teacher import teacher_logits

Report = Callable[..., None]
EVAL_ITEMS = "eval_items.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Diverged(RuntimeError):
    """A loss term became NaN or infinite."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"diverged at step {step}: {term} = {value}")
        self.step, self.term, self.value = step, term, value


@dataclass
class Artifacts:
    """What every trial of a sweep shares: splits, model inputs and teacher logits per split."""

    splits: TextSplits
    inputs: dict[str, dict[str, torch.Tensor]]  # split -> {"features"} and/or {"input_ids", "attention_mask"}
    teacher: dict[str, torch.Tensor]  # split -> z_T
    labels: dict[str, torch.Tensor]

    @property
    def key(self) -> str:
        return self.splits.content_hash


def artifact_key(config: TrainConfig) -> str:
    """What identifies a config's shared artifacts without building them: the fields that shape
    splits, features or teacher logits (data, backbone, its weights' dtype, pooling, teacher).
    Trials whose configs share this key share one ``Artifacts``; the rest of the config only shapes
    training. (``features`` says where features are computed, never what they are: not a part.)"""
    shaping = config.model_dump(mode="json", include={"data", "backbone", "backbone_dtype", "pooling", "teacher"})
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def prepare_artifacts(config: TrainConfig, device: str = "cpu") -> Artifacts:
    """Splits, frozen-backbone features and teacher logits, each cached on disk by content hash.

    The inputs are checked first (``validate_inputs``), so data that cannot work is refused
    before any feature is computed, however the loop was reached."""
    cache = config.resolved_cache_dir()
    splits = checked_splits(config)
    feats = bb.cached_features(config.backbone, config.pooling, config.data.max_len, splits.texts, cache, device,
                               dtype=config.backbone_dtype, features=config.features)
    inputs = {split: {"features": f} for split, f in feats.items()}
    if splits.reference_texts:  # its own cache entry: the splits' features keep their key
        inputs["reference"] = bb.cached_features(config.backbone, config.pooling, config.data.max_len,
                                                 {"reference": splits.reference_texts}, cache, device,
                                                 dtype=config.backbone_dtype, features=config.features)
        inputs["reference"] = {"features": inputs["reference"]["reference"]}
    z_t = teacher_logits(config, splits.texts, splits.clean_train_labels, splits.num_classes, splits.teacher_column, device)
    labels = {s: torch.tensor(v) for s, v in splits.labels.items()}
    for split in ("val", "test"):
        labels[f"{split}_noisy"] = labels[split]
    return with_tokens(Artifacts(splits, inputs, z_t, labels), config)


def with_tokens(art: Artifacts, config: TrainConfig) -> Artifacts:
    """``art`` with token ids beside the features when the config runs the backbone in the loop
    (LoRA, embedding-space perturbations). Tokenizing needs only the tokenizer, so a trial that
    received feature-only artifacts from the driver adds them itself without rebuilding anything."""
    if not config.needs_backbone_in_loop() or "input_ids" in art.inputs["train"]:
        return art
    tokenizer = bb.load_tokenizer(config.backbone)  # the model itself is loaded once, in train_loop
    inputs = {split: {**art.inputs[split], **bb.tokenize(tokenizer, texts, config.data.max_len)}
              for split, texts in art.splits.texts.items()}
    inputs.update({k: v for k, v in art.inputs.items() if k not in inputs})  # the harmful reference's features
    return Artifacts(art.splits, inputs, art.teacher, art.labels)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The batch of optimizer step ``step``: a function of (seed, step) alone, so resume is exact."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


def rng_state() -> dict[str, object]:
    """The global torch RNG streams (CPU, and every CUDA device when present)."""
    state: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    """Restore ``rng_state()``; the states go back to the CPU first, as torch requires."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(student: bb.Student, opt: torch.optim.Optimizer, step: int, root: Path,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """theta (never the frozen backbone), optimizer, grad scaler and RNG state after ``step`` steps.

    The loop draws its batches and deltas from generators seeded by the step, so the RNG state is
    not needed today; saving it keeps resume exact should anything draw from the global stream."""
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    state = {"student": student.trainable_state(), "optimizer": opt.state_dict(), "step": step,
             "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state()}
    bb.atomic_save(state, path / "state.pt")
    return path


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint directory was saved at."""
    return int(torch.load(Path(path) / "state.pt", weights_only=True)["step"])


def double_backprop_attention(needed: bool) -> contextlib.AbstractContextManager:
    """The math attention kernel when the gradient penalty differentiates twice through the backbone.

    With LoRA, theta lives inside the encoder, so ||grad_theta L_NR||^2 needs a second derivative of
    attention. The fused kernel an eval-mode encoder picks has none (on CPU: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the backbone's
    dropout used to steer SDPA to the math kernel, which is made of ordinary ops."""
    if not needed:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def train_step(config: TrainConfig, student: bb.Student, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batch: dict[str, torch.Tensor], y: torch.Tensor, z_t: torch.Tensor, step: int,
               world: int = 1, item_weights: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Optimizer step ``step`` on one batch: L_total = w * L_KD + L_NR + lambda * ||grad_theta L_NR||^2,
    then clipping and AdamW. delta depends on (seed, step) alone. Returns every loss term and the
    gradient norm; raises ``Diverged`` on a non-finite term.

    ``world`` > 1 (torch.distributed initialised): the batch is this rank's rows of the global batch
    (``Shard.rows``) and the step is the one world=1 takes on the whole global batch: delta's radius
    and noise, the gradient penalty (on the all-reduced gradient) and the returned terms are the
    global batch's, and a non-finite term on any rank raises ``Diverged`` on every rank.

    An enabled grad scaler (fp16) scales the penalty's gradients too (``gradient_penalty``). A
    non-finite penalty while its scale is above 1 is then an overflow of the scaled gradients, not
    divergence: the scaler skips the step and lowers its scale, as for any overflowing gradient.

    ``item_weights``: the batch's rows of a method's per-item tensors (``method_stage``), passed on to
    ``unified_loss`` (sample_weight, kd_weight, kd_target)."""
    terms, pcfg = config.terms(), config.perturb
    space = pcfg.space
    shard = Shard(dist.get_rank(), world) if world > 1 else Shard()
    params = [p for p in student.parameters() if p.requires_grad]
    student.train()  # h_theta only: the frozen backbone stays in eval mode (Student.train)
    autocast = torch.autocast(device_type=y.device.type, dtype=DTYPES[config.precision],
                              enabled=config.precision != "fp32")
    grad_scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    with double_backprop_attention(student.trains_encoder and terms["lambda_reg"] > 0), autocast:
        x = student.represent(batch, space)
        z_s = student.classify(x, batch, space)
        z_s_perturbed = None
        if terms["alpha"] < 1.0:  # the perturbed CE term is live: build delta, then f(x + delta)
            attack_loss = lambda xp: F.cross_entropy(student.classify(xp, batch, space).float(), y)  # noqa: E731
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            delta = make_delta(pcfg.kind, attack_loss, x.detach(), config.epsilon, pcfg.norm, pcfg.steps,
                               pcfg.step_scale, gen, shard)
            z_s_perturbed = student.classify(x + delta, batch, space)
        out = unified_loss(z_s, z_s_perturbed, z_t, y, params, tau=config.tau, kd_direction=config.kd_direction,
                           grad_scale=grad_scale, world=world, **terms, **(item_weights or {}))
    # float64: a sum over ranks of finite float32 terms cannot overflow, so it is finite iff every rank's is
    values = torch.stack([v.detach().double() for v in out.values()])
    if world > 1:  # one collective gives every rank the global means and the same verdict below
        dist.all_reduce(values)
        values /= world
    losses = dict(zip(out, values.tolist()))
    for term, value in losses.items():
        scaled_overflow = grad_scale > 1.0 and term in ("l_reg", "loss")  # l_kd and l_nr are still checked
        if not math.isfinite(value) and not scaled_overflow:
            raise Diverged(step + 1, term, value)

    opt.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    if world > 1:  # explicit gradient averaging: DDP hooks do not cover double backprop cleanly
        for p in params:  # SUM then divide: gloo (CPU) has no AVG
            dist.all_reduce(p.grad)
            p.grad /= world
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm or math.inf)
    scaler.step(opt)
    scaler.update()
    return losses | {"grad_norm": grad_norm.item()}


def base_logits(config: TrainConfig, art: Artifacts, device: str = "cpu") -> torch.Tensor:
    """hybrid's base model on the train split: the plain-CE student (``method: ce``, with this config's
    head, seed, budget and the same, possibly poisoned, data) trained by ``train_step`` in this process.
    Returns its logits on every train item."""
    base = config.model_copy(update={"method": "ce"})
    to_dev = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    train, y_train, z_t = to_dev(art.inputs["train"]), art.labels["train"].to(device), art.teacher["train"].to(device)
    torch.manual_seed(config.seed)
    student = bb.build_student(config.head, config.head_hidden, train["features"].shape[1], art.splits.num_classes,
                               None, config.lora_rank).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for step in range(config.budget_steps):
        idx = batch_indices(len(y_train), config.batch_size, config.seed, step)
        train_step(base, student, opt, scaler, {k: v[idx] for k, v in train.items()}, y_train[idx], z_t[idx], step)
    student.eval()
    with torch.no_grad():
        return student(train).float()


def method_stage(config: TrainConfig, art: Artifacts, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The stage a method runs before training, as per-train-item tensors (trainable/methods.py):
    sot's sample weights (or its top-K ``rows``); hybrid's KD weights and target. Empty for every
    other method. Deterministic, so each data-parallel rank, and a resumed run, computes the same one."""
    clean = torch.tensor(art.splits.clean_train_labels)
    if config.method == "hybrid":
        h, z_t = config.hybrid, art.teacher["train"].to(device)
        return {"kd_weight": hybrid_weights(base_logits(config, art, device), z_t, h.kappa, h.temperature),
                "kd_target": hybrid_target(z_t, config.tau, art.splits.trusted, clean[art.splits.trusted].to(device),
                                           h.beta)}
    if config.method != "sot":
        return {}
    s, names = config.sot, art.splits.label_names
    return sot_stage(art.inputs["train"]["features"], art.labels["train"], art.splits.trusted,
                     clean[art.splits.trusted], art.inputs["reference"]["features"], names.index("benign"),
                     art.splits.num_classes, s.push, s.reg, s.temperature, s.label_scale, s.steps, s.top_k)


def merge_safety_vector(config: TrainConfig, student: bb.Student, theta0: dict[str, torch.Tensor], art: Artifacts,
                        device: str = "cpu") -> None:
    """enchtable's stage after training: merge a safety vector into the trained (task) head, in place.

    theta_aligned and theta_harmful are trained from theta_0 (the task head's own init) in NTK-linearised
    form for ``budget_steps`` full-batch steps: theta_aligned by distillation (tau) from the teacher on the
    trusted items, theta_harmful by CE toward the benign label on the harmful reference. Then
    ``enchtable_merge`` with the task head's theta."""
    e, head = config.enchtable, student.head
    trusted = art.splits.trusted
    x_safe, z_safe = art.inputs["train"]["features"][trusted].to(device), art.teacher["train"][trusted].to(device)
    x_harm = art.inputs["reference"]["features"].to(device)
    benign = torch.full((len(x_harm),), art.splits.label_names.index("benign"), device=device)
    aligned = linearised_fit(head, theta0, x_safe, lambda z: distill_loss(z, z_safe, config.tau),
                             config.budget_steps, config.lr)
    harmful = linearised_fit(head, theta0, x_harm, lambda z: F.cross_entropy(z.float(), benign),
                             config.budget_steps, config.lr)
    task = {n: p.detach() for n, p in head.named_parameters()}
    merged = enchtable_merge(theta0, task, aligned, harmful, e.beta, e.keep, e.interference_scale)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(merged[name])


def train_loop(config: TrainConfig, report: Report, resume_from: str | Path | None = None,
               checkpoint_root: str | Path | None = None, artifacts: Artifacts | None = None,
               eval_at: Sequence[int] = ()) -> dict[str, float]:
    """Train one student; returns the final metrics: every DESIGN §4 metric on validation under its
    plain name (what a searcher selects on) and on test as ``test_<name>`` (the held-out report).

    ``eval_at``: optimizer steps below ``budget_steps`` at which validation is also evaluated and
    reported (``report({"step": s, **validation metrics})``): early-stopping rungs. Cheap on cached
    features: one pass over the validation split, clean, attacked and noisy-text.

    ``report(metrics, checkpoint=None)`` must take what it keeps of a checkpoint before it returns
    (``tune.report`` / ``ray.train.report`` copy it into run storage): without ``checkpoint_root``
    the checkpoints live in a temporary directory that is removed when the loop ends, so a
    thousand-trial sweep does not fill the node's /tmp.
    """
    if checkpoint_root is not None:
        return _train(config, report, resume_from, Path(checkpoint_root), artifacts, eval_at)
    with tempfile.TemporaryDirectory(prefix="alignsweep-ckpt-") as tmp:
        return _train(config, report, resume_from, Path(tmp), artifacts, eval_at)


def evaluate_split(student: bb.Student, art: Artifacts, split: str, config: TrainConfig,
                   device: str) -> tuple[dict[str, float], dict[str, list]]:
    """The fixed evaluation (DESIGN §4) of ``student`` on ``split`` ("val" or "test")."""
    to_dev = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    hard = torch.tensor(art.splits.hard[split], device=device) if any(art.splits.hard.get(split, [])) else None
    return evaluate(student, to_dev(art.inputs[split]), to_dev(art.inputs[f"{split}_noisy"]),
                    art.labels[split].to(device), art.teacher[split].to(device), config.eval_attack,
                    art.splits.label_names, hard)


def _train(config: TrainConfig, report: Report, resume_from: str | Path | None, ckpt_root: Path,
           artifacts: Artifacts | None, eval_at: Sequence[int]) -> dict[str, float]:
    device = config.resolve_device()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    art = with_tokens(artifacts, config) if artifacts is not None else prepare_artifacts(config, device)
    torch.manual_seed(config.seed)  # after preparing: a teacher fine-tune on a cache miss reseeds the global RNG
    to_dev = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    train, y_train, z_t_train = to_dev(art.inputs["train"]), art.labels["train"].to(device), art.teacher["train"].to(device)

    # Student: h_theta on cached features, or on the backbone itself when it must run in the loop.
    encoder = bb.Encoder(bb.load_backbone(config.backbone)[1], config.pooling) if config.needs_backbone_in_loop() else None
    in_dim = art.inputs["train"]["features"].shape[1]
    student = bb.build_student(config.head, config.head_hidden, in_dim, art.splits.num_classes, encoder, config.lora_rank).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
    theta0 = {n: p.detach().clone() for n, p in student.head.named_parameters()}  # enchtable's theta_0: the init
    start = 0
    if resume_from is not None:
        state = torch.load(Path(resume_from) / "state.pt", weights_only=True, map_location=device)
        student.load_trainable_state(state["student"])
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when saved by a disabled (non-fp16) scaler
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:  # absent from checkpoints written before it was saved
            set_rng_state(state["rng"])
        start = int(state["step"])

    # A method's stage before training: per-item weights (sot, hybrid), or the rows it keeps (sot top_k).
    stage = {k: v.to(device) for k, v in method_stage(config, art, device).items()}
    if "rows" in stage:
        rows = stage.pop("rows")
        train, y_train, z_t_train = {k: v[rows] for k, v in train.items()}, y_train[rows], z_t_train[rows]
        stage = {k: v[rows] for k, v in stage.items()}

    rungs = {s for s in eval_at if 0 < s < config.budget_steps}
    losses: dict[str, float] = {}
    for step in range(start, config.budget_steps):
        idx = Shard(rank, world).rows(batch_indices(len(y_train), config.batch_size, config.seed, step))
        batch, y, z_t = {k: v[idx] for k, v in train.items()}, y_train[idx], z_t_train[idx]
        losses = train_step(config, student, opt, scaler, batch, y, z_t, step, world,
                            {k: v[idx] for k, v in stage.items()})
        done = step + 1
        if done % config.log_every == 0 and done < config.budget_steps:
            report({"step": done, **losses})
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.budget_steps:
            report({"step": done, **losses}, checkpoint=save_checkpoint(student, opt, done, ckpt_root, scaler))
        if done in rungs:  # after the checkpoint: a trial stopped here still resumes from this step
            report({"step": done, **evaluate_split(student, art, "val", config, device)[0]})

    if config.method == "enchtable" and start < config.budget_steps:  # a final checkpoint is already merged
        merge_safety_vector(config, student, theta0, art, device)
    validation, _ = evaluate_split(student, art, "val", config, device)
    test, items = evaluate_split(student, art, "test", config, device)
    final = validation | {f"test_{k}": v for k, v in test.items()}
    final_ckpt = save_checkpoint(student, opt, config.budget_steps, ckpt_root, scaler)
    # Per-item test outcomes beside the weights: figures bootstrap test metrics over them.
    (final_ckpt / EVAL_ITEMS).write_text(json.dumps({"label_names": art.splits.label_names, **items}))
    report({"step": config.budget_steps, **losses, **final}, checkpoint=final_ckpt)
    return final
