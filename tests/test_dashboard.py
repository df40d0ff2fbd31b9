"""`optuna-dashboard` on a running sweep's journal, as the README tells users to run it.

A real tiny sweep (the `alignsweep` console script, tiny BERT, toy CSV, sqlite MLflow) writes its
Optuna study to `optuna-journal.log` beside `mlflow.db` through `UnsyncedJournalFileBackend`
(one O_APPEND write per batch, the default symlink lock, no fsync). While it still runs, a real
`optuna-dashboard --host 127.0.0.1` is started on that file and its JSON API is read: the dashboard
opens a path with Optuna's own `JournalFileBackend` (default `JournalFileSymlinkLock`; readers take
no lock) and replays it incrementally as the sweep keeps appending. After the sweep ends the
dashboard must report the same COMPLETE trials as `optuna.load_study` on the same journal.

MLflow brings gunicorn, so the dashboard serves through it (an arbiter and one forked worker, which
inherits the storage); both are stopped by PID and the test checks that nothing of theirs is left."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml

from sweeps.searcher import JOURNAL, study_storage
from tests.helpers import wait_for
from tests.test_submit import free_port
from tests.test_sweep import BIN, write_spec

pytestmark = pytest.mark.slow

DASHBOARD = BIN.parent / "optuna-dashboard"
NAME = "live"
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _get(base: str, route: str) -> dict:
    with _HTTP.open(base + route, timeout=10) as resp:
        assert resp.status == 200, (route, resp.status)
        return json.loads(resp.read())


def _answer(base: str, route: str, timeout: float) -> dict:
    """``GET route`` once the server answers it (gunicorn imports optuna before it binds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(base, route)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _session(sid: int) -> list[int]:
    """Live processes in session ``sid`` (each process below was started as a session leader)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields[0] state, [3] session id
                pids.append(int(entry.name))
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """terminate, wait, kill if needed; then whatever is left of its session, by PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    if not wait_for(lambda: not _session(proc.pid), timeout=20, every=0.2):
        for pid in _session(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert wait_for(lambda: not _session(proc.pid), timeout=20, every=0.2), _session(proc.pid)


def _journal_trials(journal: Path) -> list[optuna.trial.FrozenTrial]:
    """The journal's trials, read as a second reader (Optuna's plain backend; reading takes no lock)."""
    if not journal.is_file():
        return []
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id, deepcopy=False)]


def test_optuna_dashboard_reads_a_running_sweeps_journal(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name=NAME, trials=4)
    raw = yaml.safe_load(spec.read_text())
    raw["train"].update({"budget_steps": 300, "checkpoint_every": 100, "log_every": 50})  # runs for a while
    spec.write_text(yaml.safe_dump(raw))
    searched = {k.replace(".", "/") for k in raw["space"]}  # OptunaSearch flattens nested keys with "/"
    db, journal = tmp_path / "mlflow.db", tmp_path / JOURNAL  # sqlite tracking: the journal is beside the db
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # gunicorn 26 puts its control socket in ~/.gunicorn
    log = (tmp_path / "sweep.log").open("w")
    sweep = subprocess.Popen([str(BIN), "sweep", str(spec), "--tracking-uri", f"sqlite:///{db}",
                              "--storage", str(tmp_path / "runs")], cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True, env=env)
    dash = dash_log = None
    try:
        assert wait_for(lambda: _journal_trials(journal) or sweep.poll() is not None, timeout=400), "no trial"
        assert sweep.poll() is None, "the sweep ended before the dashboard started\n" + (tmp_path / "sweep.log").read_text()[-3000:]

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        dash_log = (tmp_path / "dashboard.log").open("w")
        dash = subprocess.Popen([str(DASHBOARD), "--host", "127.0.0.1", "--port", str(port), str(journal)],
                                cwd=tmp_path, stdout=dash_log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        summaries = _answer(base, "/api/studies", timeout=120)["study_summaries"]
        assert len(summaries) == 1, summaries
        study = summaries[0]
        name = study["study_name"]
        assert re.fullmatch(rf"{NAME}-\d{{8}}-\d{{6}}", name), name  # the sweep directory's name
        assert (tmp_path / "runs" / name).is_dir()
        assert study["directions"] == ["maximize", "maximize"]
        route = f"/api/studies/{study['study_id']}"
        detail = _get(base, route)
        assert detail["name"] == name and detail["directions"] == ["maximize", "maximize"]
        with_params = [t for t in detail["trials"] if t["params"]]
        assert with_params, detail["trials"]
        assert all({p["name"] for p in t["params"]} == searched for t in with_params), with_params
        assert sweep.poll() is None, "the dashboard must have read the journal while the sweep was running"

        # the writer keeps appending: every read during the run answers, and the dashboard catches up
        seen = [len(detail["trials"])]
        while sweep.poll() is None:
            seen.append(len(_get(base, route)["trials"]))
            time.sleep(0.5)
        assert seen == sorted(seen), seen  # never loses a trial it had shown
        assert sweep.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-4000:]

        loaded = optuna.load_study(study_name=name, storage=study_storage(str(journal)))
        complete = sorted(t.number for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE)
        assert len(complete) == 4

        def dashboard_complete() -> list[int]:
            return sorted(t["number"] for t in _get(base, route)["trials"] if t["state"] == "Complete")

        # the dashboard caches a study's trials for 2 s (fewer than 100 trials)
        assert wait_for(lambda: dashboard_complete() == complete, timeout=30), (dashboard_complete(), complete)
        final = _get(base, route)
        assert len(final["trials"]) == len(loaded.trials)
        assert sorted(t["number"] for t in final["best_trials"]) == sorted(t.number for t in loaded.best_trials)
    finally:
        if dash is not None:
            _stop(dash)  # gunicorn: an arbiter and its worker, both in the dashboard's session
            dash_log.close()
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait(timeout=60)
        _stop(sweep)  # Ray's processes leave with the driver; anything still in its session is killed
        log.close()
    assert dash.returncode is not None and not _session(dash.pid) and not _session(sweep.pid)
