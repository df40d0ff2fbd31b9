"""Input that cannot work is refused through the real console script: exit 2, one line naming the
field or file, no traceback, and nothing written to MLflow. Also: resume finds its own sweep by
exact name, refuses an edited spec, and grows only through an explicit --trials."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps.spec import load_spec
from sweeps.tune import find_sweep
from tests.helpers import assert_study_agrees_with_mlflow
from tests.test_sweep import OBJ, runs_of, sweep, write_spec

BIN = Path(sys.executable).parent / "alignsweep"


def refused(out, *names: str) -> str:
    """The one stderr line of a refusal; it names every one of ``names``."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def cli(tmp_path, *args, timeout=300):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ})


# -- item 4: conflicts and directions --------------------------------------------------------------


def test_a_field_fixed_and_searched_is_refused(tmp_path):
    """`pareto` searches budget_steps: fixing it too used to be ignored silently (every trial ran 400)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli(tmp_path, "sweep", "pareto", "--set", "train.budget_steps=60", "--tracking-uri", uri)
    line = refused(out, "train.budget_steps", "space.budget_steps")
    assert "--set space.budget_steps=null" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_dropping_a_searched_field_lets_the_user_fix_it():
    spec = load_spec("pareto", ["space.budget_steps=null", "train.budget_steps=60"])
    assert "budget_steps" not in spec.space and spec.trial_config({}).budget_steps == 60


def test_an_objective_without_mode_takes_its_metrics_natural_direction(tmp_path):
    path = tmp_path / "dirs.yaml"
    path.write_text(yaml.safe_dump({"name": "dirs", "objectives": [{"metric": "kd_alignment"},
                                                                    {"metric": "attack_success_rate"}]}))
    assert load_spec(path).modes == ["max", "min"]


# -- item 5: malformed files and a Ray that is not there -------------------------------------------


def test_spec_that_does_not_parse_names_file_line_and_column(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\ntrials: [1, 2\nobjectives: x\n")
    out = cli(tmp_path, "sweep", str(bad), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    refused(out, "SPEC", "broken.yaml", "line 3, column 11", "expected ',' or ']'")
    assert not (tmp_path / "mlflow.db").exists()


def test_config_that_does_not_parse_names_file_line_and_column(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("alpha: 0.5\n  beta: 1\n")
    refused(cli(tmp_path, "train", "--config", str(bad)), "--config", "train.yaml", "line 2, column 7")


def test_spec_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- name: x\n")
    refused(cli(tmp_path, "sweep", str(bad)), "SPEC", "list.yaml", "mapping")


def test_unreachable_ray_head_is_one_line_with_a_hint(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="noray")
    out, uri = sweep(tmp_path, spec, "--address", "127.0.0.1:1")
    assert out.returncode == 1, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: Ray did not start") and "127.0.0.1:1" in line and "ray status" in line
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists()
    refused(sweep(tmp_path, spec, "--address", "not-an-address")[0], "--address")


# -- item 3: resume safety -----------------------------------------------------------------------------


def test_resume_picks_its_own_sweep_by_exact_name(tmp_path):
    import pyarrow.fs

    for name in ("tiny-20260101-000000", "tiny-big-20270101-000000", "tiny-20260102-000000", "tinyx-20280101-000000"):
        (tmp_path / name).mkdir()
    fs = pyarrow.fs.LocalFileSystem()
    assert find_sweep(fs, str(tmp_path), "tiny") == "tiny-20260102-000000"
    assert find_sweep(fs, str(tmp_path), "tiny-big") == "tiny-big-20270101-000000"
    assert find_sweep(fs, str(tmp_path), "tin") is None


def test_resume_does_not_pick_another_specs_sweep(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="pareto")
    (tmp_path / "runs" / "pareto-big-20260101-000000").mkdir(parents=True)
    out, uri = sweep(tmp_path, spec, "--resume")
    refused(out, "--resume", "no earlier sweep 'pareto'")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_resume_refuses_an_edited_spec_and_grows_only_with_trials(tmp_path, tiny_backbone, toy_csv):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="grow", trials=2)
    out, uri = sweep(tmp_path, spec)
    assert out.returncode == 0, out.stderr[-3000:]
    client, parents, _ = runs_of(uri, "grow")
    sweep_dir = next((tmp_path / "runs").glob("grow-*"))
    record = json.loads((sweep_dir / "alignsweep-sweep.json").read_text())
    assert record["trials"] == 2 and record["spec_hash"] == parents[0].data.tags["alignsweep.spec_hash"]

    def store_state():
        runs = MlflowClient(uri).search_runs([parents[0].info.experiment_id])
        return sorted((r.info.run_id, r.info.status, r.info.end_time) for r in runs)

    before = store_state()
    raw = yaml.safe_load(spec.read_text())
    raw["train"]["lr"] = 0.01
    raw["space"]["alpha"]["high"] = 0.9
    edited = tmp_path / "grow-edited.yaml"
    edited.write_text(yaml.safe_dump(raw))
    line = refused(sweep(tmp_path, edited, "--resume")[0], "--resume", "train.lr", "space.alpha.high")
    assert "0.01" in line
    refused(sweep(tmp_path, spec, "--resume", "--set", "concurrency=1")[0], "concurrency")
    refused(sweep(tmp_path, spec, "--resume", "--trials", "1")[0], "--trials", "started with 2")
    assert store_state() == before  # nothing written to MLflow by any refusal

    out, _ = sweep(tmp_path, spec, "--resume", "--trials", "3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_study_agrees_with_mlflow(uri, "grow", 3, OBJ)
    assert json.loads((sweep_dir / "alignsweep-sweep.json").read_text())["trials"] == 3


# -- item 6: user data that cannot work, through a sweep ---------------------------------------------


@pytest.mark.parametrize("content, encoding, named", [
    ("text,label\n" + "".join(f"note number {i},a\n" for i in range(60)), "utf-8", "1 class"),
    ("text,label\n" + "".join(f"note {i},{i % 2}\n" for i in range(6)), "utf-8", "data"),
    ("text,label\n" + "".join(f"caf\u00e9 cr\u00e8me {i},{i % 2}\n" for i in range(60)), "latin-1", "data.encoding"),
])
def test_a_sweep_on_unusable_data_is_refused_before_ray_and_mlflow(tmp_path, tiny_backbone, content, encoding, named):
    data_file = tmp_path / "mine.csv"
    data_file.write_bytes(content.encode(encoding))
    spec = write_spec(tmp_path, tiny_backbone, str(data_file), name="mydata")
    out, uri = sweep(tmp_path, spec)
    refused(out, "mine.csv", named)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache" / "features").exists()  # nothing computed either


# -- issue 12: the scheduler is validated like every other field ------------------------------------


@pytest.mark.parametrize("override, names", [
    ("scheduler.kind=asha", ["scheduler.kind", "fifo", "moasha"]),
    ("scheduler.reduction_factor=1", ["scheduler.reduction_factor", "greater than 1"]),
    ("scheduler.grace_steps=0", ["scheduler.grace_steps"]),
    ("scheduler.brakets=2", ["scheduler.brakets"]),
])
def test_a_bad_scheduler_is_refused_naming_the_field(tmp_path, override, names):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    refused(cli(tmp_path, "sweep", "pareto", "--set", override, "--tracking-uri", uri), *names)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["sweep", "pareto"], ["ui", "--port", "5999"], ["pareto"]])
def test_a_tracking_uri_on_a_file_that_is_not_a_database_is_refused(tmp_path, command):
    """A file the user did not make (here this README) given as the sqlite store: one line, the file untouched."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    store = tmp_path / "notes.db"
    store.write_bytes(readme.read_bytes())
    refused(cli(tmp_path, *command, "--tracking-uri", f"sqlite:///{store}"), "--tracking-uri", str(store),
            "not an SQLite database")
    assert store.read_bytes() == readme.read_bytes() and not (tmp_path / "runs").exists()


def test_moasha_with_a_torch_trainer_trial_is_refused_with_the_reason(tmp_path):
    """A TorchTrainer trial only waits on fit(): nothing reports at a rung, so nothing could stop it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli(tmp_path, "sweep", "pareto", "--set", "scheduler.kind=moasha", "--set", "resources.workers_per_trial=2",
              "--tracking-uri", uri)
    refused(out, "scheduler", "workers_per_trial=2", "kind=fifo")
    assert load_spec("pareto", ["scheduler.kind=moasha"]).scheduler.reduction_factor == 3  # the default is fine
    assert load_spec("pareto").scheduler.kind == "fifo"


@pytest.mark.parametrize("overrides, names", [
    (["train.batch_size=63"], ["train.batch_size", "63", "workers_per_trial=2", "multiple of 2"]),
    (["space.batch_size={kind: choice, values: [32, 33]}"], ["space.batch_size", "[33]", "multiples of 2"]),
    (["space.batch_size={kind: int, low: 16, high: 64}"], ["space.batch_size", "range", "kind=choice"]),
])
def test_batches_that_cannot_split_over_the_workers_are_refused(tmp_path, overrides, names):
    """A TorchTrainer trial optimises the global batch's mean: only equal shards make it so."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [a for o in ["resources.workers_per_trial=2", "resources.cpus_per_worker=0.5", *overrides] for a in ("--set", o)]
    refused(cli(tmp_path, "sweep", "pareto", *sets, "--tracking-uri", uri), *names)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_train_refuses_workers_that_cannot_split_the_batch(tmp_path):
    refused(cli(tmp_path, "train", "--workers", "3", "--set", "batch_size=64"), "batch_size", "--workers=3", "multiple of 3")
