"""SweepSpec: what a sweep explores, what it optimises, and where it runs (DESIGN §2).

Loaded from YAML (a path or a built-in name) plus ``--set`` overrides, and validated in full
before Ray starts: every search-space bound is checked against the TrainConfig field it
drives, so `alpha: {kind: uniform, low: 0, high: 1.5}` fails here, naming
``space.alpha``, instead of as a failed trial an hour into the sweep.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from trainable.config import (
    ConfigError,
    EvalAttackConfig,
    TrainConfig,
    StrictModel,
    build_config,
    deep_merge,
    parse_overrides,
    read_yaml_mapping,
)

SPECS_DIR = Path(__file__).parent / "specs"

OBJECTIVE_METRICS = (
    "accuracy", "kd_alignment", "teacher_agreement", "noise_robustness", "alignment_stability",
    "noisy_text_accuracy", "safety_score", "harmful_recall", "benign_pass_rate", "attack_success_rate",
    "hard_accuracy",
)


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


MINIMISED_METRICS = ("attack_success_rate",)
"""Metrics where lower is better; every other objective metric is maximised."""

TEST_PREFIX = "test_"
"""A metric's plain name is its value on validation, what the searcher selects on; ``test_<name>``
is the same metric on the held-out test split, what the front, figures and comparisons report
(DESIGN §4): selecting on test would bias the reported front upwards."""


def test_metric(metric: str) -> str:
    """The name under which a trial logs ``metric`` measured on test."""
    return f"{TEST_PREFIX}{metric}"


class Objective(StrictModel):
    metric: str
    mode: Literal["max", "min"] | None = None
    """Default: the metric's natural direction (``attack_success_rate`` is minimised, the rest maximised)."""

    @model_validator(mode="after")
    def _known_metric(self) -> Objective:
        if self.metric not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown metric '{self.metric}'; allowed: {', '.join(OBJECTIVE_METRICS)}")
        if self.mode is None:
            self.mode = "min" if self.metric in MINIMISED_METRICS else "max"
        return self


class Sampler(StrictModel):
    kind: Literal["tpe", "nsga2", "random", "gp", "grid"] = "tpe"
    seed: int = 0


class Dimension(StrictModel):
    """One searched TrainConfig field. int bounds are inclusive."""

    kind: Literal["uniform", "loguniform", "int", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Dimension:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"kind={self.kind} needs a non-empty values list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"kind={self.kind} needs low and high")
            if not self.low < self.high:
                raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
            if self.kind == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        return self

    def probe_values(self) -> list[Any]:
        """The values to check against the TrainConfig domain: the bounds, or every listed value."""
        if self.values is not None:
            return list(self.values)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Scheduler(StrictModel):
    """When trials stop. ``fifo``: every trial runs its full budget. ``moasha``: multi-objective
    asynchronous successive halving (sweeps/moasha.py): at rungs of absolute optimizer steps,
    ``grace_steps * reduction_factor**k``, a trial reports its validation objectives and stops
    unless it is in the top 1/reduction_factor of the trials recorded at that rung."""

    kind: Literal["fifo", "moasha"] = "fifo"
    grace_steps: int = Field(25, ge=1)
    """The first rung, in optimizer steps."""
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, ge=1)
    """Bracket b starts its rungs at grace_steps * reduction_factor**b (trials spread by trial id)."""


class Resources(StrictModel):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """Fractional values pack several in-process trials on one GPU (e.g. 0.25: four per GPU)."""
    launch: Literal["auto", "in_process", "torch_trainer"] = "auto"
    """auto: in-process (reuse_actors) for one worker per trial; a TorchTrainer inside the trial for more."""
    pack: int | Literal["auto"] = 1
    """Trials trained together as one vectorised program (trainable/packed.py, sweeps/packing.py): a
    pack runner holding ``cpus_per_worker`` / ``gpus_per_worker`` steps up to ``pack`` of them at
    once; ``concurrency`` trials in flight use ceil(concurrency / pack) runners. 1: no packing.
    auto: min(concurrency, AUTO_PACK)."""

    DRIVER_CPU: ClassVar[float] = 0.01
    """CPU held by a trial that only drives a TorchTrainer or relays a pack member (the Train
    workers or the pack runner hold the rest)."""
    AUTO_PACK: ClassVar[int] = 16

    @model_validator(mode="after")
    def _one_worker_in_process(self) -> Resources:
        if self.launch == "in_process" and self.workers_per_trial > 1:
            raise ValueError(f"workers_per_trial={self.workers_per_trial} needs launch torch_trainer or auto; "
                             "in_process runs one worker per trial")
        if self.pack != 1 and (self.workers_per_trial > 1 or self.launch == "torch_trainer"):
            raise ValueError(f"pack={self.pack} trains its members in one process; allowed with workers_per_trial=1 "
                             "and launch auto or in_process (or pack=1)")
        return self

    @field_validator("pack", mode="before")
    @classmethod
    def _whole_pack(cls, pack: Any) -> int | str:
        if pack == "auto":
            return pack
        whole = isinstance(pack, int) and not isinstance(pack, bool) or isinstance(pack, str) and pack.isdigit()
        if not whole or int(pack) < 1:
            raise ValueError(f"got {pack!r}; allowed: a whole number >= 1, or auto")
        return int(pack)

    def mode(self) -> str:
        if self.pack != 1:
            return "packed"
        if self.launch != "auto":
            return self.launch
        return "torch_trainer" if self.workers_per_trial > 1 else "in_process"

    def pack_runners(self, concurrency: int) -> tuple[int, int]:
        """(pack runners, members per runner) for ``concurrency`` trials in flight."""
        size = min(concurrency, self.AUTO_PACK) if self.pack == "auto" else min(self.pack, concurrency)
        return -(-concurrency // size), size

    def trial_bundle(self) -> dict[str, float]:
        """What Tune reserves for the trial itself."""
        if self.mode() in ("torch_trainer", "packed"):
            return {"CPU": self.DRIVER_CPU}
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}

    def check_fits(self, nodes: list[dict[str, float]], concurrency: int = 1) -> None:
        """Raise ConfigError when one trial (under ``pack``: the sweep's pack runners) can never be
        placed on these nodes' resources (Ray's ``Resources`` per alive node): Tune would otherwise
        wait for resources forever."""

        def show(res: dict[str, float]) -> str:
            return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"

        worker = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        if not any(all(n.get(k, 0.0) >= v for k, v in worker.items()) for n in nodes):
            largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
            raise ConfigError(f"resources: one worker needs {show(worker)} (resources.cpus_per_worker, "
                              f"resources.gpus_per_worker); the largest node has {show(largest)}")
        total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
        if self.mode() == "packed":
            runners, size = self.pack_runners(concurrency)
            for kind, each in (("CPU", self.cpus_per_worker), ("GPU", self.gpus_per_worker)):
                # runners are placed whole on nodes, so count how many fit on each
                fit = sum(math.floor(n.get(kind, 0.0) / each + 1e-9) for n in nodes) if each else runners
                if fit < runners:
                    raise ConfigError(
                        f"resources.pack: concurrency {concurrency} in packs of {size} needs {runners} pack runners of "
                        f"{each:g} {kind} (resources.{kind.lower()}s_per_worker); the cluster fits {fit}: raise "
                        f"resources.pack, lower concurrency or resources.{kind.lower()}s_per_worker")
            # the relaying trials hold DRIVER_CPU each beside the runners: with none left, no trial starts
            need = runners * self.cpus_per_worker + concurrency * self.DRIVER_CPU
            if need > total["CPU"] + 1e-9:
                most = (total["CPU"] - concurrency * self.DRIVER_CPU) / runners
                raise ConfigError(
                    f"resources.pack: {runners} pack runners x cpus_per_worker ({self.cpus_per_worker:g}) + {concurrency} "
                    f"relaying trials x {self.DRIVER_CPU} CPU = {need:g} CPU; the cluster has {total['CPU']:g}: set "
                    f"resources.cpus_per_worker <= {math.floor(most * 100) / 100:g}, raise resources.pack or lower "
                    "concurrency")
            return
        if self.mode() != "torch_trainer":
            return
        need = {"CPU": self.workers_per_trial * self.cpus_per_worker + self.DRIVER_CPU,
                "GPU": self.workers_per_trial * self.gpus_per_worker}
        if need["CPU"] > total["CPU"] + 1e-9:
            most = (total["CPU"] - self.DRIVER_CPU) / self.workers_per_trial
            raise ConfigError(
                f"resources: a TorchTrainer trial needs workers_per_trial ({self.workers_per_trial}) x "
                f"cpus_per_worker ({self.cpus_per_worker:g}) + {self.DRIVER_CPU} CPU for the trial itself = "
                f"{need['CPU']:g} CPU; the cluster has {total['CPU']:g}: set resources.cpus_per_worker <= "
                f"{math.floor(most * 100) / 100:g} or fewer workers_per_trial")
        if need["GPU"] > total["GPU"] + 1e-9:
            raise ConfigError(f"resources: a TorchTrainer trial needs workers_per_trial ({self.workers_per_trial}) x "
                              f"gpus_per_worker ({self.gpus_per_worker:g}) = {need['GPU']:g} GPU; the cluster has "
                              f"{total['GPU']:g}")


class SweepSpec(StrictModel):
    name: str
    experiment: str | None = None
    description: str = ""
    trials: int | None = Field(None, ge=1)
    """Number of trials; for sampler kind=grid it defaults to the size of the grid."""
    concurrency: int = Field(2, ge=1)
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="kd_alignment"), Objective(metric="noise_robustness")])
    sampler: Sampler = Sampler()
    train: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dimension] = Field(default_factory=dict)
    resources: Resources = Resources()
    eval_attack: EvalAttackConfig = EvalAttackConfig()
    storage: str | None = None
    """Where Ray Tune keeps trial state and checkpoints (default ./runs); shared FS or S3 on a cluster."""
    max_failures: int = Field(1, ge=0)
    scheduler: Scheduler = Scheduler()
    reference: list[float] | None = None
    """Hypervolume reference point, one value per objective. Default: the plain-CE baseline's
    validation point, measured by the sweep itself before its trials (a ``role=baseline`` child run)."""

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if len(self.objectives) < 2:
            raise ValueError("objectives: a Pareto sweep needs two or more objectives")
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each metric once (got {names})")
        if self.reference is not None and len(self.reference) != len(self.objectives):
            raise ValueError(f"reference: one value per objective ({len(self.objectives)})")
        if self.sampler.kind == "grid":
            bad = [k for k, d in self.space.items() if d.kind not in ("grid", "choice")]
            if bad:
                raise ValueError(f"sampler.kind=grid needs every space entry to be grid or choice; not: {', '.join(bad)}")
        elif any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("space: kind=grid needs sampler.kind=grid (other samplers take choice)")
        if self.resources.mode() == "torch_trainer":
            _check_batch_splits(self)
        if self.scheduler.kind == "moasha" and self.resources.mode() == "torch_trainer":
            # the Tune trial only waits on TorchTrainer.fit there: nothing reports at a rung to stop
            raise ValueError("scheduler: kind=moasha stops in-process trials at rungs; resources.workers_per_trial="
                             f"{self.resources.workers_per_trial} (launch {self.resources.mode()}) runs each trial "
                             "in a TorchTrainer, which it cannot stop; allowed: kind=fifo, or one worker per trial")
        return self

    # -- derived ----------------------------------------------------------------------------

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def grid_size(self) -> int:
        size = 1
        for dim in self.space.values():
            size *= len(dim.values or [])
        return size

    def num_trials(self) -> int:
        if self.trials is not None:
            return self.trials
        return self.grid_size() if self.sampler.kind == "grid" else 8

    def baseline_config(self) -> TrainConfig:
        """The plain-CE baseline at the sweep's fixed train config: its validation point is the
        default hypervolume reference (DESIGN §4)."""
        return build_config(TrainConfig, deep_merge(self.base_train(), {"method": "ce"}))

    def base_train(self) -> dict[str, Any]:
        """The fixed TrainConfig fields of every trial, with the sweep's eval attack."""
        return deep_merge(self.train, {"eval_attack": self.eval_attack.model_dump()})

    def trial_config(self, params: dict[str, Any]) -> TrainConfig:
        """TrainConfig of one trial: the fixed fields plus the searched ones (nested dict)."""
        return build_config(TrainConfig, deep_merge(self.base_train(), params))

    def artifact_variants(self) -> list[TrainConfig]:
        """One config per distinct set of shared artifacts: the searched fields that change the
        data, backbone or teacher take each of their listed values; the rest stay at base."""
        shaping = {k: d for k, d in self.space.items()
                   if k.split(".")[0] in ("data", "backbone", "backbone_dtype", "teacher", "pooling")
                   and d.values}
        if not shaping:
            return [build_config(TrainConfig, self.base_train())]
        combos = itertools.product(*[d.values for d in shaping.values()])
        return [build_config(TrainConfig, deep_merge(self.base_train(), nest(dict(zip(shaping, c))))) for c in combos]


def _check_batch_splits(spec: SweepSpec) -> None:
    """Every batch size a TorchTrainer trial can get must split evenly over its workers."""
    workers = spec.resources.workers_per_trial
    dim = spec.space.get("batch_size")
    if dim is None:
        build_config(TrainConfig, spec.base_train()).check_workers(workers, "resources.workers_per_trial",
                                                                   "train.batch_size")
    elif not dim.values:
        raise ValueError(f"space.batch_size: a range cannot guarantee batches that split over resources.workers_per_trial"
                         f"={workers}; allowed: kind=choice of multiples of {workers}")
    elif bad := [v for v in dim.values if int(v) % workers]:
        raise ValueError(f"space.batch_size: {bad} do not split evenly over resources.workers_per_trial={workers}; "
                         f"allowed: multiples of {workers}")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _fixed_paths(d: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of every leaf a ``train:`` mapping fixes, and of the mappings above them."""
    out: set[str] = set()
    for k, v in d.items():
        out.add(f"{prefix}{k}")
        if isinstance(v, dict):
            out |= _fixed_paths(v, f"{prefix}{k}.")
    return out


def _check_space_against_train(spec: SweepSpec) -> None:
    """No field is both fixed and searched (the search would silently win), each searched field
    exists in TrainConfig, and each bound/value is valid there."""
    fixed = _fixed_paths(spec.train)
    for path in spec.space:
        if path in fixed:
            raise ConfigError(f"train.{path}: fixed here (train: or --set train.{path}=...) and also searched by "
                              f"space.{path}; keep one: drop the fixed value, or drop the search with "
                              f"--set space.{path}=null")
    base = spec.base_train()
    try:
        build_config(TrainConfig, base)  # the fixed part alone
    except ConfigError as err:
        raise ConfigError(f"train.{err}") from None
    packed = spec.resources.mode() == "packed"
    if packed and (why := build_config(TrainConfig, base).unpackable()):
        raise ConfigError(f"resources.pack: train.{why}")
    for path, dim in spec.space.items():
        if path.split(".")[0] == "eval_attack":
            raise ConfigError(f"space.{path}: the eval attack is fixed per sweep (set eval_attack:), never searched")
        for value in dim.probe_values():
            try:
                config = build_config(TrainConfig, deep_merge(base, nest({path: value})))
            except ConfigError as err:
                raise ConfigError(f"space.{path}: {err}") from None
            if packed and (why := config.unpackable()):
                raise ConfigError(f"resources.pack: space.{path}={value!r} cannot train in a pack: {why}")


def resolve_spec_path(spec: str | Path | None) -> Path:
    if spec is None:
        return SPECS_DIR / "pareto.yaml"
    path = Path(spec)
    if path.is_file():
        return path
    if (SPECS_DIR / f"{spec}.yaml").is_file():
        return SPECS_DIR / f"{spec}.yaml"
    raise ConfigError(f"SPEC: '{spec}' is neither a file nor a built-in spec; allowed: {', '.join(builtin_specs())} or a YAML path")


def load_spec(spec: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> SweepSpec:
    """A validated SweepSpec from a path or built-in name, ``--set`` overrides and CLI fields.
    ``--set space.FIELD=null`` drops FIELD from the search (to fix it with ``--set train.FIELD=...``)."""
    path = resolve_spec_path(spec)
    data = read_yaml_mapping(path, "SPEC")
    data = deep_merge(data, parse_overrides(overrides or []))
    data = deep_merge(data, {k: v for k, v in fields.items() if v is not None})
    if isinstance(data.get("space"), dict):
        data["space"] = {k: v for k, v in data["space"].items() if v is not None}
    result = build_config(SweepSpec, data)
    _check_space_against_train(result)
    return result
