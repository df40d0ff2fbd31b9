"""MLflow tracking on a real PostgreSQL server (Debian's package, started here on loopback):
a sweep leaves the same nested runs and the same front as with sqlite."""

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.test_submit import free_port, stop_group
from tests.test_sweep import runs_of, sweep, write_spec


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, "PostgreSQL is not installed: .ci/run installs Debian's postgresql package"
    return found[-1]


@pytest.fixture(scope="module")
def postgres_uri():
    data = Path(tempfile.mkdtemp(prefix="alignsweep-pg-"))
    run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]  # initdb refuses to run as root
    if run_as:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run([*run_as, pg_bin("initdb"), "-D", str(data / "db"), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([*run_as, pg_bin("postgres"), "-D", str(data / "db"), "-p", str(port),
                             "-h", "127.0.0.1", "-k", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            if subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"], check=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        stop_group(proc)
        shutil.rmtree(data, ignore_errors=True)


def _summary(uri, experiment):
    _, parents, children = runs_of(uri, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    rows = {}
    for c in children:
        key = tuple(round(float(c.data.params[k]), 6) for k in ("alpha", "distill_weight", "epsilon"))
        rows[key] = (c.info.status, c.data.tags["pareto"], round(c.data.metrics["kd_alignment"], 3),
                     round(c.data.metrics["noise_robustness"], 3))
    return rows, parents[0].data.metrics["hypervolume"]


def test_postgres_tracking_matches_sqlite(postgres_uri, tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="pg", trials=4)
    out, sqlite_uri = sweep(tmp_path, spec)
    assert out.returncode == 0, out.stderr[-3000:]
    out_pg = subprocess.run([str(Path(os.sys.executable).parent / "alignsweep"), "sweep", str(spec),
                             "--tracking-uri", postgres_uri, "--storage", str(tmp_path / "runs-pg")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out_pg.returncode == 0, out_pg.stdout[-2000:] + out_pg.stderr[-3000:]
    on_sqlite, hv_sqlite = _summary(sqlite_uri, "pg")
    on_pg, hv_pg = _summary(postgres_uri, "pg")
    assert len(on_pg) == 4
    assert on_pg == on_sqlite  # same trials, statuses, front tags and metrics
    assert hv_pg == pytest.approx(hv_sqlite)
