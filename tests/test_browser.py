"""The MLflow UI as the sweep's dashboard, checked in a real browser: a 4-trial sweep (tiny model,
sqlite), a real `mlflow server` on loopback over that database, and headless Debian Chromium
driven by playwright (no browser download). Every request that leaves 127.0.0.1 is refused, so
what renders here renders offline.

Screenshots of each page go to $ALIGNSWEEP_SCREENSHOT_DIR (default: a pytest temp dir); with
ALIGNSWEEP_SAVE_SCREENSHOTS=1 the saved view's is also copied to docs/saved_view.png."""

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeps import mlflow_view as mv
from sweeps.tracking import artifact_root_for
from tests.test_submit import free_port, stop_group, wait_http
from tests.test_sweep import BIN, runs_of, sweep, write_spec

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's package (`make system-deps`); playwright downloads nothing
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
SCATTER_CARD = "[data-testid=experiment-view-compare-runs-card]"
RUN_COLOR = "[data-testid=experiment-view-table-run-color]"


def _rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def _missing(what: str):
    """No skipping: `make test` installs the browser (make system-deps), so a missing one is a failure."""
    pytest.fail(f"{what} (install it: make system-deps)")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_backbone, toy_csv):
    tmp = tmp_path_factory.mktemp("ui-sweep")
    out, uri = sweep(tmp, write_spec(tmp, tiny_backbone, toy_csv, name="tiny", description="4 trials on a tiny BERT"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    client, parents, children = runs_of(uri, "tiny")
    parent = parents[0]
    front = {c.info.run_name for c in children if c.data.tags["pareto"] == "true"}
    return SimpleNamespace(uri=uri, tmp=tmp, client=client, parent=parent, children=children, front=front,
                           eid=parent.info.experiment_id, names=sorted(c.info.run_name for c in children))


@pytest.fixture(scope="module")
def server(swept):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runners: starts ~2x faster
    log = (swept.tmp / "server.log").open("w")
    proc = subprocess.Popen([str(BIN.parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", swept.uri, "--default-artifact-root", artifact_root_for(swept.uri),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("ALIGNSWEEP_SCREENSHOT_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})  # fresh: no UI state from other tests
    refused: list[str] = []

    def loopback_only(route):
        if route.request.url.startswith(("http://127.0.0.1", "blob:", "data:", "file:")):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    ctx.route("**/*", loopback_only)
    # the UI opens its assistant side panel on a first visit (half the page): mark it as seen
    ctx.add_init_script("try { localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true') } catch (e) {}")
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.refused = refused
    try:
        yield pg
    finally:
        ctx.close()


def _wait_count(locator, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (count := locator.count()) != n and time.monotonic() < deadline:
        time.sleep(0.25)
    return count


def test_saved_view_scatter_shows_every_trial_and_the_front_in_red(page, swept, server, shots):
    # the URL `alignsweep ui` prints: the latest sweep's saved view
    url = mv.latest_view_url(swept.uri, server)
    assert url == mv.view_url(server, swept.eid, mv.view_id_for(swept.parent.info.run_id))
    page.goto(url)
    page.wait_for_selector(".scatterlayer .point")
    hide = page.get_by_role("button", name="Hide banner")
    if hide.count() and hide.first.is_visible():
        hide.first.click()
    page.get_by_text(f"{swept.parent.info.run_name}: Pareto").first.wait_for()  # the view is the active one

    scatter = page.locator(SCATTER_CARD).filter(has=page.locator(".scatterlayer"))
    assert scatter.count() == 1  # two objectives: one scatter
    points = scatter.locator(".scatterlayer .point")
    # one point per finished trial, and the CE baseline (the hypervolume reference) in blue
    assert _wait_count(points, len(swept.children) + 1) == len(swept.children) + 1 == 5
    fills = points.evaluate_all("els => els.map(e => e.style.fill || getComputedStyle(e).fill)")
    assert sorted(fills) == sorted([_rgb(mv.FRONT_COLOR)] * len(swept.front) + [_rgb(mv.BASELINE_COLOR)]
                                   + [_rgb(mv.OTHER_COLOR)] * (len(swept.children) - len(swept.front)))
    assert page.locator(SCATTER_CARD).filter(has_text="Parallel Coordinates").count() == 1
    time.sleep(1)  # let the charts finish their transitions before the picture
    page.screenshot(path=str(shots / "saved_view.png"))
    if os.environ.get("ALIGNSWEEP_SAVE_SCREENSHOTS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shots / "saved_view.png", REPO / "docs" / "saved_view.png")


def test_saved_view_table_has_knobs_objectives_pareto_and_colours(page, swept, server, shots):
    url = mv.view_url(server, swept.eid, mv.view_id_for(swept.parent.info.run_id)).replace("=CHART", "=TABLE")
    page.goto(url)
    page.wait_for_selector(RUN_COLOR)
    assert _wait_count(page.locator(RUN_COLOR), 6) == 6  # parent + 4 trials + the baseline, all shown (SHOW_ALL)
    headers = set(page.locator("[role=columnheader]").all_inner_texts())
    assert {"kd_alignment", "noise_robustness", "pareto", "alpha", "distill_weight", "epsilon"} <= headers
    colours = dict(zip(page.locator("[role=row]").filter(has=page.locator(RUN_COLOR)).locator("a").all_inner_texts(),
                       page.locator(f"{RUN_COLOR} input").evaluate_all("els => els.map(e => e.value)")))
    for name in swept.names:
        assert colours[name] == (mv.FRONT_COLOR if name in swept.front else mv.OTHER_COLOR), (name, colours)
    # sorted by the first objective, best first: the top trial is on the front
    best = max(swept.children, key=lambda c: c.data.metrics["kd_alignment"]).info.run_name
    first = page.locator("[role=row][row-index='0']").filter(has=page.locator(RUN_COLOR)).first
    assert best in first.inner_text()
    page.screenshot(path=str(shots / "saved_view_table.png"))


def test_default_runs_page_nests_the_trials_under_the_sweep(page, swept, server, shots):
    page.goto(f"{server}/#/experiments/{swept.eid}/runs")  # default: table sorted by start time
    parent_name = swept.parent.info.run_name
    page.wait_for_selector(f"text={parent_name}")
    rows = page.locator("[role=row]").filter(has=page.locator(RUN_COLOR))
    assert _wait_count(rows, 1) == 1  # only the sweep at the top level; its trials are folded in
    page.locator("[role=row]", has_text=parent_name).locator("[col-id='attributes.`Run Name`'] button").first.click()
    assert _wait_count(rows, 6) == 6  # the 4 trials and the baseline
    order = sorted((int(r.get_attribute("row-index")), r.locator("a").first.inner_text()) for r in rows.all())
    assert order[0][1] == parent_name and sorted(n for _, n in order[1:]) == sorted([*swept.names, "baseline-ce"])
    page.screenshot(path=str(shots / "runs_nested.png"))


def test_parent_description_summarises_and_links_to_the_view(page, swept, server, shots):
    page.goto(f"{server}/#/experiments/{swept.eid}/runs/{swept.parent.info.run_id}")
    link = page.get_by_role("link", name=f"{swept.parent.info.run_name}: Pareto")
    link.wait_for()
    more = page.get_by_text("Show more", exact=True)
    if more.count() and more.first.is_visible():
        more.first.click()  # the description is folded after a few lines
    note = page.locator("[data-testid=note-editor-preview-content]")
    text = note.inner_text()
    for part in ("4 finished, 0 failed", "hypervolume", "Pareto front (1", "4 trials on a tiny BERT"):
        assert part.replace("(1", f"({len(swept.front)}") in text, (part, text)
    front_links = note.locator("table a[href*='/runs/']")
    assert sorted(front_links.all_inner_texts()) == sorted(swept.front)  # the front table links each front trial
    page.screenshot(path=str(shots / "parent_run.png"))
    with page.expect_popup() as popup:  # the UI opens description links in a new tab
        link.click()
    view = popup.value
    view.wait_for_selector(".scatterlayer .point")
    assert "viewStateShareKey=" in view.url


def test_pareto_html_artifact_renders_offline(page, swept, server, shots):
    parent = swept.parent.info.run_id
    page.goto(f"{server}/#/experiments/{swept.eid}/runs/{parent}/artifacts/pareto.html")
    plot = page.frame_locator("iframe").first.locator("#pareto-plot")  # the UI shows HTML in a sandboxed iframe
    plot.locator("svg.main-svg").first.wait_for()
    n = len(swept.children) + len(swept.front)  # the trials trace, then the front trace on top
    assert _wait_count(plot.locator(".scatterlayer .point"), n) == n
    page.screenshot(path=str(shots / "pareto_html.png"))
    assert not [u for u in page.refused if "plot" in u.lower()], page.refused  # no CDN was asked for plotly.js

    # and straight from the artifact store, outside the MLflow UI
    html = Path(artifact_root_for(swept.uri).removeprefix("file://")) / "tiny" / parent / "artifacts" / "pareto.html"
    assert html.exists(), html
    page.goto(html.as_uri())
    page.locator("#pareto-plot svg.main-svg").first.wait_for()
    assert _wait_count(page.locator("#pareto-plot .scatterlayer .point"), n) == n
