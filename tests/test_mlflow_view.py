"""The saved MLflow view (sweeps/mlflow_view.py): typed JSON that round-trips, the charts and
columns for 2 and 3 objectives, the 20,000-character limit, and publishing on a real sqlite
MLflow store (several sweeps, one experiment) that degrades to warnings, never to a failure:
real refusals only (a dead server, an oversized tag), no fake clients."""

import json
import warnings

import pytest

from sweeps import mlflow_view as mv
from sweeps.spec import SweepSpec

KNOBS = ["alpha", "distill_weight", "epsilon", "data.label_noise"]


def _view(objectives, modes=None, knobs=KNOBS, **kw):
    modes = modes or ["max"] * len(objectives)
    return mv.build_view("tiny-20260101-000000: Pareto", "alignsweep-abc", objectives, modes, knobs, now_ms=1_700_000_000_000, **kw)


def test_view_json_round_trips_through_the_typed_models():
    view = _view(["kd_alignment", "noise_robustness"])
    envelope = view.to_json()
    raw = json.loads(envelope)
    # what the UI validates: string name, number createdAt, *string* state
    assert set(raw) == {"name", "createdAt", "updatedAt", "state"}
    assert isinstance(raw["name"], str) and isinstance(raw["createdAt"], int) and isinstance(raw["state"], str)
    back = mv.SavedView.from_json(envelope)
    assert back == view and back.to_json() == envelope
    state = back.view_state()
    assert state.to_json() == raw["state"]  # envelope -> state -> typed model -> the same JSON
    assert mv.ViewState.model_validate(json.loads(raw["state"])).to_json() == raw["state"]
    # the same inputs give the same JSON (stable uuids), so re-publishing a sweep is idempotent
    assert _view(["kd_alignment", "noise_robustness"]).to_json() == envelope


def test_two_objectives_scatter_parallel_and_columns():
    state = json.loads(_view(["kd_alignment", "noise_robustness"], modes=["max", "min"]).to_json())["state"]
    state = json.loads(state)
    charts = state["compareRunCharts"]
    assert [c["type"] for c in charts] == ["SCATTER", "PARALLEL"]
    scatter, parallel = charts
    assert scatter["xaxis"] == {"key": "kd_alignment", "type": "METRIC"}
    assert scatter["yaxis"] == {"key": "noise_robustness", "type": "METRIC"}
    assert scatter["runsCountToCompare"] == 100 and scatter["deleted"] is False and scatter["isGenerated"] is False
    assert parallel["selectedParams"] == KNOBS and parallel["selectedMetrics"] == ["kd_alignment", "noise_robustness"]
    assert parallel["showAllRuns"] is True
    sections = state["compareRunSections"]
    assert [s["name"] for s in sections] == ["Pareto", "Model metrics", "System metrics"]
    assert sections[0]["display"] is True and not sections[1]["display"] and not sections[2]["display"]
    assert {c["metricSectionId"] for c in charts} == {sections[0]["uuid"]}
    assert set(sections[0]) == {"uuid", "name", "display", "isReordered", "deleted", "isGenerated", "columns", "cardHeight"}
    assert state["isAccordionReordered"] is True
    assert state["selectedColumns"] == ["metrics.`kd_alignment`", "metrics.`noise_robustness`", "tags.`pareto`",
                                        "params.`alpha`", "params.`distill_weight`", "params.`epsilon`",
                                        "params.`data.label_noise`"]
    assert state["orderByKey"] == "metrics.`kd_alignment`" and state["orderByAsc"] is False
    assert state["runsHiddenMode"] == "SHOW_ALL"
    # only keys the UI restores (search facets + UI state; runsExpanded & co. are not restored)
    restored = {"searchFilter", "orderByKey", "orderByAsc", "startTime", "lifecycleFilter", "modelVersionFilter",
                "datasetsFilter", "selectedColumns", "columnOrder", "columnWidths", "runsHiddenMode",
                "compareRunCharts", "compareRunSections", "viewMaximized", "runListHidden", "isAccordionReordered",
                "groupBy", "groupsExpanded", "useGroupedValuesInCharts", "hideEmptyCharts", "globalLineChartConfig",
                "chartsSearchFilter"}
    assert set(state) <= restored
    # a 'min' first objective sorts ascending
    asc = json.loads(json.loads(_view(["attack_success_rate", "accuracy"], modes=["min", "max"]).to_json())["state"])
    assert asc["orderByKey"] == "metrics.`attack_success_rate`" and asc["orderByAsc"] is True


def test_three_objectives_scatter_every_pair():
    objectives = ["kd_alignment", "noise_robustness", "accuracy"]
    state = _view(objectives).view_state()
    scatters = [(c.xaxis.key, c.yaxis.key) for c in state.compare_run_charts if c.type == "SCATTER"]
    assert scatters == [("kd_alignment", "noise_robustness"), ("kd_alignment", "accuracy"), ("noise_robustness", "accuracy")]
    parallel = [c for c in state.compare_run_charts if c.type == "PARALLEL"]
    assert len(parallel) == 1 and parallel[0].selected_metrics == objectives
    assert [f"metrics.`{m}`" for m in objectives] == state.selected_columns[:3]
    # five objectives: 10 pairs, capped at MAX_PAIR_SCATTERS
    five = _view(["kd_alignment", "noise_robustness", "accuracy", "safety_score", "alignment_stability"]).view_state()
    assert sum(c.type == "SCATTER" for c in five.compare_run_charts) == mv.MAX_PAIR_SCATTERS


def test_a_huge_space_is_shrunk_to_fit_the_limit_never_raises():
    knobs = [f"knob_{i:03d}_" + "x" * 200 for i in range(120)]
    objectives = ["kd_alignment", "noise_robustness", "accuracy"]
    with pytest.warns(UserWarning, match="shrunk to fit") as rec:
        view = _view(objectives, knobs=knobs)
    assert view is not None and len(view.to_json()) <= mv.MAX_VIEW_CHARS
    assert "scatters of objective pairs" in str(rec[0].message)  # the extra pairs go first
    state = view.view_state()
    scatters = [c for c in state.compare_run_charts if c.type == "SCATTER"]
    assert len(scatters) == 1 and (scatters[0].xaxis.key, scatters[0].yaxis.key) == ("kd_alignment", "noise_robustness")
    assert state.selected_columns[:4] == ["metrics.`kd_alignment`", "metrics.`noise_robustness`", "metrics.`accuracy`",
                                          "tags.`pareto`"]
    kept = [c for c in state.selected_columns if c.startswith("params.")]
    assert 0 < len(kept) < len(knobs) and kept == [f"params.`{k}`" for k in knobs[: len(kept)]]

    # a view that cannot fit at all is skipped with a warning, not an exception
    with pytest.warns(UserWarning, match="skipped"):
        assert _view(objectives, knobs=knobs, limit=300) is None

    # a small view is left alone, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _view(["kd_alignment", "noise_robustness"]) is not None


def test_view_url():
    assert mv.view_url("http://127.0.0.1:5000/", "3", "alignsweep-ab12") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=alignsweep-ab12&compareRunsMode=CHART")


# -- publishing on a real (sqlite) MLflow store ------------------------------------------------


def _spec(name="tiny"):
    return SweepSpec(name=name, description="toy sweep", trials=3,
                     objectives=[{"metric": "kd_alignment", "mode": "max"}, {"metric": "noise_robustness", "mode": "max"}],
                     space={"alpha": {"kind": "uniform", "low": 0.2, "high": 1.0},
                            "epsilon": {"kind": "uniform", "low": 0.0, "high": 0.2}},
                     sampler={"kind": "random", "seed": 0})


def _fake_sweep(client, experiment_id, name, points):
    from sweeps.tracking import SWEEP_TAG

    parent = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: f"/runs/{name}"}).info.run_id
    rows = []
    for i, (kd, nr) in enumerate(points):
        run = client.create_run(experiment_id, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent}).info.run_id
        rows.append({"run_id": run, "run_name": f"trial-{i}", "kd_alignment": kd, "noise_robustness": nr,
                     "test_kd_alignment": kd - 1, "test_noise_robustness": nr - 2, "alpha": 0.5 + i / 10, "epsilon": 0.1})
    return parent, rows


def test_publish_on_sqlite_two_sweeps_one_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("tiny")
    spec = _spec()
    published = []
    for name, points in [("tiny-1", [(90.0, 40.0), (80.0, 60.0), (70.0, 30.0)]), ("tiny-2", [(95.0, 50.0), (60.0, 20.0)])]:
        parent, rows = _fake_sweep(client, eid, name, points)
        front = {r["run_id"] for r in rows if (r["kd_alignment"], r["noise_robustness"]) in {(90.0, 40.0), (80.0, 60.0), (95.0, 50.0)}}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a clean publish warns about nothing
            vid = mv.publish_sweep_view(client, eid, parent, spec, rows, front, 1234.5, failed=1)
        assert vid == mv.view_id_for(parent)
        published.append((parent, vid, rows, front))

    tags = client.get_experiment(eid).tags
    views = {k: v for k, v in tags.items() if k.startswith(mv.VIEW_TAG_PREFIX)}
    assert set(views) == {mv.VIEW_TAG_PREFIX + vid for _, vid, _, _ in published}  # one view per sweep
    assert sorted(json.loads(v)["name"] for v in views.values()) == ["tiny-1: Pareto", "tiny-2: Pareto"]
    assert tags[mv.PRIMARY_METRIC_TAG] == "kd_alignment"
    for parent, vid, rows, front in published:
        for row in rows:
            color = client.get_run(row["run_id"]).data.tags[mv.RUN_COLOR_TAG]
            assert color == (mv.FRONT_COLOR if row["run_id"] in front else mv.OTHER_COLOR)
        ptags = client.get_run(parent).data.tags
        assert ptags[mv.VIEW_ID_TAG] == vid
        note = ptags[mv.NOTE_TAG]
        assert "toy sweep" in note and "1 failed" in note and "1234.5" in note
        assert f"viewStateShareKey={vid}&compareRunsMode=CHART" in note
        # each objective on test (the report), then on validation (what chose the front)
        assert ("| trial | test_kd_alignment | kd_alignment | test_noise_robustness | noise_robustness | alpha | "
                "epsilon |") in note
        assert note.count(f"](#/experiments/{eid}/runs/") == len(front)  # one table row per front run
    first_note = client.get_run(published[0][0]).data.tags[mv.NOTE_TAG]
    assert "| 89.00 | 90.00 | 38.00 | 40.00 |" in first_note  # trial-0: test 89/38, validation 90/40

    # publishing again (a resumed sweep) rewrites the view in place and keeps its creation time
    parent, vid, rows, front = published[0]
    before = json.loads(views[mv.VIEW_TAG_PREFIX + vid])
    assert mv.publish_sweep_view(client, eid, parent, spec, rows, front, 1234.5, failed=1,
                                 now_ms=before["createdAt"] + 5000) == vid
    after = json.loads(client.get_experiment(eid).tags[mv.VIEW_TAG_PREFIX + vid])
    assert after["createdAt"] == before["createdAt"] and after["updatedAt"] == before["createdAt"] + 5000
    assert after["state"] == before["state"]

    # `alignsweep ui` finds the latest sweep's view
    assert mv.latest_view(uri) == (eid, published[-1][1])
    assert mv.latest_view(uri, "tiny") == (eid, published[-1][1])
    assert mv.latest_view(uri, "nope") is None
    assert mv.latest_view_url(uri, "http://127.0.0.1:5000") == mv.view_url("http://127.0.0.1:5000", eid, published[-1][1])


def test_publish_on_a_dead_server_degrades_to_warnings_and_never_raises(monkeypatch):
    """Every call to a tracking server that is not there fails: publishing warns and returns None."""
    import socket

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused at once
        rows = [{"run_id": "r1", "run_name": "trial-1", "kd_alignment": 90.0, "noise_robustness": 40.0,
                 "alpha": 0.5, "epsilon": 0.1}]
        with pytest.warns(UserWarning, match="could not"):
            assert mv.publish_sweep_view(MlflowClient(dead), "1", "p1", _spec(), rows, {"r1"}, 10.0, failed=0) is None


def test_a_refused_view_leaves_the_other_steps_done(tmp_path, monkeypatch):
    """A real sqlite store refuses an experiment tag over 20,000 characters. Let the view grow past
    that (as a server with a smaller limit would see it): the view is skipped with a warning, runs
    are still coloured, and the parent's description has no link to a view that was not written."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = client.create_experiment("tiny")
    parent, rows = _fake_sweep(client, eid, "tiny-1", [(90.0, 40.0)])
    import functools

    # build_view no longer shrinks the view to the store's limit, so the store itself must refuse it
    monkeypatch.setattr(mv, "build_view", functools.partial(mv.build_view, limit=10**7))
    spec = _spec().model_copy(update={"space": {f"knob_{i:03d}_" + "x" * 200: {"kind": "uniform", "low": 0, "high": 1}
                                                for i in range(120)}})
    with pytest.warns(UserWarning, match="write the saved view"):
        assert mv.publish_sweep_view(client, eid, parent, spec, rows, {rows[0]["run_id"]}, 10.0, failed=0) is None
    assert not [k for k in client.get_experiment(eid).tags if k.startswith(mv.VIEW_TAG_PREFIX)]
    assert client.get_run(rows[0]["run_id"]).data.tags[mv.RUN_COLOR_TAG] == mv.FRONT_COLOR  # the other steps still ran
    tags = client.get_run(parent).data.tags
    assert "viewStateShareKey" not in tags[mv.NOTE_TAG] and "trial-0" in tags[mv.NOTE_TAG]
    assert mv.VIEW_ID_TAG not in tags


def test_description_stays_under_the_run_tag_limit():
    spec = _spec()
    rows = [{"run_id": f"{i:032x}", "run_name": f"trial-{i:05d}", "kd_alignment": 50.0 + i / 1000,
             "noise_robustness": 50.0 - i / 1000, "alpha": 0.5, "epsilon": 0.1} for i in range(500)]
    note = mv.describe_sweep(spec, "1", "alignsweep-x", "tiny: Pareto", rows, {r["run_id"] for r in rows}, 1.0, 0)
    assert len(note) <= mv.MAX_NOTE_CHARS
    assert "more front trials" in note and "pareto_front.csv" in note
