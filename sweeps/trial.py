"""One Tune trial: train with the searched params, log to MLflow from inside the trial, report to Tune.

A trial that raises would lose its reused actor (20-30 s to replace, DESIGN §7): failures are
caught here, logged FAILED to MLflow, and reported to Tune as a result without objectives.
Retried and resumed trials reopen their own MLflow run by trial id, and a re-run of a trial that
already finished reports the stored values instead of training again.

The shared artifacts (splits, features, teacher logits) come from the driver through Ray's
object store, by ``artifact_key``: a trial on any node trains on exactly what the driver built,
and no node rebuilds them or needs the data wheels (DESIGN §2). Each run records its node as
``ray_node_id``.

Under ``resources.pack`` the trial's training runs in a pack runner with other trials' (sweeps/packing.py);
the trial relays its member's reports exactly as it relays the loop's, so everything below holds there too.

Under ``scheduler: moasha`` the loop also evaluates validation at the trial's rungs and the
trial reports it with ``rung_step``; when the scheduler stops the trial there, Tune ends the
trial's thread from inside ``tune.report`` (``SystemExit``) and the driver marks the run KILLED
with ``pruned_at_step`` (sweeps.tune).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Checkpoint

from sweeps import tracking
from sweeps.moasha import RUNG_STEP, bracket_of, rung_steps
from sweeps.spec import SweepSpec
from trainable.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrialContext:
    """What every trial of a sweep shares (travels to the trial processes with the trainable)."""

    spec: SweepSpec
    uri: str
    experiment_id: str
    parent_id: str
    run_storage: str
    artifacts: dict[str, ray.ObjectRef] = field(default_factory=dict)
    """``artifact_key(config)`` -> the driver's ``Artifacts`` in the object store (put once per sweep)."""
    pack_runners: list = field(default_factory=list)
    """Under ``resources.pack``: the driver's ``PackRunner`` actors (sweeps/packing.py)."""

    def shared_artifacts(self, config: TrainConfig):
        """The driver's artifacts for this config, fetched once per worker process; None when the
        driver built none for it (a data field searched over a continuous range), and then the
        loop builds them on this node from its disk cache."""
        from trainable.loop import artifact_key

        ref = self.artifacts.get(artifact_key(config))
        if ref is None:
            log.warning("no shared artifacts for this trial's data/backbone/teacher; building them on this node")
            return None
        key = ref.hex()
        if key not in _FETCHED:
            _FETCHED.clear()  # keep one sweep's worth: a reused actor serves one sweep at a time
            _FETCHED[key] = ray.get(ref)
        return _FETCHED[key]

    def rungs(self, trial_id: str, budget_steps: int) -> list[int]:
        """The optimizer steps at which this trial reports validation to the scheduler."""
        sched = self.spec.scheduler
        if sched.kind != "moasha":
            return []
        return rung_steps(sched.grace_steps, sched.reduction_factor, budget_steps,
                          bracket_of(trial_id, sched.brackets))


_FETCHED: dict[str, Any] = {}
"""Artifacts already fetched by this worker process, by ObjectRef: a reused actor deserialises them once."""


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    tctx = tune.get_context()
    logger = tracking.TrialLogger(ctx.uri, ctx.experiment_id, ctx.parent_id, tctx.get_trial_id(), tctx.get_trial_name())
    stored = logger.open(params)
    if stored is not None:  # a re-run of a trial that already finished: report, don't retrain
        tune.report({**stored, "trial_status": "FINISHED"})
        return
    logger.tag(ray_node_id=ray.get_runtime_context().get_node_id())
    spec, step = ctx.spec, 0
    try:
        config = spec.trial_config(params)
        mode = spec.resources.mode()
        if mode == "torch_trainer":
            from trainable.loop import artifact_key
            from trainable.worker import fit_with_ray_train

            r = spec.resources
            final = fit_with_ray_train(config, r.workers_per_trial, use_gpu=r.gpus_per_worker > 0,
                                       cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker or 1,
                                       on_report=logger, storage_path=ctx.run_storage, name=f"{tctx.get_trial_name()}-train",
                                       artifacts=ctx.artifacts.get(artifact_key(config)))
        else:
            if mode == "packed":  # this process only relays: no torch here, the runner reads the checkpoint
                from sweeps.packing import train_in_pack

                def joined(runner_id: str, step: int) -> None:
                    logger.tag(pack_runner=runner_id, **({"resumed_from_step": str(step)} if step else {}))

                train = partial(train_in_pack, ctx.pack_runners, ctx.artifacts, tctx.get_trial_id(), on_join=joined)
            else:
                from trainable.loop import checkpoint_step, train_loop

                def train(config, report, resume_from=None, eval_at=()):
                    if resume_from is not None:
                        logger.tag(resumed_from_step=str(checkpoint_step(resume_from)))
                    return train_loop(config, report, resume_from=resume_from, eval_at=eval_at,
                                      artifacts=ctx.shared_artifacts(config))

            def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
                nonlocal step
                step = int(metrics.get("step", step))
                logger(metrics, checkpoint)
                if checkpoint is None:
                    if all(m in metrics for m in spec.metrics):  # validation at a rung: the scheduler decides
                        tune.report({**metrics, RUNG_STEP: step})
                    return
                status = {"trial_status": "FINISHED"} if all(m in metrics for m in spec.metrics) else {}
                tune.report({**metrics, **status}, checkpoint=Checkpoint.from_directory(str(checkpoint)))

            rungs = ctx.rungs(tctx.get_trial_id(), config.budget_steps)
            resume = tune.get_checkpoint()
            if resume is not None:
                with resume.as_directory() as path:
                    final = train(config, report, resume_from=path, eval_at=rungs)
            else:
                final = train(config, report, eval_at=rungs)
    except SystemExit:
        # Tune stopped the trial inside tune.report (a rung, or Ctrl-C): keep its step losses;
        # the run's status is the driver's to set (pruned: KILLED; interrupted: resumed later).
        logger.flush()
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes a FAILED trial, the sweep goes on
        reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"  # a pack's MemberFailed: the original
        logger.finish(None, "FAILED", step=getattr(err, "step", step), reason=reason)
        tune.report({"trial_status": "FAILED", "failure": reason})
        return
    logger.finish(final, "FINISHED", step=config.budget_steps)
    if mode == "torch_trainer":
        tune.report({**final, "trial_status": "FINISHED"})
