"""TrainConfig: the single source of every knob of the trainer, validated at the edge.

Everything a user can set (CLI ``--set a.b=value``, a YAML file, a sweep's search space)
lands here first. Bad input raises :class:`ConfigError` with one line that names the field
and what it accepts, before any model, data or cluster work starts.
"""

from __future__ import annotations

import io
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

# There is no model hub here, and on a cluster a hub lookup is a slow, silent network wait:
# fail fast unless the user opts in by setting HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])

BUILTIN_DATASETS = ("safety", "sentiment")
BUILTIN_BACKBONES = ("all-MiniLM-L6-v2",)
FINETUNE_MAX_PARAMS = 1_000_000_000
"""Above this many backbone parameters `teacher.source: finetune` is refused: the teacher is
fine-tuned end to end in the sweep's driver (fp32 weights + AdamW state is ~16 bytes per
parameter before activations, ~16 GB at 1B), which is not what anyone wants for an LLM."""
DATA_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


class ConfigError(ValueError):
    """A user-facing configuration error: one line, naming the field and what it accepts."""


def hub_offline() -> bool:
    """Whether the model hub is off limits: the one parse of HF_HUB_OFFLINE in this package.

    Unset means offline (see above); only 0/false/no/empty opt in. huggingface_hub itself reads
    1/on/yes/true as offline and anything else as online, so wherever the two disagree ("off",
    "2") this one is the stricter: whenever it says online, the hub client agrees."""
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no", "")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALIGNSWEEP_CACHE", Path.home() / ".cache" / "alignsweep"))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(StrictModel):
    name: str = "safety"
    """A built-in recipe (safety, sentiment), a local csv/json/jsonl/parquet file, or a hub id (online only)."""
    text_column: str = "text"
    label_column: str = "label"
    source_column: str | None = None
    """Optional column naming each item's source; `shift` holds one source out as the test split."""
    split_seed: int = 0
    label_noise: float = Field(0.0, ge=0.0, lt=0.5)
    """Fraction of train labels flipped to another class (validation and test stay clean)."""
    shift: str | None = None
    """Hold this source out: train/val on the other sources, test on it (distribution shift)."""
    text_noise: float = Field(0.1, ge=0.0, le=1.0)
    """Per-character noise rate of the fixed noisy copy of the test texts (DESIGN §4)."""
    max_len: int = Field(64, ge=8, le=512)
    encoding: str = "utf-8"
    """Text encoding of a local csv/json/jsonl file (parquet is UTF-8 by definition): any Python codec name."""
    poison_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of the harmful train prompts outside the trusted set relabelled benign (poisoned fine-tuning
    data). The teacher is trained on the clean labels; validation and test stay clean. Needs 'benign' and
    'harmful' classes."""
    trusted_size: int = Field(64, ge=0)
    """Train items verified clean (seeded choice, at most a quarter of train): never poisoned, and the methods read their clean labels
    (the safe anchor of sot, the aligned head of enchtable, the hybrid target of hybrid). Label noise is still
    drawn over every train item, as before, so that knob means what it meant."""
    harmful_reference: int | None = Field(None, ge=0)
    """Harmful prompts held out of every split, paired with the benign label: the behaviour to avoid (sot's
    push, enchtable's harmful head). None: on `safety` up to 256 harmful prompts the surface matching left
    out, elsewhere none; N: N harmful items held out before splitting (on `safety`, N of those left out)."""

    @field_validator("encoding")
    @classmethod
    def _encoding_known(cls, encoding: str) -> str:
        try:
            io.TextIOWrapper(io.BytesIO(), encoding=encoding)  # what open() checks: a text codec (not base64)
        except LookupError:
            raise ValueError(f"'{encoding}' is not a text encoding Python knows; allowed: a codec name such as "
                             "utf-8, latin-1, cp1252, utf-16") from None
        return encoding

    @field_validator("name")
    @classmethod
    def _dataset_exists(cls, name: str) -> str:
        if name in BUILTIN_DATASETS:
            return name
        path = Path(name).expanduser()
        looks_like_file = path.suffix in DATA_FILE_SUFFIXES or os.sep in name
        allowed = f"{', '.join(BUILTIN_DATASETS)}, a local {'/'.join(DATA_FILE_SUFFIXES)} file, or a hub id when online"
        if looks_like_file:
            if not path.is_file():
                raise ValueError(f"dataset file '{name}' does not exist; allowed: {allowed}")
            if path.suffix not in DATA_FILE_SUFFIXES:
                raise ValueError(f"unsupported file type '{path.suffix}'; allowed: {allowed}")
        elif hub_offline():
            raise ValueError(f"'{name}' is not a built-in dataset and the hub is offline (HF_HUB_OFFLINE=1); allowed: {allowed}")
        return name


class PerturbConfig(StrictModel):
    """How delta is built for the noise-robust term (DESIGN §3)."""

    kind: Literal["gaussian", "fgsm", "pgd"] = "pgd"
    norm: Literal["l2", "linf"] = "l2"
    space: Literal["features", "embeddings"] = "features"
    steps: int = Field(3, ge=1, le=100)
    step_scale: float = Field(2.5, gt=0.0)
    """PGD step size = step_scale * epsilon / steps (Madry et al.'s 2.5 eps / k)."""


class EvalAttackConfig(PerturbConfig):
    """The fixed evaluation attack of DESIGN §4: the same for every trial of a sweep."""

    steps: int = Field(10, ge=1, le=100)
    epsilon: float = Field(0.05, ge=0.0)


class TeacherConfig(StrictModel):
    source: Literal["finetune", "model", "column"] = "finetune"
    """finetune: the backbone fine-tuned end to end on train; model: a local HF classifier; column: logits in the data."""
    path: str | None = None
    column: str | None = None
    epochs: int = Field(3, ge=1)
    lr: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _source_inputs(self) -> TeacherConfig:
        if self.source == "model" and not (self.path and Path(self.path).is_dir()):
            raise ValueError(f"source=model needs path= a local model directory (got {self.path!r})")
        if self.source == "column" and not self.column:
            raise ValueError("source=column needs column= the name of a logits/probabilities column")
        return self


class FeaturesConfig(StrictModel):
    """Where the frozen backbone's pooled features are computed (never what they are: the cache
    key ignores these fields, and both paths give the same features for the same dtype).

    In this process (the driver), or as a Ray Data ``map_batches`` over an actor pool when Ray
    is initialised in this process and the job is large. Large means an estimated forward cost,
    2 x backbone parameters x texts x max_len FLOPs, of at least ``large_tflops``: the built-in
    sets through MiniLM are ~5 TFLOP, through an 8B LLM ~2,000."""

    actors: int | Literal["auto"] = "auto"
    """auto: one actor per GPU of the cluster for a large job when the cluster has GPUs, else this
    process; 0: always this process; N: N actors whenever Ray is initialised (forces Ray Data)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """With an explicit `actors`, what each actor takes: cuda (one GPU), cpu (one CPU); auto: cuda when
    the cluster has GPUs when extraction starts (set cuda for GPU nodes an autoscaler has yet to add)."""
    large_tflops: float = Field(100.0, ge=0.0)
    """`actors: auto` takes the Ray Data path from this estimated forward cost up (TFLOP)."""
    batch_size: int = Field(64, ge=1)
    """Texts per forward pass, in this process and in each actor."""
    shard_texts: int = Field(256, ge=1)
    """Texts per Ray Data shard: one cache file each, so an interrupted extraction resumes by shard."""

    @field_validator("actors", mode="before")
    @classmethod
    def _actors_known(cls, actors: Any) -> int | str:
        """One message for every bad value (a union would report one error per member)."""
        if actors == "auto" or (isinstance(actors, int) and not isinstance(actors, bool) and actors >= 0):
            return actors
        raise ValueError(f"must be auto, 0 (this process) or a number of Ray Data actors >= 1 (got {actors!r})")


Method = Literal["ckt_ro", "ce", "kd", "adv", "sot", "hybrid", "enchtable"]
NEEDS_REFERENCE = ("sot", "enchtable")
"""Methods that need the harmful reference (data.harmful_reference) and trusted items (data.trusted_size)."""
PACKED_METHODS = ("ckt_ro", "ce", "kd", "adv")
"""The methods a pack trains (trainable/packed.py): the unified loss with terms switched off."""
Precision = Literal["fp32", "bf16", "fp16"]


class SotConfig(StrictModel):
    """Safety Optimal Transport sample weights (trainable/methods.sot_weights)."""

    push: float = Field(0.5, ge=0.0)
    """lambda: weight of the push away from the harmful reference."""
    reg: float = Field(0.05, gt=0.0)
    """eps: entropic regularisation of each OT term, relative to the mean transport cost."""
    temperature: float = Field(0.1, gt=0.0)
    """tau: weight of KL(w || uniform), which keeps w from collapsing on a few items."""
    top_k: int | None = Field(None, ge=1)
    """Keep only the K heaviest items (uniformly weighted); None: weight every item's CE and KD terms by n * w_i."""
    label_scale: float = Field(1.0, ge=0.0)
    """c in z = [phi(x); c * onehot(y)], relative to the features' RMS norm."""
    steps: int = Field(100, ge=1)
    """Adam steps on the weights' logits."""


class HybridConfig(StrictModel):
    """Incomplete-learning completion (trainable/methods.hybrid_weights)."""

    kappa: float = Field(1.0, ge=0.0)
    """w_i = 1 + kappa * sigmoid(-Delta_i / T) on the distillation term."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """Hybrid target beta * p_teacher + (1 - beta) * onehot(trusted label) on trusted items."""
    temperature: float = Field(1.0, gt=0.0)
    """T of the adaptive weight."""


class EnchTableConfig(StrictModel):
    """Safety-vector merge into the task head (trainable/methods.enchtable_merge)."""

    beta: float = Field(0.1, ge=0.0)
    """alpha = beta * ||tau_t|| / ||tau_s|| per weight matrix (0: the task head, unchanged)."""
    keep: float = Field(0.5, gt=0.0, le=1.0)
    """gamma: the fraction of singular components of tau_t and alpha * tau_s kept for the interference."""
    interference_scale: float = Field(200.0, ge=0.0)
    """I = scale * ||(U^T U - I) diag(S) (V^T V - I)||_1 / k^2 (the reference code's 200)."""


class TrainConfig(StrictModel):
    """One trial of contrastive knowledge transfer + robust optimization (DESIGN §3)."""

    method: Method = "ckt_ro"
    """ckt_ro: the full method; baselines switch terms off: ce (w=0, alpha=1, lambda=0), kd (alpha=1), adv (w=0);
    sot: the full method on OT sample weights; hybrid: the full method with adaptive KD weights toward a hybrid
    target; enchtable: a plain-CE task head with a safety vector merged in after training."""
    backbone: str = "all-MiniLM-L6-v2"
    pooling: Literal["mean", "cls", "last"] = "mean"
    """mean: masked mean (sentence encoders); cls: the first token; last: the last non-pad token
    (decoder-only LLMs, where it is the only token that has seen the whole text)."""
    backbone_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Weights of the frozen backbone while features are computed; auto: bf16 on CUDA, fp32 on CPU."""
    features: FeaturesConfig = FeaturesConfig()
    head: Literal["linear", "mlp", "lora"] = "mlp"
    head_hidden: int = Field(256, ge=1)
    lora_rank: int = Field(8, ge=1)
    teacher: TeacherConfig = TeacherConfig()
    tau: float = Field(2.0, gt=0.0)
    distill_weight: float = Field(1.0, ge=0.0)
    kd_direction: Literal["forward", "reverse"] = "forward"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    epsilon: float = Field(0.1, ge=0.0)
    """Training perturbation budget, relative to the RMS norm of the perturbed tensor."""
    perturb: PerturbConfig = PerturbConfig()
    lambda_reg: float = Field(0.01, ge=0.0)
    clip_grad_norm: float | None = Field(1.0, gt=0.0)
    precision: Precision = "fp32"
    budget_steps: int = Field(200, ge=1)
    """Compute budget, in optimizer steps."""
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    data: DataConfig = DataConfig()
    sot: SotConfig = SotConfig()
    hybrid: HybridConfig = HybridConfig()
    enchtable: EnchTableConfig = EnchTableConfig()
    eval_attack: EvalAttackConfig = EvalAttackConfig()
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only the final one)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str | None = None

    @field_validator("backbone")
    @classmethod
    def _backbone_is_local(cls, backbone: str) -> str:
        if backbone in BUILTIN_BACKBONES:
            return backbone
        if Path(backbone).expanduser().is_dir():
            # a directory that is not a model fails deep inside transformers otherwise, after the data is built
            from trainable.model_files import model_type

            try:
                kind = model_type(Path(backbone).expanduser())
            except (ValueError, OSError) as err:
                raise ValueError(f"'{backbone}/config.json' does not read as JSON ({err}); allowed: "
                                 f"{', '.join(BUILTIN_BACKBONES)} or a Hugging Face model directory") from None
            if not kind:
                raise ValueError(f"'{backbone}' is a directory but not a Hugging Face model (no config.json with a "
                                 f"model_type); allowed: {', '.join(BUILTIN_BACKBONES)} or a model directory "
                                 "(config.json, weights, tokenizer)")
            return backbone
        if hub_offline():
            raise ValueError(
                f"'{backbone}' is not a local model directory and the hub is offline (HF_HUB_OFFLINE=1); "
                f"allowed: {', '.join(BUILTIN_BACKBONES)} or a local directory"
            )
        return backbone

    @field_validator("pooling")
    @classmethod
    def _pooling_fits_backbone(cls, pooling: str, info: ValidationInfo) -> str:
        """``cls`` on a decoder-only model is position 0 (its BOS token), which attends to nothing
        after itself: every text would get the same feature vector. Refuse it rather than train on that."""
        backbone = info.data.get("backbone")
        if pooling == "cls" and backbone and Path(backbone).expanduser().is_dir():
            from trainable.model_files import is_decoder_only, model_type

            if is_decoder_only(Path(backbone).expanduser()):
                raise ValueError(f"'cls' is the first token of the decoder-only backbone "
                                 f"({model_type(Path(backbone).expanduser())}), which sees no other token, so every "
                                 "text would get the same features; allowed for this backbone: last, mean")
        return pooling

    @field_validator("teacher")
    @classmethod
    def _teacher_fits_backbone(cls, teacher: TeacherConfig, info: ValidationInfo) -> TeacherConfig:
        """Refuse fine-tuning an LLM-sized backbone as the teacher up front, not hours into the driver."""
        backbone = info.data.get("backbone")
        if teacher.source != "finetune" or not backbone or not Path(backbone).expanduser().is_dir():
            return teacher
        from trainable.model_files import parameter_count

        params = parameter_count(Path(backbone).expanduser()) or 0
        if params > FINETUNE_MAX_PARAMS:
            raise ValueError(f"source 'finetune' would fine-tune all {params / 1e9:.1f}B parameters of the backbone in "
                             f"the driver (limit {FINETUNE_MAX_PARAMS / 1e9:.0f}B); allowed at this size: "
                             "source: model (path: a fine-tuned classifier directory) or source: column (logits in the data)")
        return teacher

    @model_validator(mode="after")
    def _method_inputs(self) -> TrainConfig:
        """What sot, hybrid and enchtable need, refused here rather than after the features are built."""
        if self.method in NEEDS_REFERENCE:
            if self.data.trusted_size < 1:
                raise ValueError(f"method: '{self.method}' needs trusted items (its safe anchor); allowed: "
                                 "data.trusted_size >= 1")
            if self.data.harmful_reference == 0 or (self.data.harmful_reference is None and self.data.name != "safety"):
                raise ValueError(f"method: '{self.method}' needs harmful reference prompts held out of every split; "
                                 f"allowed: data.harmful_reference >= 1 (data '{self.data.name}' has none by default)")
        if self.method in ("sot", "hybrid", "enchtable") and self.head == "lora":
            raise ValueError(f"method: '{self.method}' works on a head over cached features; allowed heads: linear, mlp")
        return self

    # -- derived views -------------------------------------------------------------------

    def terms(self) -> dict[str, float]:
        """The loss weights after the method switches its terms off (DESIGN §3 baselines)."""
        w, alpha, lam = self.distill_weight, self.alpha, self.lambda_reg
        if self.method == "ce":
            w, alpha, lam = 0.0, 1.0, 0.0
        elif self.method == "kd":
            alpha = 1.0
        elif self.method == "adv":
            w = 0.0
        elif self.method == "enchtable":  # the downstream (task) head is a plain fine-tune; the merge adds safety
            w, alpha, lam = 0.0, 1.0, 0.0
        return {"distill_weight": w, "alpha": alpha, "lambda_reg": lam}

    def unpackable(self) -> str | None:
        """Why this config cannot train in a pack (trainable/packed.py), naming the field and the values a
        pack allows; None when it can."""
        if self.method not in PACKED_METHODS:
            return (f"method: '{self.method}' runs a stage of its own before or after training; allowed in a pack: "
                    f"{', '.join(PACKED_METHODS)}")
        if self.head not in ("linear", "mlp"):
            return f"head: '{self.head}' trains inside the backbone; allowed in a pack: linear, mlp"
        if self.needs_backbone_in_loop():
            return ("perturb.space / eval_attack.space: 'embeddings' runs the backbone in the loop; allowed in a "
                    "pack: features")
        if self.precision == "fp16":
            return "precision: 'fp16' needs a grad scaler per member; allowed in a pack: fp32, bf16"
        return None

    def needs_backbone_in_loop(self) -> bool:
        """Cached features suffice unless the backbone itself is trained or perturbed."""
        return self.head == "lora" or self.perturb.space == "embeddings" or self.eval_attack.space == "embeddings"

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def check_workers(self, workers: int, field: str = "workers", batch_field: str = "batch_size") -> None:
        """Refuse a data-parallel launch whose batches cannot split evenly: the loop's objective
        is the mean over the global batch, which equals the mean of the ranks' means only for
        equal shards (trainable/perturb.Shard). ``field``/``batch_field`` name the knobs as the
        user wrote them (``--workers``, or a spec's ``resources.workers_per_trial``/``train.batch_size``)."""
        if workers > 1 and self.batch_size % workers:
            raise ConfigError(f"{batch_field}: {self.batch_size} does not split evenly over {field}={workers}; "
                              f"allowed: a multiple of {workers}")

    def resolve_device(self) -> str:
        """Pick the device and refuse precisions it cannot run, before any work starts."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but no CUDA device is visible; allowed here: auto, cpu")
        if self.precision == "fp16" and device != "cuda":
            raise ConfigError("precision: fp16 needs a CUDA device (autocast + grad scaler); allowed on cpu: fp32, bf16")
        return device


# -- loading, overrides and one-line errors --------------------------------------------------


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=fp16"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set: expected key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: '{key}' overrides a value set earlier in the same command")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel], Any]:
    """Walk a pydantic error location down nested models; returns (owner model, field info)."""
    owner, info = model, None
    for part in loc:
        if not isinstance(part, str) or owner is None:
            break
        info = owner.model_fields.get(part)
        if info is None:
            return owner, None
        ann = info.annotation
        owner = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return owner, info


def _allowed(info: Any) -> str | None:
    """The allowed values of a field: Literal choices or a numeric range."""
    if info is None:
        return None
    choices = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    if typing.get_origin(info.annotation) is Literal:
        return ", ".join(map(str, choices))
    bounds = {type(m).__name__: m for m in info.metadata}
    lo = next((f"{op}{getattr(bounds[k], k.lower())}" for k, op in (("Ge", ">= "), ("Gt", "> ")) if k in bounds), None)
    hi = next((f"{op}{getattr(bounds[k], k.lower())}" for k, op in (("Le", "<= "), ("Lt", "< ")) if k in bounds), None)
    if lo or hi:
        return " and ".join(x for x in (lo, hi) if x)
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: ``field: what is wrong (got X); allowed: ...``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p != "__root__")
        field = ".".join(map(str, loc)) or model.__name__
        if e["type"] == "extra_forbidden":
            owner, _ = _field_at(model, loc[:-1]) if len(loc) > 1 else (model, None)
            names = ", ".join(sorted(owner.model_fields)) if owner else "?"
            lines.append(f"{field}: unknown key; allowed keys: {names}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if not loc and msg.split(":")[0] in model.model_fields:  # a model validator naming its own field
            lines.append(msg)
            continue
        got = e.get("input")
        owner, info = _field_at(model, loc)
        allowed = _allowed(info)
        text = f"{field}: {msg[0].lower()}{msg[1:]}"
        if e["type"] != "value_error" and not isinstance(got, dict):
            text += f" (got {got!r})"
        if allowed and "allowed" not in msg:
            text += f"; allowed: {allowed}"
        lines.append(text)
    return "; ".join(lines)


def build_config(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model)) from None


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping. Anything else is one ConfigError line naming ``what``
    (the option or argument), the file, and for a syntax error its line, column and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
        raise ConfigError(f"{what}: '{path}'{where}: not valid YAML: {problem or err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: '{path}' must hold a mapping of fields (key: value), got a {type(data).__name__}")
    return data


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file plus ``--set`` overrides (the CLI's edge)."""
    data: dict[str, Any] = read_yaml_mapping(path, "--config") if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return build_config(TrainConfig, data)
