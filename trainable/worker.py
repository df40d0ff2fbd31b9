"""The same train_loop under a Ray Train TorchTrainer: N workers, CPU here, GPUs on a cluster.

Ray Train sets up torch.distributed in each worker; train_loop sees it and averages
gradients across ranks. The shared artifacts arrive as an ObjectRef from the sweep's driver,
so a worker on any node trains on what the driver built and rebuilds nothing. Every rank calls
``ray.train.report`` (Ray requires it); only rank 0 attaches a checkpoint and only rank 0's
metrics are forwarded to ``on_report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainable.config import TrainConfig


def _worker_fn(cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    from ray.train import Checkpoint

    from trainable.loop import train_loop

    config = TrainConfig.model_validate(cfg["config"])
    artifacts = ray.get(cfg["artifacts"]) if cfg.get("artifacts") is not None else None
    rank = ray.train.get_context().get_world_rank()
    forward = cfg.get("on_report")

    def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        if rank == 0 and forward is not None:
            forward(metrics, checkpoint)
        if checkpoint is None:
            # Each ray.train.report costs ~2 s here; step losses already went to on_report. The loop
            # hands checkpoints to every rank at the same steps, so all ranks still report together.
            return
        ckpt = Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None and rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as path:
            train_loop(config, report, resume_from=path, artifacts=artifacts)
    else:
        train_loop(config, report, artifacts=artifacts)


def fit_with_ray_train(config: TrainConfig, num_workers: int, use_gpu: bool = False, cpus_per_worker: float = 1,
                       gpus_per_worker: float = 1, on_report=None, storage_path: str | None = None,
                       name: str | None = None, artifacts=None) -> dict[str, float]:
    """Run train_loop on ``num_workers`` Ray Train workers; returns rank 0's final metrics.
    ``artifacts``: an ObjectRef of the driver's ``Artifacts`` (None: each worker prepares them)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        _worker_fn,
        train_loop_config={"config": config.model_dump(), "on_report": on_report, "artifacts": artifacts},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_path, name=name),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
