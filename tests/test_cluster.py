"""A sweep on a two-node Ray cluster on loopback: two `ray start` processes on this machine, each
node with its own HOME (so its own ~/.cache/alignsweep, as on two machines), the driver a third
process on the head's HOME.

What must hold (issue 13): the driver builds the shared artifacts once and every trial on either
node trains on them through Ray's object store (node 2 builds nothing and never sees a data
wheel); the metrics equal a single-node sweep's; a node that dies mid-sweep costs only its
trials' progress since their last checkpoint, and the sweep still ends with N finished runs, no
duplicates, none RUNNING. Everything started here is stopped by its process group, never by name.

Ray resolves a node's 127.0.0.1 to the machine's own address and listens on every interface
(`ray start --node-ip-address` cannot pin it to loopback); this machine has no outside network.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import assert_study_agrees_with_mlflow, wait_for
from tests.test_submit import free_port, stop_group
from tests.test_sweep import OBJ, runs_of, write_spec

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# The GCS declares a silent node dead after period x threshold (default 3 s x 5 plus timeouts);
# a shorter watch keeps the node-kill test short. Only the head's GCS reads these.
FAST_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "3"}


class Node:
    """One `ray start --block` process group with its own HOME."""

    def __init__(self, home: Path, args: list[str], env: dict[str, str] | None = None):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in os.environ.items() if k not in ("ALIGNSWEEP_CACHE", "RAY_ADDRESS")}
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                                      f"--dashboard-agent-listen-port={free_port()}", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**clean, "HOME": str(home), **(env or {}),
                                          "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})

    def raylet(self) -> psutil.Process | None:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return next((p for p in kids if p.name() == "raylet"), None)

    @property
    def node_id(self) -> str:
        raylet = self.raylet()
        assert raylet is not None, "this node has no raylet"
        return next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))

    @property
    def cache(self) -> Path:
        return self.home / ".cache" / "alignsweep"


def _alive_nodes(address: str) -> int:
    out = subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True, text=True, timeout=60)
    return sum(1 for line in out.stdout.splitlines() if line.strip().startswith("1 node_"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    temp = tempfile.mkdtemp(prefix="r2", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    head = Node(root / "home-head", ["--head", f"--port={gcs}", "--include-dashboard=false", f"--temp-dir={temp}"],
                FAST_DEATH)
    nodes = [head]
    try:
        assert wait_for(lambda: head.raylet() is not None, 120), "the head did not start"
        nodes.append(Node(root / "home-node2", [f"--address={address}"]))
        assert wait_for(lambda: _alive_nodes(address) == 2, 120, every=2), "node 2 did not join"
        yield address, head, nodes[1]
    finally:
        for node in reversed(nodes):
            stop_group(node.proc)


def _spec(tmp_path: Path, tiny_backbone: str, toy_csv: str, name: str, **train) -> Path:
    """A sweep whose trials use each node's default cache (the HOME's), not an explicit cache_dir."""
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name=name, trials=4, concurrency=2)
    raw = yaml.safe_load(spec.read_text())
    del raw["train"]["cache_dir"]
    raw["train"].update(train)
    raw["storage"] = str(tmp_path / "runs")  # one path every node sees: here the same disk
    spec.write_text(yaml.safe_dump(raw))
    return spec


def _driver(spec: Path, uri: str, home: Path, address: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNSWEEP_CACHE", "RAY_ADDRESS")}
    cmd = [str(BIN / "alignsweep"), "sweep", str(spec), "--tracking-uri", uri, *(["--address", address] if address else [])]
    return subprocess.Popen(cmd, cwd=spec.parent, env={**env, "HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def _by_params(uri: str, name: str) -> dict[tuple, dict[str, float]]:
    _, _, children = runs_of(uri, name)
    keys = ("distill_weight", "epsilon", "alpha")
    return {tuple(c.data.params[k] for k in keys): c.data.metrics for c in children if c.info.status == "FINISHED"}


def test_trials_on_both_nodes_train_on_the_drivers_artifacts(cluster, tmp_path, tiny_backbone, toy_csv):
    address, head, node2 = cluster
    spec = _spec(tmp_path, tiny_backbone, toy_csv, "two-nodes", budget_steps=40)
    uri = f"sqlite:///{tmp_path / 'cluster.db'}"
    driver = _driver(spec, uri, head.home, address)
    _finish(driver)
    assert_study_agrees_with_mlflow(uri, "two-nodes", 4, OBJ)

    _, _, children = runs_of(uri, "two-nodes")
    nodes = {c.data.tags["ray_node_id"] for c in children}
    assert nodes == {head.node_id, node2.node_id}, nodes  # trials ran on both nodes
    # Node 2 built nothing: no cache misses, no features, no teacher, no data wheels in its HOME.
    assert not node2.cache.exists() or not any(node2.cache.rglob("*")), sorted(node2.cache.rglob("*"))
    # On the head's HOME every miss is the driver's own (its pid), none a trial's.
    misses = (head.cache / "misses.log").read_text().splitlines()
    assert misses and all(line.endswith(f"pid={driver.pid}") for line in misses), misses

    # The same sweep on one embedded node gives the same metrics, trial for trial.
    single_uri = f"sqlite:///{tmp_path / 'single.db'}"
    _finish(_driver(spec, single_uri, head.home, None))
    two, one = _by_params(uri, "two-nodes"), _by_params(single_uri, "two-nodes")
    assert two.keys() == one.keys() and len(two) == 4
    for params, metrics in two.items():
        for m in (*OBJ, *(f"test_{o}" for o in OBJ), "accuracy"):
            assert metrics[m] == pytest.approx(one[params][m], abs=1e-6), (params, m)


def _checkpointed_step(db: Path, node_id: str) -> int:
    """The highest step logged by a RUNNING trial on ``node_id`` (step losses are written at checkpoints)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("select max(m.step) from metrics m join tags t on m.run_uuid = t.run_uuid "
                              "join runs r on r.run_uuid = m.run_uuid where t.key = 'ray_node_id' and t.value = ? "
                              "and r.status = 'RUNNING' and m.key = 'loss'", (node_id,)).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0] or 0)


def test_a_node_that_dies_costs_only_its_trials_progress(cluster, tmp_path, tiny_backbone, toy_csv):
    """Runs last in this module: node 2 does not come back."""
    address, head, node2 = cluster
    spec = _spec(tmp_path, tiny_backbone, toy_csv, "node-kill", budget_steps=600, checkpoint_every=50, log_every=50)
    db = tmp_path / "kill.db"
    uri = f"sqlite:///{db}"
    victim = node2.node_id
    driver = _driver(spec, uri, head.home, address)
    try:
        assert wait_for(lambda: _checkpointed_step(db, victim) >= 100, 300), "no trial on node 2 checkpointed"
        # SIGKILL the raylet and its workers at once, as when the machine dies: a worker alone takes
        # seconds to notice its dead raylet, and a fast trial finished its run in that time (seen here)
        raylet = node2.raylet()
        for proc in [*raylet.children(recursive=True), raylet]:
            proc.kill()
    except BaseException:
        stop_group(driver)
        raise
    out = _finish(driver)
    assert_study_agrees_with_mlflow(uri, "node-kill", 4, OBJ)  # 4 finished, no duplicates, none RUNNING

    client, _, children = runs_of(uri, "node-kill")
    resumed = [c for c in children if "resumed_from_step" in c.data.tags]
    assert resumed, out[-3000:]
    for c in resumed:  # continued on the head from its last checkpoint, not from step 0, in the same run
        step = int(c.data.tags["resumed_from_step"])
        assert step >= 100 and step % 50 == 0 and c.data.tags["ray_node_id"] == head.node_id
        assert c.data.tags["restarts"] == "1"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "loss")][-1] == 600
    assert all(c.info.status == "FINISHED" for c in children)
