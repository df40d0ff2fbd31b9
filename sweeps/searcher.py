"""The sweep's searcher: multi-objective Optuna inside Ray Tune, its sampler, search space and study storage.

Imported only once a sweep really starts (it imports Ray Tune and Optuna): the CLI validates
everything before that.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from sweeps.moasha import RUNG_STEP
from sweeps.spec import SweepSpec, nest

log = logging.getLogger(__name__)

JOURNAL = "optuna-journal.log"
TUNE_TRIAL_ATTR = "tune_trial_id"
"""User attr of each Optuna trial: the Tune trial it was suggested for (the MLflow child's ``tune_trial_id``)."""
SWEEP_RECORD = "alignsweep-sweep.json"
"""The sweep's identity in its Tune directory: spec, spec hash and target trial count. Tune copies
every ``*.json`` of the experiment directory to the driver before it restores the searcher."""


class SweepSearcher(OptunaSearch):
    """OptunaSearch as a sweep needs it.

    1. A trial without a finite value for every objective is told FAIL instead of staying
       RUNNING forever (Optuna refuses NaN; DESIGN §7).
    2. It stops suggesting once the study holds ``max_trials`` trials that count, so a resumed
       sweep ends with exactly N: trials Tune forgot after a driver kill but that did finish
       count; trials failed as orphans (``user_attrs["orphaned"]``) do not. Tune itself runs
       with ``num_samples=-1`` so that this count alone ends the sweep and can grow on resume.
    3. ``restore_from_dir`` takes the target trial count from the sweep record (``SWEEP_RECORD``)
       rather than from its own pickled state: ``--resume --trials N`` writes the record.
    4. A trial an early-stopping scheduler stopped at a rung is told PRUNED, with its rung values
       as user attrs: Ray's controller calls ``on_trial_complete`` with the rung result, which
       OptunaSearch would tell COMPLETE with the truncated values (DESIGN §7).
    5. ``journal_mirror``: with object storage (s3://, gs://) the journal file lives on the
       driver's disk and a copy rides in every searcher save, which Tune uploads beside the
       experiment state; a resubmitted job downloads it again (see sweeps.tune).
    """

    def __init__(self, *args, max_trials: int | None = None, journal_mirror: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_trials = max_trials
        self.journal_mirror = journal_mirror  # local journal path to copy into each save, or None
        self._counted: int | None = None  # trials that count, read from the study once per driver

    def suggest(self, trial_id: str):
        if self.max_trials is None or trial_id in self._ot_trials:
            return super().suggest(trial_id)
        if self._counted is None:
            # Read the study once (a resumed driver: it may hold trials Tune forgot), then count
            # locally: reading every trial back on each suggest costs O(trials) per trial.
            self._counted = sum(1 for t in self._ot_study.get_trials(deepcopy=False)
                                if t.state != TrialState.FAIL or not t.user_attrs.get("orphaned"))
        if self._counted >= self.max_trials:
            return self.FINISHED
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._counted += 1
            # lets a resumed driver match a trial Tune forgot to the MLflow run it finished (settle_orphans)
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return params

    def save(self, checkpoint_path: str) -> None:
        """OptunaSearch.save, without the Optuna trials already told: Tune saves the searcher with
        its driver state every second, and pickling every trial's ``optuna.Trial`` cost ~17 ms a
        save at 1,000 trials (O(trials)); the study holds them anyway. A restored searcher needs
        only the trials still in flight (``owned_trial_numbers``); a told trial that Tune reports
        again is still ignored: its id stays in ``_completed_trials``."""
        state = self.__dict__.copy()
        state["_ot_trials"] = {tid: t for tid, t in self._ot_trials.items() if tid not in self._completed_trials}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        super().save_to_dir(checkpoint_dir, session_str)
        if self.journal_mirror and Path(self.journal_mirror).is_file():
            shutil.copyfile(self.journal_mirror, Path(checkpoint_dir) / JOURNAL)

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        super().restore_from_dir(checkpoint_dir)
        self._counted = None  # the study may have moved on since this state was saved
        record = Path(checkpoint_dir) / SWEEP_RECORD
        if record.is_file():
            self.max_trials = json.loads(record.read_text())["trials"]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)  # told before a driver kill; resumed trial re-reported it
            return
        values = [None if not result else result.get(m) for m in self.metric]
        if not error and result and RUNG_STEP in result and "trial_status" not in result:
            self._completed_trials.add(trial_id)
            step = int(result[RUNG_STEP])
            ot_trial.set_user_attr("pruned_at_step", step)
            ot_trial.set_user_attr(f"rung_{step}", values)
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
            return
        if error or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            self._completed_trials.add(trial_id)
            try:
                self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
            except RuntimeError as exc:
                # GridSampler calls study.stop() once the grid is used up, which raises outside
                # study.optimize() after the state is already stored; OptunaSearch swallows it too.
                log.debug("optuna tell: %s", exc)
            return
        super().on_trial_complete(trial_id, result, error)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def owned_trial_numbers(self) -> set[int]:
        """Optuna trial numbers of the Tune trials this (restored) searcher still waits on."""
        return {t.number for tid, t in self._ot_trials.items() if tid not in self._completed_trials}


class SweepSearchGenerator(SearchGenerator):
    """Tune's wrapper around the searcher, which remembers on restore that the searcher once said
    FINISHED. Here the searcher alone decides (``max_trials``), so a restored sweep asks it again:
    after ``--resume --trials N`` it suggests the new trials, otherwise it says FINISHED at once."""

    def __init__(self, searcher: SweepSearcher, concurrency: int):
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=concurrency))

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._finished = False


class CachedTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE, suggesting exactly what it would, without rebuilding every finished trial's
    parameters on each suggest.

    On every suggest TPE turns each trial of the study into its internal representation, twice
    (the "below" and "above" sets), one parameter at a time in Python: at ~1,000 trials that was
    the largest single cost of a suggest (benchmarks/scale.py row 5d). A finished trial's
    parameters never change, so its row is computed once per search space and kept; running
    trials (whose constant-liar parameters Optuna reads from system attrs) are computed as before.
    Same arrays, same order, same dtypes: the samples are identical, seed for seed."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._rows: dict[str, dict[int, tuple | None]] = {}  # search space -> trial id -> row or None

    def _get_internal_repr(self, trials, search_space, study):
        names = list(search_space)
        rows = self._rows.setdefault(repr(sorted(search_space.items())), {})
        kept = []
        for trial in trials:
            row = rows.get(trial._trial_id, False)
            if row is False:
                params = self._get_params(trial, study)
                row = (tuple(search_space[n].to_internal_repr(params[n]) for n in names)
                       if search_space.keys() <= params.keys() else None)
                if trial.state.is_finished():
                    rows[trial._trial_id] = row
            if row is not None:
                kept.append(row)
        columns = list(zip(*kept)) if kept else [()] * len(names)
        return {n: np.asarray(list(col)) for n, col in zip(names, columns)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rows"] = {}  # rebuilt on the first suggest; not worth a line of the searcher's saves
        return state


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    seed, n = spec.sampler.seed, spec.num_trials()
    kind = spec.sampler.kind
    if kind == "tpe":
        # constant_liar: concurrent trials see pending ones as bad, so they spread out
        return CachedTPESampler(seed=seed, multivariate=True, constant_liar=True,
                                n_startup_trials=min(10, max(4, n // 3)))
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, 2 * spec.concurrency)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.GridSampler({k.replace(".", "/"): d.values for k, d in spec.space.items()}, seed=seed)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The spec's search space as Tune domains (nested like TrainConfig)."""

    def domain(d):
        if d.kind == "uniform":
            return tune.uniform(d.low, d.high)
        if d.kind == "loguniform":
            return tune.loguniform(d.low, d.high)
        if d.kind == "int":
            return tune.randint(int(d.low), int(d.high) + 1)
        return tune.choice(list(d.values))  # choice, and grid (the GridSampler walks it)

    return nest({k: domain(d) for k, d in spec.space.items()})


def journal_path(tracking_uri: str, storage_root: str, sweep_name: str, cache_dir: Path) -> tuple[str, bool]:
    """Where the study's journal lives, and whether it must be mirrored to object storage.

    - sqlite tracking: beside the MLflow database (``optuna-dashboard <path>`` opens it live);
    - else a local or shared-filesystem storage path: in it, so a resubmitted job finds it;
    - else (s3://, gs://: no file locks there) on the driver's disk under ``cache_dir``, keyed by
      the sweep's name, with a copy saved beside Tune's experiment state (:class:`SweepSearcher`).
    """
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / JOURNAL), False
    if "://" not in storage_root:
        return str(Path(storage_root) / JOURNAL), False
    return str(Path(cache_dir) / "studies" / sweep_name / JOURNAL), True


def study_storage(location: str) -> optuna.storages.BaseStorage:
    """Optuna storage for a ``optuna_storage`` value: a database URL (``sqlite:///…``,
    ``postgresql://…``) or the path of a journal file.

    A journal (append-only file, replayed in memory) rather than sqlite: on sqlite every suggest
    reads the whole study back, ~40x the in-memory searcher's cost at 100 trials; the journal's
    is ~2x (DESIGN §7; benchmarks/scale.py rows 5d and 5e)."""
    if "://" in location:
        return optuna.storages.RDBStorage(location, engine_kwargs={"connect_args": {"timeout": 30}}
                                          if location.startswith("sqlite") else {})
    from sweeps.journal import UnsyncedJournalFileBackend

    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(UnsyncedJournalFileBackend(location))


def fail_orphaned_trials(study: optuna.Study, owned: set[int],
                         finished: dict[str, list[float]] | None = None) -> int:
    """Settle every RUNNING Optuna trial not in ``owned``: after a driver kill, the trials started
    after Tune's last save belong to no Tune trial. One whose Tune trial finished its MLflow run
    before the kill (``finished``: tune trial id -> its objective values) is told COMPLETE with
    those values (user attr ``adopted``), so that the study and MLflow agree and the finished work
    counts; the rest are told FAIL (user attr ``orphaned``). Returns how many were failed."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in owned:
            continue
        trial = optuna.Trial(study, t._trial_id)
        values = (finished or {}).get(t.user_attrs.get(TUNE_TRIAL_ATTR, ""))
        if values is not None and all(math.isfinite(v) for v in values):
            trial.set_user_attr("adopted", True)
            study.tell(t.number, values)
            continue
        trial.set_user_attr("orphaned", True)
        study.tell(t.number, state=TrialState.FAIL)
        n += 1
    return n
