"""Ray Jobs submission: run `alignsweep sweep` on a cluster's head node (DESIGN §7).

The job's runtime env carries this package's code (``py_modules``) and the validated spec
(``working_dir``), so the cluster needs only the dependencies, not a checkout. Inside the job
Ray sets RAY_ADDRESS, and the sweep attaches to the cluster with a bare ``ray.init()``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from trainable.config import ConfigError
from sweeps.spec import SweepSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_tracking_for_cluster(tracking_uri: str, address: str) -> None:
    """A sqlite file on this machine is invisible to a remote cluster: refuse it up front."""
    host = urlparse(address).hostname or ""
    if tracking_uri.startswith("sqlite:") and host not in LOOPBACK:
        raise ConfigError(
            f"--tracking-uri: '{tracking_uri}' is a sqlite file on this machine, but the sweep runs on the cluster "
            f"at {host}; use an MLflow server the cluster can reach (http://HOST:5000) or a postgresql:// URI")


def _entrypoint(tracking_uri: str, storage: str | None, resume: bool) -> str:
    args = ["python", "-m", "sweeps.cli", "sweep", "spec.yaml", "--tracking-uri", tracking_uri]
    if storage:
        args += ["--storage", storage]
    if resume:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in args)


def submit_sweep(spec: SweepSpec, address: str, tracking_uri: str, storage: str | None = None,
                 resume: bool = False, wait: bool = True) -> str:
    """Submit the sweep; with ``wait`` stream its logs and return the final status."""
    from sweeps.tracking import check_tracking_uri

    check_tracking_for_cluster(tracking_uri, address)
    # Only the form is checked here: the server's name may resolve on the cluster and not on this
    # machine (http://mlflow:5000); the job itself checks reachability first and exits 2 if not.
    check_tracking_uri(tracking_uri, reach=False)
    # The Jobs API of a token-auth cluster (the default for a local `ray start --head` in Ray 2.60)
    # rejects the SDK unless it sends the token from ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    import sweeps
    import trainable

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="alignsweep-job-") as workdir:
        (Path(workdir) / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
        runtime_env = {
            "working_dir": workdir,
            "py_modules": [str(Path(trainable.__file__).parent), str(Path(sweeps.__file__).parent)],
            # Not ALIGNSWEEP_CACHE: a path on this machine would override the nodes' shared cache.
            "env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ},
        }
        job_id = client.submit_job(entrypoint=_entrypoint(tracking_uri, storage, resume), runtime_env=runtime_env,
                                   metadata={"alignsweep_spec": spec.name})
    print(f"submitted job {job_id} to {address} (spec {spec.name}, tracking {tracking_uri})", flush=True)
    if not wait:
        return "PENDING"

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except Exception as err:  # noqa: BLE001 - log streaming is best effort; the status below is what counts
        print(f"(log stream ended: {type(err).__name__})", file=sys.stderr)
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return status.value
