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


@pytest.mark.slow
def test_study_survives_a_resubmitted_job_on_a_fresh_driver(postgres_uri, tmp_path, tiny_backbone, toy_csv):
    """Postgres tracking + URI storage (file:// standing in for s3://): the journal used to land in
    the job's temporary working directory. Kill the driver, wipe its local disk state (a fresh head
    node), resume: the study comes back from the copy beside Tune's state, intact."""
    import signal as sig

    from tests.helpers import assert_study_agrees_with_mlflow, wait_for
    from tests.test_sweep import OBJ

    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="resub", trials=6)
    raw = yaml.safe_load(spec.read_text())
    raw["train"].update({"budget_steps": 200, "checkpoint_every": 20, "log_every": 20})
    spec.write_text(yaml.safe_dump(raw))
    storage = f"file://{tmp_path / 'bucket'}"
    cmd = [str(Path(os.sys.executable).parent / "alignsweep"), "sweep", str(spec), "--tracking-uri", postgres_uri,
           "--storage", storage]
    driver_dir = tmp_path / "job1"
    driver_dir.mkdir()
    proc = subprocess.Popen(cmd, cwd=driver_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    from mlflow.tracking import MlflowClient

    def finished() -> int:
        try:
            exp = MlflowClient(postgres_uri).get_experiment_by_name("resub")
            return 0 if exp is None else sum(r.data.tags.get("role") != "baseline" for r in MlflowClient(postgres_uri).search_runs(
                [exp.experiment_id], filter_string="attributes.status = 'FINISHED' and tags.`mlflow.parentRunId` != ''"))
        except Exception:  # noqa: BLE001 - the schema may still be migrating
            return 0

    assert wait_for(lambda: finished() >= 2 or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, "the sweep ended before the driver could be killed"
    os.killpg(proc.pid, sig.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(3)
    journals = list((tmp_path / "cache" / "studies").glob("resub-*/optuna-journal.log"))
    assert journals and not list(driver_dir.rglob("optuna-journal.log"))  # on the driver's disk, not in its working dir
    assert list((tmp_path / "bucket").glob("resub-*/optuna-journal.log"))  # and its copy on the storage
    shutil.rmtree(tmp_path / "cache" / "studies")  # a fresh driver machine

    job2 = tmp_path / "job2"
    job2.mkdir()
    out = subprocess.run([*cmd, "--resume"], cwd=job2, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert_study_agrees_with_mlflow(postgres_uri, "resub", 6, OBJ)
