"""The MLflow store under concurrent openers: readers and `alignsweep ui` polling a sqlite store
from the first second of a sweep, while the sweep creates it. Two processes creating a fresh
store at once corrupted it (`table _alembic_tmp_experiments already exists`) and the sweep died."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_submit import free_port
from tests.test_sweep import runs_of, sweep, write_spec

BIN = Path(sys.executable).parent / "alignsweep"

READER = """
import os, sys, time
from sweeps import tracking
uri, stop = sys.argv[1], sys.argv[2]
reads = errors = 0
while not os.path.exists(stop):
    try:
        c = tracking.client(uri)
        c.search_experiments()
        reads += 1
    except Exception as e:
        errors += 1
        print("ERR", type(e).__name__, str(e)[:300], flush=True)
    time.sleep(0.05)
print("READS", reads, "ERRORS", errors, flush=True)
"""


@pytest.mark.slow
def test_readers_and_the_ui_opening_a_fresh_store_during_a_sweep(tmp_path, tiny_backbone, toy_csv):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", READER, uri, str(stop)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    port = free_port()
    ui = subprocess.Popen([str(BIN), "ui", "--port", str(port), "--tracking-uri", uri], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = sweep(tmp_path, write_spec(tmp_path, tiny_backbone, toy_csv, name="busy"))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        stop.touch()
        reports = [r.communicate(timeout=60)[0] for r in readers]
        for report in reports:
            assert not [l for l in report.splitlines() if l.startswith("ERR ")] and "ERRORS 0" in report, report[-2000:]
            assert int(report.split("READS")[1].split()[0]) > 10  # it really polled during the sweep
        # the server, started in the same second, serves the finished sweep
        body = json.dumps({"max_results": 10}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", data=body,
                                             headers={"Content-Type": "application/json"})
                names = [e["name"] for e in json.load(urllib.request.urlopen(req, timeout=5))["experiments"]]
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, ui.stdout.read()[-2000:] if ui.poll() else "ui never answered"
                time.sleep(1)
        assert "busy" in names
    finally:
        stop.touch()
        for r in readers:
            if r.poll() is None:
                r.kill()
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)
    with sqlite3.connect(db) as con:
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert not con.execute("select name from sqlite_master where name like '_alembic_tmp%'").fetchall()
    client, parents, children = runs_of(uri, "busy")
    assert parents[0].info.status == "FINISHED" and len(children) == 4
