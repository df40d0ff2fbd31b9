"""The MLflow UI as the sweep's dashboard: a saved "Pareto" view, coloured front runs and a
markdown summary on the parent run (DESIGN §7, issue 7).

What MLflow 3.17's UI reads (checked in its shipped JS bundle, ``mlflow/server/js/build``):

- experiment tag ``mlflow.sharedViewState.<id>`` = a saved view: the envelope JSON
  ``{"name", "createdAt", "updatedAt", "state"}`` (name a string, createdAt a number in ms, state
  a *string* holding the view's JSON). It appears in the runs page's Views menu and opens at
  ``#/experiments/<eid>/runs?viewStateShareKey=<id>&compareRunsMode=CHART``. The UI restores the
  search facets (sort, filter) and the UI keys below; ``runsExpanded``/``runsHidden``/... are not.
  The UI refuses to save a view over 20,000 characters and the tracking server refuses any
  experiment tag value over 20,000 (``MAX_EXPERIMENT_TAG_VAL_LENGTH``).
- chart cards: ``SCATTER`` with ``xaxis``/``yaxis`` ``{"key", "type": "METRIC"|"PARAM"}``;
  ``PARALLEL`` with ``selectedParams``, ``selectedMetrics``, ``showAllRuns``; every card has
  ``uuid``, ``runsCountToCompare``, ``metricSectionId``, ``deleted``, ``isGenerated``. A section
  is ``{uuid, name, display (expanded), isReordered, deleted, isGenerated}``. On load the UI adds a
  generated chart for every logged metric that has none; they land in "Model metrics", which
  this view ships collapsed so the Pareto section stays in front.
- run tag ``mlflow.runColor`` colours a run in the table and the charts; experiment tag
  ``mlflow.experiment.primaryMetric.name`` puts that metric first in generated charts; run tag
  ``mlflow.note.content`` is the run's markdown description (run tags are cut at 8,000 chars).

Everything is built from typed pydantic models and serialized once; nothing here may fail a
sweep: :func:`publish_sweep_view` turns any error into a warning.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import uuid as uuidlib
import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from sweeps.pareto import FRONT_COLOR, TRIAL_COLOR, default_reference
from sweeps.spec import test_metric

log = logging.getLogger(__name__)

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
RUN_COLOR_TAG = "mlflow.runColor"
NOTE_TAG = "mlflow.note.content"
VIEW_ID_TAG = "alignsweep.view_id"
"""Parent-run tag naming the sweep's saved view (so `alignsweep ui` can find it)."""

MAX_VIEW_CHARS = 20_000
"""MLflow 3.17: the UI refuses to save a larger view; the server refuses a larger experiment tag."""
MAX_NOTE_CHARS = 8_000
"""MLflow 3.17 cuts run tag values (the description included) at 8,000 characters."""
MAX_PAIR_SCATTERS = 6
"""With 3+ objectives: one scatter per pair of objectives, at most this many (4 objectives = 6 pairs)."""

OTHER_COLOR = TRIAL_COLOR  # muted grey; FRONT_COLOR is the same red as pareto.png / pareto.html
BASELINE_COLOR = "#1f77b4"  # the plain-CE baseline run, the hypervolume reference: blue

RunsHiddenMode = Literal["SHOW_ALL", "HIDE_ALL", "FIRST_10_RUNS", "FIRST_20_RUNS", "HIDE_FINISHED_RUNS", "CUSTOM"]
SECTION_PARETO = "Pareto"
PARETO_CARD_HEIGHT = 480
SECTION_MODEL = "Model metrics"  # names the UI uses for its generated sections
SECTION_SYSTEM = "System metrics"


# -- the typed view ---------------------------------------------------------------------------


class _UIModel(BaseModel):
    """snake_case in Python, camelCase (the UI's keys) in JSON; unknown keys are an error."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Axis(_UIModel):
    key: str
    type: Literal["METRIC", "PARAM"] = "METRIC"


class _Card(_UIModel):
    uuid: str
    metric_section_id: str
    runs_count_to_compare: int = 100
    deleted: bool = False
    is_generated: bool = False


class ScatterCard(_Card):
    type: Literal["SCATTER"] = "SCATTER"
    xaxis: Axis
    yaxis: Axis


class ParallelCard(_Card):
    type: Literal["PARALLEL"] = "PARALLEL"
    selected_params: list[str]
    selected_metrics: list[str]
    show_all_runs: bool = True


ChartCard = Annotated[Union[ScatterCard, ParallelCard], Field(discriminator="type")]


class ChartSection(_UIModel):
    uuid: str
    name: str
    display: bool = True  # expanded
    is_reordered: bool = False
    deleted: bool = False
    is_generated: bool = False
    columns: int | None = None  # cards per row (UI default 3)
    card_height: int | None = None  # px (UI default 360)


class ViewState(_UIModel):
    """The part of the runs page a saved view restores: search facets, then UI state."""

    search_filter: str = ""
    order_by_key: str
    order_by_asc: bool
    start_time: str = "ALL"
    lifecycle_filter: str = "Active"
    model_version_filter: str = "All Runs"
    datasets_filter: list[dict[str, Any]] = Field(default_factory=list)
    selected_columns: list[str]
    runs_hidden_mode: RunsHiddenMode = "SHOW_ALL"
    compare_run_charts: list[ChartCard]
    compare_run_sections: list[ChartSection]
    is_accordion_reordered: bool = True  # keep our section order (else the UI sorts by name)
    view_maximized: bool = False
    run_list_hidden: bool = False
    hide_empty_charts: bool = True

    def to_json(self) -> str:
        return _dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


class SavedView(_UIModel):
    """The envelope stored as the experiment tag's value; ``state`` is a JSON *string*."""

    name: str
    created_at: int
    updated_at: int
    state: str

    def to_json(self) -> str:
        return _dumps(self.model_dump(mode="json", by_alias=True))

    def view_state(self) -> ViewState:
        return ViewState.model_validate_json(self.state)

    @classmethod
    def from_json(cls, value: str) -> SavedView:
        return cls.model_validate_json(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def metric_col(name: str) -> str:
    return f"metrics.`{name}`"


def param_col(name: str) -> str:
    return f"params.`{name}`"


def tag_col(name: str) -> str:
    return f"tags.`{name}`"


def view_id_for(parent_run_id: str) -> str:
    """One view per sweep: the id is the parent run's, so sweeps in one experiment never collide."""
    return f"alignsweep-{parent_run_id}"


def view_url(tracking_server_base: str, experiment_id: str, view_id: str) -> str:
    return f"{tracking_server_base.rstrip('/')}/{view_fragment(experiment_id, view_id)}"


def view_fragment(experiment_id: str, view_id: str) -> str:
    """The in-app link (hash route) that opens the saved view in chart mode."""
    return (f"#/experiments/{quote(str(experiment_id))}/runs?viewStateShareKey={quote(view_id)}"
            f"&compareRunsMode=CHART")


# -- building it ------------------------------------------------------------------------------


def _uid(view_id: str, what: str) -> str:
    """Stable uuids: rebuilding the same view gives the same JSON."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{view_id}/{what}"))


def objective_pairs(objectives: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs to scatter: the two objectives, or with 3+ every pair (first objective's pairs first),
    at most :data:`MAX_PAIR_SCATTERS`."""
    return list(itertools.combinations(objectives, 2))[:MAX_PAIR_SCATTERS]


def build_state(view_id: str, objectives: Sequence[str], modes: Sequence[str], knobs: Sequence[str],
                pairs: Sequence[tuple[str, str]] | None = None, parallel_knobs: Sequence[str] | None = None,
                column_knobs: Sequence[str] | None = None, parallel: bool = True) -> ViewState:
    """The view's state; the optional arguments select a smaller view (see :func:`build_view`)."""
    if len(objectives) < 2 or len(modes) != len(objectives):
        raise ValueError("a Pareto view needs two or more objectives, each with a mode")
    pairs = objective_pairs(objectives) if pairs is None else pairs
    parallel_knobs = list(knobs) if parallel_knobs is None else list(parallel_knobs)
    column_knobs = list(knobs) if column_knobs is None else list(column_knobs)
    section = _uid(view_id, "section/pareto")
    charts: list[ScatterCard | ParallelCard] = [
        ScatterCard(uuid=_uid(view_id, f"scatter/{x}/{y}"), metric_section_id=section,
                    xaxis=Axis(key=x), yaxis=Axis(key=y))
        for x, y in pairs]
    if parallel:
        charts.append(ParallelCard(uuid=_uid(view_id, "parallel"), metric_section_id=section,
                                   selected_params=parallel_knobs, selected_metrics=list(objectives)))
    sections = [ChartSection(uuid=section, name=SECTION_PARETO, display=True, is_reordered=True,
                             columns=2, card_height=PARETO_CARD_HEIGHT),
                # the UI adds a chart per logged metric here; shipped collapsed
                ChartSection(uuid=_uid(view_id, "section/model"), name=SECTION_MODEL, display=False, is_generated=True),
                ChartSection(uuid=_uid(view_id, "section/system"), name=SECTION_SYSTEM, display=False, is_generated=True)]
    columns = [*(metric_col(m) for m in objectives), tag_col("pareto"), *(param_col(k) for k in column_knobs)]
    return ViewState(order_by_key=metric_col(objectives[0]), order_by_asc=modes[0] == "min",
                     selected_columns=columns, runs_hidden_mode="SHOW_ALL",
                     compare_run_charts=charts, compare_run_sections=sections)


def _variants(objectives: Sequence[str], knobs: Sequence[str]):
    """Ever smaller views, least important parts dropped first: (what is dropped so far, kwargs)."""
    pairs = objective_pairs(objectives)
    yield [], {}
    first, dropped = pairs[:1], []
    if len(pairs) > 1:
        dropped = [f"the scatters of objective pairs after the first ({len(pairs) - 1})"]
        yield dropped, {"pairs": first}
    n = len(knobs)
    while n > 0:
        n //= 2
        yield ([*dropped, f"knobs after the first {n} of {len(knobs)} (parallel chart and columns)"],
               {"pairs": first, "parallel_knobs": knobs[:n], "column_knobs": knobs[:n]})
    yield ([*dropped, "the parallel-coordinates chart and every knob column"],
           {"pairs": first, "column_knobs": [], "parallel": False})


def build_view(name: str, view_id: str, objectives: Sequence[str], modes: Sequence[str], knobs: Sequence[str],
               now_ms: int | None = None, limit: int = MAX_VIEW_CHARS) -> SavedView | None:
    """The saved view, shrunk until its serialized envelope fits ``limit`` characters; ``None``
    (with a warning) when even the smallest view does not fit."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    knobs = list(knobs)
    for dropped, kwargs in _variants(objectives, knobs):
        state = build_state(view_id, objectives, modes, knobs, **kwargs)
        view = SavedView(name=name, created_at=now_ms, updated_at=now_ms, state=state.to_json())
        if len(view.to_json()) <= limit:
            if dropped:
                warnings.warn(f"saved view '{name}' shrunk to fit MLflow's {limit}-character limit: "
                              f"dropped {'; '.join(dropped)}", stacklevel=2)
            return view
    warnings.warn(f"saved view '{name}' skipped: even its smallest form exceeds MLflow's "
                  f"{limit}-character limit", stacklevel=2)
    return None


# -- the parent run's description -------------------------------------------------------------


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def describe_sweep(spec, experiment_id: str, view_id: str | None, view_name: str, rows: list[dict],
                   front_run_ids: set[str], hypervolume: float, failed: int, killed: int = 0,
                   limit: int = MAX_NOTE_CHARS, reference: Sequence[float] | None = None,
                   test_hypervolume: float | None = None) -> str:
    """Markdown for the parent run: spec, counts, hypervolume, link to the view, the front (chosen
    on validation; its table shows each objective on test, then on validation)."""
    objectives, modes, knobs = spec.metrics, spec.modes, list(spec.space)
    ref = [round(v, 2) for v in reference] if reference is not None else (spec.reference or default_reference(modes))
    columns = [c for o in objectives for c in (test_metric(o), o)]
    on_test = f"; on test {test_hypervolume:.1f}" if test_hypervolume is not None else ""
    lines = [f"## Sweep `{spec.name}`", ""]
    if view_id:  # first: the UI folds a long description after a few lines
        lines += [f"**Saved view: [{view_name}]({view_fragment(experiment_id, view_id)})** (scatter of the objectives, "
                  "parallel coordinates, front runs in red)", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    front = [r for r in rows if r["run_id"] in front_run_ids]
    if modes:
        front.sort(key=lambda r: r.get(objectives[0], math.nan) * (-1 if modes[0] == "max" else 1))

    def head(shown: list[str]) -> str:
        hidden = f" and {len(knobs) - len(shown)} more (spec.yaml)" if len(shown) < len(knobs) else ""
        return "\n".join(lines + [
            f"- **trials**: {len(rows)} finished, {failed} failed, {killed} killed (of {spec.num_trials()} planned)",
            "- **objectives**: " + ", ".join(f"`{o}` ({m})" for o, m in zip(objectives, modes)),
            f"- **hypervolume** (validation): {hypervolume:.1f} (reference {ref}){on_test}",
            f"- **sampler**: {spec.sampler.kind} (seed {spec.sampler.seed}); **searched**: "
            + (", ".join(f"`{k}`" for k in shown) or "nothing") + hidden,
            "- artifacts: `pareto.html` (interactive), `pareto.png`, `pareto_front.csv`/`.json`, `spec.yaml`",
            "", f"### Pareto front ({len(front)} of {len(rows)} finished trials; chosen on validation, "
            "`test_*` columns are the held-out report)", "",
            "| trial | " + " | ".join(columns + shown) + " |",
            "|---" * (1 + len(columns) + len(shown)) + "|"])

    # Many long knob names: the table keeps the first knobs that leave room for the front's rows.
    shown = list(knobs)
    while shown and len(head(shown)) > limit // 2:
        shown.pop()
    text = head(shown)
    knobs = shown  # the table's columns from here on
    for i, r in enumerate(front):
        link = f"[{_cell(r.get('run_name', r['run_id']))}](#/experiments/{experiment_id}/runs/{r['run_id']})"
        row = "| " + " | ".join([link, *(_cell(r.get(k, "")) for k in columns + knobs)]) + " |"
        more = f"\n\n... and {len(front) - i} more front trials: see `pareto_front.csv`"
        if len(text) + len(row) + 1 + len(more) > limit:
            return text + more
        text += "\n" + row
    return text


# -- publishing -------------------------------------------------------------------------------


def _guard(what: str, fn, *args, **kwargs):
    """Run one publishing step; any failure (an older MLflow, a refused tag) is a warning."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the UI dressing must never fail a sweep
        msg = f"MLflow UI view: could not {what}: {type(err).__name__}: {err}"
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)
        return None


def publish_sweep_view(client, experiment_id: str, parent_run_id: str, spec, rows: list[dict],
                       front_run_ids: set[str] | Sequence[str], hypervolume: float, failed: int,
                       killed: int = 0, now_ms: int | None = None, reference: Sequence[float] | None = None,
                       test_hypervolume: float | None = None, baseline_run_id: str | None = None) -> str | None:
    """Dress the sweep for the MLflow UI. Returns the saved view's id, or ``None`` if it was not
    written. Each step is independent and degrades to a warning; this never raises."""
    try:
        front_ids = set(front_run_ids)
        view_id = view_id_for(parent_run_id)
        run_name = _guard("read the parent run", lambda: client.get_run(parent_run_id).info.run_name) or spec.name
        name = f"{run_name}: Pareto"
        view = _guard("build the saved view", build_view, name, view_id, spec.metrics, spec.modes,
                      list(spec.space), now_ms=now_ms)
        created = _guard("read the existing view", _created_at, client, experiment_id, view_id)
        if view is not None and created is not None:  # a resumed sweep updates its view, keeps its birth
            view = view.model_copy(update={"created_at": created})
        written = None
        if view is not None:
            _guard("write the saved view", client.set_experiment_tag, experiment_id, VIEW_TAG_PREFIX + view_id,
                   view.to_json())
            written = view_id if _saved(client, experiment_id, view_id) else None
        _guard("set the primary metric", client.set_experiment_tag, experiment_id, PRIMARY_METRIC_TAG, spec.metrics[0])
        for row in rows:
            color = FRONT_COLOR if row["run_id"] in front_ids else OTHER_COLOR
            _guard(f"colour run {row['run_id']}", client.set_tag, row["run_id"], RUN_COLOR_TAG, color)
        if baseline_run_id:  # shown in the view's scatter too: where the reference point lies
            _guard("colour the baseline run", client.set_tag, baseline_run_id, RUN_COLOR_TAG, BASELINE_COLOR)
        note = _guard("describe the sweep", describe_sweep, spec, experiment_id, written, name, rows,
                      front_ids, hypervolume, failed, killed, reference=reference, test_hypervolume=test_hypervolume)
        if note:
            _guard("write the parent description", client.set_tag, parent_run_id, NOTE_TAG, note)
        if written:
            _guard("tag the parent with its view", client.set_tag, parent_run_id, VIEW_ID_TAG, written)
        return written
    except Exception as err:  # noqa: BLE001 - belt and braces: never fail the sweep
        msg = f"MLflow UI view: skipped: {type(err).__name__}: {err}"
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
        return None


def _created_at(client, experiment_id: str, view_id: str) -> int | None:
    value = (client.get_experiment(experiment_id).tags or {}).get(VIEW_TAG_PREFIX + view_id)
    return SavedView.from_json(value).created_at if value else None


def _saved(client, experiment_id: str, view_id: str) -> bool:
    exp = _guard("read the experiment back", client.get_experiment, experiment_id)
    return exp is not None and VIEW_TAG_PREFIX + view_id in (exp.tags or {})


# -- reading it back --------------------------------------------------------------------------


def latest_view(uri: str, experiment: str | None = None) -> tuple[str, str] | None:
    """(experiment id, view id) of the most recent sweep that has a saved view, in ``experiment``
    or in any experiment; ``None`` if there is none (or the store cannot be read)."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import SWEEP_TAG

    try:
        client = MlflowClient(tracking_uri=uri)
        if experiment is not None:
            exp = client.get_experiment_by_name(experiment)
            exps = [exp] if exp is not None else []
        else:
            exps = client.search_experiments(max_results=1000)
        if not exps:
            return None
        tags = {e.experiment_id: e.tags or {} for e in exps}
        runs = client.search_runs(list(tags), filter_string=f"tags.`{SWEEP_TAG}` != ''",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        for run in runs:
            vid = run.data.tags.get(VIEW_ID_TAG)
            if vid and VIEW_TAG_PREFIX + vid in tags.get(run.info.experiment_id, {}):
                return run.info.experiment_id, vid
    except Exception as err:  # noqa: BLE001 - a convenience for `alignsweep ui`, never fatal
        log.warning("could not look up the latest saved view: %s: %s", type(err).__name__, err)
    return None


def latest_view_url(uri: str, tracking_server_base: str, experiment: str | None = None) -> str | None:
    """The URL that opens the latest sweep's saved view on a server at ``tracking_server_base``."""
    found = latest_view(uri, experiment)
    return view_url(tracking_server_base, *found) if found else None
