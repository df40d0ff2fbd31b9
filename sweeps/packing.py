"""Packed trials in a sweep (``resources.pack``): each member stays one Tune trial, trained inside a pack actor.

The choice (issue 15 asks for it in DESIGN §2; shared/DESIGN.md is not the developers' to edit,
so it is recorded here and in README "Run a sweep"): every member is a Tune-visible trial with its own Optuna
trial, MLflow child run, checkpoints and scheduler decisions, exactly as unpacked; only its
training moves into a ``PackRunner``, a Ray actor that holds ``resources.cpus_per_worker`` /
``gpus_per_worker`` and steps up to ``pack`` members as one vectorised program
(trainable/packed.Pack). The trial itself is a thin process (``Resources.DRIVER_CPU``) that
relays its member's reports to MLflow and Tune: the trial function is the unpacked one with
``train_loop`` swapped for ``train_in_pack``.

Why not one Tune trial carrying several Optuna trials: Tune's scheduler, failure handling and
resume all work per Tune trial. With one trial per member, MO-ASHA stops a member at its rung,
a member that raises is FAILED alone, and a resumed sweep restores each member from its own
checkpoint, with nothing of Tune's re-implemented.

How a member moves:
- ``join``: the trial hands its config (and its checkpoint, when resumed) to the first runner
  with a free slot; members join the pack between steps, at their own step.
- ``next``: the trial waits for its member's reports (log, checkpoint, rung, final) and relays
  each one. A rung report pauses the member until the trial asks again, so the scheduler's
  decision comes before the member trains further; other reports do not pause it.
- ``leave``: when the trial ends for any reason (finished, failed, stopped by the scheduler or by
  Ctrl-C: ``tune.report`` raises SystemExit inside the relay), the member is dropped.
Checkpoints travel as file contents, so a trial on another node than its runner still gets them.

What it costs (benchmarks/packed.py, 2 CPU cores): every trial in flight is a relay process (a
Ray worker: ~3 CPU-s to start and relay, mostly importing Ray Tune and MLflow) with its own MLflow
run and Tune bookkeeping, and the default MLP head is compute-bound: a 100-step trial is 20.1 GFLOP
of matmuls, which bounds any pack at 2.13x on one of these cores (row 8b). Here a pack of 16 ran at
0.48x unpacked's trials per CPU-second; the trainer alone at 1.13x (linear heads: 2.45x). Packing
pays where one head leaves the device idle: GPUs, and tiny heads once the per-trial service is cheaper.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from sweeps.tracking import STEP_METRICS
from trainable.config import TrainConfig

CHECKPOINT_FILES = ("state.pt", "eval_items.json")


class MemberFailed(RuntimeError):
    """The member raised inside its pack; ``reason`` is the original "Type: message"."""

    def __init__(self, reason: str, step: int):
        super().__init__(reason)
        self.reason, self.step = reason, step


def _read_checkpoint(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in CHECKPOINT_FILES if (path / name).exists()}


def _write_checkpoint(files: dict[str, bytes], path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


class _Slot:
    """A member's mailbox: the reports its trial has not relayed yet."""

    def __init__(self, member):
        self.member, self.events, self.closed = member, [], False


@ray.remote(max_restarts=-1)
class PackRunner:
    """One process that trains up to ``capacity`` members, grouped by ``trainable.packed.group_key``
    (members of another head shape, precision or dataset train in a pack of their own)."""

    def __init__(self, capacity: int):
        import torch

        torch.set_num_threads(1)  # one CPU per runner (resources.cpus_per_worker); the pack is the parallelism
        self.capacity = capacity
        self.artifact_refs: dict[str, ray.ObjectRef] = {}
        self.artifacts: dict[str, Any] = {}
        self.slots: dict[str, _Slot] = {}
        self.packs: dict[tuple, Any] = {}
        self.joining: list[_Slot] = []
        self.leaving: set[str] = set()
        self.lock = threading.Condition()
        self.tmp = tempfile.TemporaryDirectory(prefix="alignsweep-pack-")
        threading.Thread(target=self._run, daemon=True, name="pack-loop").start()

    # -- called by trials ------------------------------------------------------------------------

    def join(self, trial_id: str, config: dict, resume: dict[str, bytes] | None, eval_at: Sequence[int],
             artifacts: dict[str, ray.ObjectRef]) -> tuple[str, int] | None:
        """Take the trial's member if a slot is free: (this runner's actor id, the step the member
        starts at: its checkpoint's when resumed, else 0); None if this runner is full.
        ``artifacts``: the driver's shared artifacts by key (sweeps.trial.TrialContext.artifacts),
        handed over with each join rather than to the constructor: a restarted runner (after its
        node died) then needs nothing of its first life."""
        from trainable.loop import checkpoint_step
        from trainable.packed import Member

        with self.lock:
            self.artifact_refs.update(artifacts)
            if trial_id in self.slots:  # a retried call of the same trial: replace its member
                self.leaving.add(trial_id)
            elif len(self.slots) >= self.capacity:  # a slot leaves self.slots when its trial leaves
                return None
            cfg = TrainConfig.model_validate(config)
            resume_dir = _write_checkpoint(resume, Path(self.tmp.name) / "resume" / trial_id) if resume else None
            slot = _Slot(None)
            slot.member = Member(cfg, self._reporter(slot), resume_from=resume_dir, eval_at=list(eval_at),
                                 name=trial_id)
            self.slots[trial_id] = slot
            self.joining.append(slot)
            self.lock.notify_all()
            return (ray.get_runtime_context().get_actor_id(),
                    checkpoint_step(resume_dir) if resume_dir is not None else 0)

    def next(self, trial_id: str, timeout_s: float = 30.0) -> list[tuple]:
        """The member's reports since the last call (waits up to ``timeout_s`` for one); unpauses it.
        Each event: ("report", metrics, checkpoint files or None), ("failed", reason, step) or ("done", final metrics)."""
        with self.lock:
            slot = self.slots.get(trial_id)
            if slot is None:
                return [("failed", f"RuntimeError: trial {trial_id} is not in this pack (restarted?)", 0)]
            slot.member.paused = False
            self.lock.notify_all()
            self.lock.wait_for(lambda: slot.events, timeout=timeout_s)
            events, slot.events = slot.events, []
            if events and events[-1][0] in ("failed", "done"):
                self.slots.pop(trial_id, None)
            return events

    def leave(self, trial_id: str) -> None:
        with self.lock:
            slot = self.slots.pop(trial_id, None)
            if slot is not None:
                slot.closed = True
                self.leaving.add(trial_id)
                self.lock.notify_all()

    # -- the training thread ---------------------------------------------------------------------

    def _reporter(self, slot: _Slot) -> Callable[..., None]:
        def report(metrics: dict[str, float], checkpoint: Path | None = None) -> None:
            files = None
            if checkpoint is not None:  # its bytes travel to the trial; the runner keeps nothing per member
                files = _read_checkpoint(Path(checkpoint))
                shutil.rmtree(checkpoint, ignore_errors=True)
            with self.lock:
                slot.events.append(("report", dict(metrics), files))
                if checkpoint is None and any(k not in STEP_METRICS and k != "step" for k in metrics):
                    # validation at a rung (what TrialLogger logs as one): the member waits until
                    # the trial has relayed it and the scheduler has decided
                    slot.member.paused = True
                self.lock.notify_all()
        return report

    def _artifacts(self, config: TrainConfig):
        from trainable.loop import artifact_key, prepare_artifacts

        key = artifact_key(config)
        if key not in self.artifacts:
            ref = self.artifact_refs.get(key)
            self.artifacts[key] = ray.get(ref) if ref is not None else prepare_artifacts(config)
        return self.artifacts[key]

    def _run(self) -> None:
        from trainable.packed import Pack, group_key

        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.joining or self.leaving or any(
                    any(not m.paused for m in p.members) for p in self.packs.values()), timeout=5.0)
                joining, self.joining = self.joining, []
                leaving, self.leaving = self.leaving, set()
            for pack in self.packs.values():
                for mem in [m for m in pack.members if m.name in leaving]:
                    pack.remove(mem)
                    self._forget(mem)
            for slot in joining:
                if slot.closed:
                    continue
                mem = slot.member
                try:
                    key = group_key(mem.config)
                    if key not in self.packs:
                        self.packs[key] = Pack(self._artifacts(mem.config), Path(self.tmp.name) / "ckpt",
                                               mem.config.resolve_device())
                    self.packs[key].add(mem)
                except Exception as err:  # noqa: BLE001 - a member that cannot join fails alone
                    self._left(slot, err)
                finally:
                    if mem.resume_from is not None:
                        shutil.rmtree(mem.resume_from, ignore_errors=True)
            for key, pack in list(self.packs.items()):
                try:
                    left = pack.step()
                except Exception as err:  # noqa: BLE001 - the step itself broke: its members fail, the runner lives
                    left = [(mem, err) for mem in pack.members]
                    pack.members.clear()
                for mem, err in left:
                    self._forget(mem)
                    slot = next((s for s in self.slots.values() if s.member is mem), None)
                    if slot is not None:
                        self._left(slot, err)
                if not len(pack):
                    del self.packs[key]

    def _forget(self, mem) -> None:
        """A member's checkpoint directory goes with it: a runner serves a thousand trials."""
        shutil.rmtree(Path(self.tmp.name) / "ckpt" / mem.name, ignore_errors=True)

    def close(self) -> None:
        """Remove this runner's temporary files; the driver calls it before Ray ends the actor
        (an actor killed at shutdown runs no finalizer)."""
        self.tmp.cleanup()

    def _left(self, slot: _Slot, err: BaseException | None) -> None:
        with self.lock:
            if err is None:
                slot.events.append(("done", slot.member.final))
            else:
                slot.events.append(("failed", f"{type(err).__name__}: {err}", int(getattr(err, "step", slot.member.step))))
            self.lock.notify_all()


def start_runners(count: int, capacity: int, cpus: float, gpus: float) -> list:
    """The sweep's pack runners, owned by the driver (they end with it)."""
    return [PackRunner.options(num_cpus=cpus, num_gpus=gpus, max_concurrency=capacity + 8).remote(capacity)
            for _ in range(count)]


def train_in_pack(runners: Sequence, artifacts: dict[str, ray.ObjectRef], trial_id: str, config: TrainConfig,
                  report: Callable[..., None], resume_from: str | Path | None = None, eval_at: Sequence[int] = (),
                  on_join: Callable[[str, int], None] | None = None) -> dict[str, float]:
    """``train_loop``'s contract, with the training done by a pack runner: joins the first runner with a
    free slot, relays every report of its member to ``report`` in order, and returns the final metrics.
    ``on_join(runner_id, step)``: called once the member is in a runner, with the step it starts at.
    Raises MemberFailed if the member raised in the pack (or could not join it)."""
    resume = _read_checkpoint(Path(resume_from)) if resume_from is not None else None
    start = hash(trial_id) % len(runners)
    order = [runners[(start + i) % len(runners)] for i in range(len(runners))]
    runner = None
    while runner is None:  # every slot is taken only until a leaving member's slot frees
        for r in order:
            joined = ray.get(r.join.remote(trial_id, config.model_dump(mode="json"), resume, list(eval_at), artifacts))
            if joined is not None:
                runner = r
                break
        else:
            time.sleep(0.05)
    if on_join is not None:
        on_join(*joined)
    try:
        with tempfile.TemporaryDirectory(prefix="alignsweep-member-") as tmp:
            while True:
                for event in ray.get(runner.next.remote(trial_id)):
                    if event[0] == "failed":
                        raise MemberFailed(event[1], event[2])
                    if event[0] == "done":
                        return event[1]
                    _, metrics, files = event
                    ckpt = _write_checkpoint(files, Path(tmp) / f"step_{int(metrics['step']):06d}") if files else None
                    report(metrics, ckpt)
                    if ckpt is not None:  # report has taken what it keeps (train_loop's contract)
                        shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        runner.leave.remote(trial_id)
