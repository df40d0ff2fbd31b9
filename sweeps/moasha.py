"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

Trials report a *rung result*: a Tune result holding ``"rung_step": <int>`` plus one float per
objective metric. At each rung the scheduler records the trial's objective vector, orders every
trial recorded at that rung (in that bracket) and lets the trial go on only if it is among the
best ``ceil(n / reduction_factor)`` of the ``n`` recorded there; otherwise it returns STOP.
Everything else a trial reports is ignored (CONTINUE).

Rungs. Bracket ``b`` (0-based, ``brackets`` of them) has rungs at absolute optimizer steps
``grace_steps * reduction_factor ** (k + b)``, k = 0, 1, ..., strictly below the trial's own
``max_steps`` (:func:`rung_steps`): a trial is never pruned at or after its own final step. A
trial's bracket is ``sha256(trial_id) mod brackets`` (:func:`bracket_of`), so it is the same after
a driver restart. A report at a step that is not a rung of the trial's bracket is ignored, so a
trainable may simply report at the rungs of every bracket.

Ordering (:func:`order`). Objectives are turned into minimisation, then trials are sorted by
non-dominated rank (``moocore.pareto_rank``, 0 = not dominated by any other), and inside one rank
layer by hypervolume contribution within that layer (``moocore.hv_contributions``, reference = the
layer's worst value per axis + 1), larger first; remaining ties go to the earlier recorded trial.
Hypervolume contribution is used rather than crowding distance because it measures what each
point alone adds to its layer in any number of objectives (large gaps first; the layer's extremes
get the box up to the reference, one unit past the worst value), and moocore computes it exactly;
with a single objective a layer holds only equal values and the tie goes by arrival. Ranks are
used as ranks: Syne Tune's MOASHA passes the index list returned by ``nondominated_sort()`` where
a per-trial score is expected, so a trial is scored by whichever trial sits at its position.

Non-finite objective values (nan, inf, None) cannot be ranked: such a trial is stopped at that
rung and not recorded, so it does not count in ``n`` for later trials.

State. The records are a plain ``dict[bracket][rung_step] -> dict[trial_id, list[float]]``. Tune
never saves scheduler state (``save``/``restore`` are not called): ``Tuner`` pickles its
TuneConfig, this scheduler included, into ``tuner.pkl`` once, when it is built, and
``Tuner.restore`` runs that copy, records as of then. So the records are rebuilt from ``history``
(trial_id -> {rung_step: objective values}) or from ``history_source()``, a picklable callable
the scheduler calls once, at its first rung result in the driver: the copy a restored Tuner
unpickles then reads back what the trials reported before the restart. A re-report of a trial at
a rung it already has (e.g. a trial resumed from an older checkpoint) replaces its earlier value.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import moocore
import numpy as np
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)


RUNG_STEP = "rung_step"

#: bracket -> rung step -> trial_id -> objective values (as reported, not sign-flipped)
Records = dict[int, dict[int, dict[str, list[float]]]]


def rung_steps(grace_steps: int, reduction_factor: float, max_steps: int, bracket: int = 0) -> list[int]:
    """The rungs of ``bracket``: ``grace_steps * reduction_factor ** (k + bracket)`` rounded to
    whole steps, k = 0, 1, ..., strictly below ``max_steps``. A trial never reports a rung at or
    after its own last step, so it just finishes instead of being pruned at its end."""
    _check_rule(grace_steps, reduction_factor)
    rungs: list[int] = []
    k = bracket
    while (step := round(grace_steps * reduction_factor ** k)) < max_steps:
        if not rungs or step > rungs[-1]:  # a float factor near 1 can round two rungs together
            rungs.append(step)
        k += 1
    return rungs


def bracket_of(trial_id: str, brackets: int) -> int:
    """The trial's bracket: a hash of its Tune trial id, so a restarted driver agrees with the
    one before it (Python's ``hash`` of a str is salted per process, sha256 is not)."""
    return int(hashlib.sha256(trial_id.encode()).hexdigest(), 16) % brackets


def _check_rule(grace_steps: int, reduction_factor: float) -> None:
    if grace_steps <= 0:
        raise ValueError(f"grace_steps must be positive, not {grace_steps}")
    if reduction_factor <= 1:
        raise ValueError(f"reduction_factor must be > 1, not {reduction_factor}")


def _check_modes(modes: Sequence[str]) -> None:
    bad = [m for m in modes if m not in ("max", "min")]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty list of 'max'/'min', not {list(modes)}")


def minimisation(points: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """``points`` (n trials x m objectives) with every "max" column negated."""
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    return np.asarray(points, dtype=float).reshape(-1, len(modes)) * sign


def order(points: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Indices of ``points`` (rows: trials, columns: objectives with ``modes`` "max"/"min"), best
    first: by non-dominated rank, then by hypervolume contribution within the rank layer (larger
    first; reference = the layer's worst value per axis + 1), then by row index. All values must
    be finite."""
    _check_modes(modes)
    pts = minimisation(points, modes)
    if not np.isfinite(pts).all():
        raise ValueError("order() needs finite objective values")
    if len(pts) == 0:
        return np.empty(0, dtype=int)
    ranks = moocore.pareto_rank(pts)
    contribution = np.zeros(len(pts))
    # moocore's hypervolume needs >= 2 objectives; with one, a layer holds only equal values,
    # whose contributions would all be 0 anyway
    if pts.shape[1] > 1:
        for rank in np.unique(ranks):
            layer = np.flatnonzero(ranks == rank)
            contribution[layer] = moocore.hv_contributions(pts[layer], ref=pts[layer].max(axis=0) + 1)
    # lexsort sorts by the last key first: rank, then -contribution, then arrival
    return np.lexsort((np.arange(len(pts)), -contribution, ranks))


def survives(points: np.ndarray, modes: Sequence[str], reduction_factor: float, index: int) -> bool:
    """Whether row ``index`` of ``points`` is among the top ``ceil(n / reduction_factor)`` rows
    by :func:`order`; with one row it always is."""
    best = order(points, modes)
    keep = math.ceil(len(best) / reduction_factor)
    return bool(np.flatnonzero(best == index)[0] < keep)


class Rungs:
    """The rung records of every bracket and the continue/stop rule on them.

    ``records`` is the plain :data:`Records` structure; it may be built elsewhere and passed in.
    """

    def __init__(self, modes: Sequence[str], reduction_factor: float, brackets: int = 1,
                 records: Records | None = None):
        _check_modes(modes)
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, not {reduction_factor}")
        if brackets < 1:
            raise ValueError(f"brackets must be >= 1, not {brackets}")
        self.modes = list(modes)
        self.reduction_factor = reduction_factor
        self.brackets = brackets
        self.records: Records = records if records is not None else {}

    def put(self, trial_id: str, step: int, values: Sequence[float | None]) -> bool:
        """Record without deciding (rebuilding from history): the trial's values at rung ``step``
        of its bracket replace any earlier ones. Returns False, recording nothing (and dropping
        an earlier value), if a value is non-finite."""
        if len(values) != len(self.modes):
            raise ValueError(f"trial {trial_id}: {len(values)} values for {len(self.modes)} objectives")
        vector = [math.nan if v is None else float(v) for v in values]
        steps = self.records.setdefault(bracket_of(trial_id, self.brackets), {})
        if not all(math.isfinite(v) for v in vector):
            steps.get(int(step), {}).pop(trial_id, None)  # a re-report that turned non-finite no longer counts
            return False
        steps.setdefault(int(step), {})[trial_id] = vector
        return True

    def record(self, trial_id: str, step: int, values: Sequence[float | None]) -> bool:
        """Record the trial's objective values at rung ``step`` of its bracket (replacing any
        earlier value of that trial there) and return True if it continues, False if it stops.
        Non-finite values stop it without being recorded: they cannot be ranked."""
        if not self.put(trial_id, step, values):
            return False
        rung = self.records[bracket_of(trial_id, self.brackets)][int(step)]
        ids = list(rung)
        return survives(np.array([rung[t] for t in ids]), self.modes, self.reduction_factor, ids.index(trial_id))

    def counts(self) -> dict[int, dict[int, int]]:
        """bracket -> rung step -> number of trials recorded there."""
        return {b: {s: len(r) for s, r in sorted(steps.items())} for b, steps in sorted(self.records.items())}


class MOASHA(FIFOScheduler):
    """MO-ASHA (see the module docstring): stops a trial at a rung unless it is among the best
    ``ceil(n / reduction_factor)`` of the trials recorded there.

    ``metrics``/``modes``: the objectives read from a rung result and their directions.
    ``max_steps``: if given, reports at or after it are never treated as rungs.
    ``history``: trial_id -> {rung_step: objective values} reported before a driver restart;
    it rebuilds the records (steps that are not rungs of the trial's bracket and non-finite
    values are skipped, as they would have been live). ``history_source()``: the same, read once
    at the first rung result (what a restored Tuner's copy of the scheduler relies on).
    ``on_prune(trial_id, rung_step)`` is called before STOP is returned; ``pruned`` maps each
    stopped trial to its rung step. Both hooks travel in the pickle when they can.
    """

    def __init__(self, metrics: list[str], modes: list[str], grace_steps: int, reduction_factor: float,
                 brackets: int = 1, max_steps: int | None = None,
                 history: dict[str, dict[int, list[float]]] | None = None,
                 on_prune: Callable[[str, int], None] | None = None,
                 history_source: Callable[[], Mapping[str, Mapping[int, Sequence[float]]]] | None = None):
        super().__init__()
        if len(metrics) != len(modes):
            raise ValueError(f"{len(metrics)} metrics but {len(modes)} modes")
        _check_rule(grace_steps, reduction_factor)
        self.metrics = list(metrics)
        self.modes = list(modes)
        self.grace_steps = grace_steps
        self.reduction_factor = reduction_factor
        self.max_steps = max_steps
        self.on_prune = on_prune
        self.pruned: dict[str, int] = {}
        self.history_source = history_source
        self._rebuilt = history_source is None  # rebuilt lazily, in the driver, by whichever copy runs
        self.rungs = Rungs(self.modes, reduction_factor, brackets)
        self._rebuild(history or {})
        # self._metric stays None on purpose: Tune checks every result for the scheduler's metric,
        # and only rung results carry the objectives.

    def _rebuild(self, history: Mapping[str, Mapping[int, Sequence[float]]]) -> None:
        for trial_id, steps in history.items():
            for step, values in steps.items():
                if self._is_rung(trial_id, int(step)):
                    self.rungs.put(trial_id, int(step), values)

    def _is_rung(self, trial_id: str, step: int) -> bool:
        limit = self.max_steps if self.max_steps is not None else step + 1
        return step in rung_steps(self.grace_steps, self.reduction_factor, limit,
                                  bracket_of(trial_id, self.rungs.brackets))

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Tune passes TuneConfig's metric/mode (None when it has none). Accept None or our own
        objectives; a different single metric would mean a single-objective sweep: refuse it."""
        def ours(given: str | Sequence[str] | None, own: list[str]) -> bool:
            return given is None or ([given] if isinstance(given, str) else list(given)) == own
        return ours(metric, self.metrics) and ours(mode, self.modes)

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        step = result.get(RUNG_STEP)
        # done=True: the trial has ended (Tune re-sends a function trainable's last result as
        # its final one); a trial is never pruned at its own final step.
        if step is None or result.get("done") or not self._is_rung(trial.trial_id, int(step)):
            return TrialScheduler.CONTINUE
        if not self._rebuilt:
            self._rebuilt = True
            self._rebuild(self.history_source())
        missing = [m for m in self.metrics if m not in result]
        if missing:
            raise ValueError(f"trial {trial.trial_id}: rung result at step {step} lacks objectives {missing}")
        if self.rungs.record(trial.trial_id, int(step), [result[m] for m in self.metrics]):
            return TrialScheduler.CONTINUE
        self.pruned[trial.trial_id] = int(step)
        if self.on_prune is not None:
            self.on_prune(trial.trial_id, int(step))
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        lines = [f"Using MOASHA: {len(self.pruned)} pruned"]
        for bracket, steps in self.rungs.counts().items():
            rungs = " | ".join(f"step {s}: {n} recorded" for s, n in steps.items())
            lines.append(f"Bracket {bracket}: {rungs or 'no rungs reached'}")
        return "\n".join(lines)

    def __getstate__(self) -> dict:
        # Tuner pickles its TuneConfig, scheduler included, into tuner.pkl when it is built, and a
        # restored Tuner runs that copy: the hooks travel with it, so they must be picklable
        # (sweeps.tune passes functools.partial of module functions); an unpicklable one is dropped
        # with a warning rather than failing the Tuner.
        state = self.__dict__.copy()
        for hook in ("on_prune", "history_source"):
            try:
                pickle.dumps(state[hook])
            except Exception as err:  # noqa: BLE001 - any pickling failure means: cannot travel
                logger.warning("MOASHA.%s cannot be pickled (%s): a restored Tuner runs without it", hook, err)
                state[hook] = None
        return state
