"""The sweep's live progress: a rich panel in a terminal, one line per finished trial otherwise."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
from ray.tune import Callback

from sweeps import pareto
from sweeps.moasha import RUNG_STEP
from sweeps.spec import SweepSpec


def _outcome(result: dict) -> str:
    """FINISHED or FAILED as the trial reported it; PRUNED when its last result was a rung (the
    scheduler stopped it there); ERROR when it reported neither."""
    if "trial_status" in result:
        return result["trial_status"]
    return "PRUNED" if RUNG_STEP in result else "ERROR"


class SweepProgress(Callback):
    """Done (and of those, stopped early) / running / failed, front size and hypervolume so far
    (on validation, against the sweep's reference).

    Counts come from Tune's trial list, so a resumed sweep shows the trials it restored. Tune
    pickles its callbacks with the RunConfig, and a ``rich.live.Live`` holds locks and a refresh
    thread: the view is built when the experiment starts (:meth:`setup`) and never pickled.
    """

    active: set[SweepProgress] = set()
    """Views showing now: a restored Tuner runs its own unpickled copy of this callback, and a second
    Ctrl-C skips Tune's cleanup, so the driver closes them all through :meth:`close_all`."""

    def __init__(self, spec: SweepSpec, total: int, reference: list[float] | None = None):
        self.spec, self.total = spec, total
        self.reference = reference or spec.reference or pareto.default_reference(spec.modes)
        self.started = time.monotonic()
        self.live = None
        self._forget()

    def _forget(self) -> None:
        # What the view has counted so far, trial by trial: a summary over Tune's whole trial list
        # on every result cost O(trials) each, a driver's largest cost per trial at ~1,000 trials
        # (benchmarks/scale.py row 5b). Only the front is kept: dominated points add no volume.
        self._counted: set[str] = set()
        self._scanned = False  # the first look at Tune's trial list (a resumed sweep's restored trials)
        self._outcomes = {"FINISHED": 0, "PRUNED": 0, "other": 0}
        self._front = np.empty((0, len(self.spec.metrics)))
        self._volume = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "live": None}

    def _count(self, trials, ending) -> None:
        """Fold in every trial that is done and not yet counted: the whole list the first time Tune
        shows one (a resumed sweep's restored trials), then only the trial that ends."""
        spec = self.spec
        new = []
        if trials and not self._scanned:
            self._scanned = True
        elif ending is not None:
            trials = [ending]
        else:
            return
        for t in trials:
            if t.trial_id in self._counted or not (t.status in ("TERMINATED", "ERROR") or t is ending):
                continue
            self._counted.add(t.trial_id)
            r = t.last_result or {}
            outcome = "PRUNED" if _outcome(r) == "PRUNED" else r.get("trial_status")
            self._outcomes[outcome if outcome in self._outcomes else "other"] += 1
            if r.get("trial_status") == "FINISHED":
                new.append([r.get(m, math.nan) for m in spec.metrics])
        if new:
            pts = np.concatenate([self._front, np.asarray(new, dtype=float)])
            self._front = pts[pareto.non_dominated(pts, spec.modes)]
            self._volume = pareto.hypervolume(self._front, spec.modes, self.reference) if len(self._front) else 0.0

    def setup(self, **info) -> None:
        self.started = time.monotonic()
        self._forget()  # a restored Tuner's copy counts its restored trials afresh
        if sys.stdout.isatty() and self.live is None:
            from rich.live import Live

            self.live = Live("", refresh_per_second=2, transient=True)
            self.live.start()
            SweepProgress.active.add(self)
            self._show([])

    def summary(self, trials, ending=None) -> tuple[str, str]:
        # Tune calls on_trial_complete before it marks the trial TERMINATED: count it as done.
        self._count(trials, ending)
        ok, stopped = self._outcomes["FINISHED"], self._outcomes["PRUNED"]
        done = ok + stopped + self._outcomes["other"]
        running = sum(t.status == "RUNNING" and t is not ending for t in trials)
        share = pareto.normalised_hypervolume(self._volume, self.spec.modes, self.reference)
        early = f" ({stopped} stopped early)" if stopped else ""
        head = f"{done}/{self.total} done{early}, {running} running, {done - ok - stopped} failed"
        return head, f"front {len(self._front)}, hypervolume {self._volume:.1f} ({share:.1%} of the box beyond the " \
                     f"reference), {time.monotonic() - self.started:.0f}s"

    def _show(self, trials, line: str | None = None, ending=None) -> None:
        head, tail = self.summary(trials, ending)
        if self.live is not None:
            from rich.panel import Panel

            if line is not None:
                self.live.console.print(line, highlight=False)
            self.live.update(Panel(tail, title=f"sweep {self.spec.name}: {head}"))
        elif line is not None:
            print(f"[{head}] {line}; {tail}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.live is not None:  # off a terminal a result prints nothing
            self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        vals = ", ".join(f"{m}={r[m]:.1f}" for m in self.spec.metrics if isinstance(r.get(m), (int, float)))
        outcome = _outcome(r)
        if outcome == "PRUNED":
            outcome = f"stopped at step {r[RUNG_STEP]}"
        self._show(trials, f"{trial.trial_id} {outcome} {vals}".rstrip(), trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, f"{trial.trial_id} ERROR", trial)

    def on_experiment_end(self, trials, **info):
        self.close()

    def close(self) -> None:
        """Stop the live view."""
        if self.live is not None:
            self.live.stop()
            self.live = None
        SweepProgress.active.discard(self)

    @classmethod
    def close_all(cls) -> None:
        for view in list(cls.active):
            view.close()
