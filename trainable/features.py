"""Where pooled features are computed: in this process, or as a Ray Data ``map_batches`` over an
actor pool for a large job (an LLM backbone on a GPU cluster).

The rule (``plan``), with ``features`` the TrainConfig's FeaturesConfig:
- ``actors: 0``, or Ray not initialised in this process, or this process is itself a Ray actor
  (a Tune trial, a Train worker: the cluster's GPUs are the trials'): this process.
- ``actors: N``: N actors, each with one GPU (``device: cuda``) or one CPU (``device: cpu``);
  ``device: auto`` is cuda when the cluster has GPUs when extraction starts.
- ``actors: auto`` (the default): one actor per GPU of the cluster when it has GPUs and the job is
  large, i.e. its estimated forward cost, 2 x backbone parameters x texts x max_len FLOPs, is at
  least ``large_tflops``; otherwise this process. A CPU-only cluster stays in this process: each
  actor would hold its own copy of the model, and one torch process already uses every core.

The Ray Data path: every split is cut into shards of ``shard_texts`` texts, one dataset row each.
Each actor loads the frozen backbone once and maps a shard to its features, which come back to
this process through the object store (so no file system needs to be shared). This process writes
each finished shard to the cache (``features/<key>.shards/<split>-<start>-<stop>.pt``, rows
start..stop-1 of the split), then assembles
them into the one entry every trial reads (``features/<key>.pt``); it never runs the backbone.
Shards already on disk are not recomputed, so a killed extraction resumes where it stopped.

Ray is imported lazily, and only Ray Data: trainable never imports Ray Tune or MLflow.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainable import backbone as bb
from trainable.config import FeaturesConfig
from trainable.model_files import parameter_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Where one extraction runs: ``actors`` Ray Data actors on ``device``, or (0) this process on ``device``."""

    actors: int
    device: str


def plan(features: FeaturesConfig, backbone: str, max_len: int, n_texts: int, device: str) -> Plan:
    """The rule in the module docstring. ``device`` is this process's, used when it does the work."""
    ray = _ray_driver()
    if features.actors == 0 or ray is None:
        if features.actors not in (0, "auto"):
            log.warning("features.actors=%s but Ray is not initialised in this process (or this is a Ray actor): "
                        "computing features here", features.actors)
        return Plan(0, device)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if features.actors != "auto":
        actor_device = features.device if features.device != "auto" else ("cuda" if gpus else "cpu")
        return Plan(features.actors, actor_device)
    if gpus and estimated_tflops(backbone, max_len, n_texts) >= features.large_tflops:
        return Plan(gpus, "cuda")
    return Plan(0, device)


def estimated_tflops(backbone: str, max_len: int, n_texts: int) -> float:
    """Forward cost of encoding ``n_texts`` texts padded to ``max_len``: ~2 FLOPs per parameter per
    token. Unknown sizes (a hub id, no weight files) count as 0: small unless forced."""
    params = parameter_count(bb.backbone_path(backbone)) or 0
    return 2.0 * params * n_texts * max_len / 1e12


def _ray_driver():
    """The ray module when Ray is initialised in this process and this process is not a Ray actor;
    else None. Never imports Ray: a process that has not imported it has not initialised it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray if ray.get_runtime_context().get_actor_id() is None else None


# -- the Ray Data path -------------------------------------------------------------------------


def extract_with_ray(backbone: str, pooling: str, max_len: int, weights: str, texts: dict[str, list[str]],
                     shard_dir: Path, where: Plan, features: FeaturesConfig) -> dict[str, torch.Tensor]:
    """Pooled features of every split, computed by ``where.actors`` Ray Data actors shard by shard
    (fewer when fewer shards are left: each actor loads a copy of the backbone)."""
    import ray.data

    shards = [s for s in shard_rows(texts, features.shard_texts) if not shard_file(shard_dir, s).is_file()]
    if shards:
        log.info("features: %d shards of %s on %d Ray Data actor(s) (%s, %s)", len(shards), backbone, where.actors,
                 where.device, weights)
        per_actor = {"num_gpus": 1} if where.device == "cuda" else {"num_cpus": 1}
        # one block per shard: a single block would be one task, on one actor, however many there are
        encoded = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(where.actors, len(shards))), **per_actor,
            fn_constructor_kwargs={"backbone": backbone, "pooling": pooling, "max_len": max_len, "weights": weights,
                                   "batch_size": features.batch_size, "device": where.device})
        write_shards(encoded, shards, shard_dir)
    return assemble(texts, shard_dir, features.shard_texts)


def shard_rows(texts: dict[str, list[str]], shard_texts: int) -> list[dict[str, object]]:
    """One dataset row per shard: a split, the index of its first text, and its texts."""
    return [{"split": split, "start": start, "texts": items[start : start + shard_texts]}
            for split, items in texts.items() for start in range(0, len(items), shard_texts)]


def shard_file(shard_dir: Path, shard: dict[str, object]) -> Path:
    """Named by its first and past-the-end rows, so shards cut at another ``shard_texts`` never pass for these."""
    return shard_dir / f"{shard['split']}-{shard['start']:08d}-{shard['start'] + len(shard['texts']):08d}.pt"


class ShardEncoder:
    """One Ray Data actor: loads the frozen backbone once, then maps each shard (one row) to one
    output row per text: its split, its index in the split, and its pooled features."""

    def __init__(self, backbone: str, pooling: str, max_len: int, weights: str, batch_size: int, device: str):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("a feature actor was given a GPU but sees no CUDA device (check CUDA_VISIBLE_DEVICES)")
        tokenizer, model = bb.load_backbone(backbone, weights)
        self.tokenizer, self.encoder = tokenizer, bb.Encoder(model, pooling)
        self.max_len, self.batch_size, self.device = max_len, batch_size, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        splits, rows, feats = [], [], []
        for split, start, texts in zip(batch["split"], batch["start"], batch["texts"]):
            out = bb.encode_texts(self.encoder, self.tokenizer, [str(t) for t in texts], self.max_len,
                                  self.batch_size, self.device)
            splits += [str(split)] * len(out)
            rows.append(np.arange(int(start), int(start) + len(out)))
            feats.append(out.numpy())
        return {"split": np.array(splits), "row": np.concatenate(rows), "features": np.concatenate(feats)}


def write_shards(encoded, shards: list[dict[str, object]], shard_dir: Path) -> None:
    """Stream the actors' output and save each shard the moment its last text arrives (Ray Data
    may split or merge blocks, so rows are placed by (split, index), not by arrival order)."""
    owner = {(s["split"], s["start"] + i): s for s in shards for i in range(len(s["texts"]))}  # (split, row) -> shard
    pending: dict[int, tuple[np.ndarray, int]] = {}  # id(shard) -> (its rows, how many arrived)
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for split, row, vec in zip(batch["split"], batch["row"], batch["features"]):
            shard = owner[(str(split), int(row))]
            rows, arrived = pending.get(id(shard)) or (np.empty((len(shard["texts"]), vec.shape[-1]), np.float32), 0)
            rows[int(row) - shard["start"]] = vec
            pending[id(shard)] = (rows, arrived + 1)
            if arrived + 1 == len(shard["texts"]):
                bb.atomic_save(torch.from_numpy(rows), shard_file(shard_dir, shard))
                del pending[id(shard)]
    if pending:
        raise RuntimeError(f"feature extraction ended with {len(pending)} shard(s) incomplete")


def assemble(texts: dict[str, list[str]], shard_dir: Path, shard_texts: int) -> dict[str, torch.Tensor]:
    """Every split's features from its shards, in text order (an empty split: an empty tensor, as in this process)."""
    out = {}
    for split, items in texts.items():
        parts = [torch.load(shard_file(shard_dir, shard), weights_only=True)
                 for shard in shard_rows({split: items}, shard_texts)]
        out[split] = torch.cat(parts) if parts else torch.empty(0)
    return out
