"""The cluster path on loopback: a real `ray start --head`, a real `mlflow server`, and
`alignsweep submit` of a 2-trial sweep as a Ray Job. Everything started here is stopped by its
process group (never by name)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.test_sweep import write_spec

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:  # it answered (e.g. 401 from a token-auth head): it is up
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(url)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, then SIGKILL whatever is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dash = free_port(), free_port()
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
                             "--include-dashboard=true", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            # a job's `python` is the node's: on a real cluster the image's, here this venv's
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=180)
        yield f"http://127.0.0.1:{dash}"
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def test_submit_runs_a_sweep_as_a_ray_job(ray_head, mlflow_server, tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="submitted", trials=2)
    raw = yaml.safe_load(spec.read_text())
    raw["storage"] = str(tmp_path / "runs")
    spec.write_text(yaml.safe_dump(raw))
    out = subprocess.run([str(BIN / "alignsweep"), "submit", str(spec), "--address", ray_head,
                          "--tracking-uri", mlflow_server], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    assert "2 finished, 0 failed" in out.stdout  # the job's own summary, streamed back

    # The runs are on the server, read over HTTP (REST API), not from a local file.
    def post(path, body):
        req = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=10).read())

    exp = post("experiments/get-by-name", {}) if False else json.loads(urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=submitted", timeout=10).read())
    runs = post("runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    children = [t for t in tags if "mlflow.parentRunId" in t and t.get("role") != "baseline"]
    baselines = [t for t in tags if t.get("role") == "baseline"]
    assert len(runs) == 4 and len(children) == 2 and len(baselines) == 1  # parent, 2 trials, the CE baseline
    assert all(r["info"]["status"] == "FINISHED" for r in runs)


def test_submit_refuses_local_sqlite_for_a_remote_cluster(tmp_path):
    out = subprocess.run([str(BIN / "alignsweep"), "submit", "pareto", "--address", "http://10.0.0.5:8265",
                          "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "sqlite file on this machine" in out.stderr and "Traceback" not in out.stderr
