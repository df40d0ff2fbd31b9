"""`alignsweep sweep` the way a person runs it: in a real terminal (a pseudo-terminal that is the
CLI's controlling tty), with Ctrl-C pressed on it, and `--resume` afterwards.

Ctrl-C here is the byte 0x03 written to the terminal: the tty sends SIGINT to the whole
foreground process group, the CLI and every Ray process it started, as a keyboard does."""

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import Terminal, assert_study_agrees_with_mlflow, children_with_status, wait_for
from tests.test_submit import free_port
from tests.test_sweep import OBJ, runs_of, sweep, write_spec

BIN = Path(sys.executable).parent / "alignsweep"
pytestmark = pytest.mark.slow


def _spec(tmp_path, tiny_backbone, toy_csv, name, trials, steps):
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name=name, trials=trials)
    raw = yaml.safe_load(spec.read_text())
    raw["train"].update({"budget_steps": steps, "checkpoint_every": 20, "log_every": 20})
    spec.write_text(yaml.safe_dump(raw))
    return spec


def _in_terminal(tmp_path, spec, *extra) -> Terminal:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return Terminal([str(BIN), "sweep", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "runs"), *extra],
                    cwd=tmp_path)


def test_sweep_in_a_terminal_shows_the_live_view_and_finishes(tmp_path, tiny_backbone, toy_csv):
    term = _in_terminal(tmp_path, write_spec(tmp_path, tiny_backbone, toy_csv, name="tty"))
    rc = term.wait(timeout=600)
    screen = term.output
    assert rc == 0, screen[-3000:]
    assert "cannot pickle" not in screen and "Traceback" not in screen
    assert re.search(r"sweep tty: \d/4 done, \d running, 0 failed", screen), screen[-3000:]  # the rich panel
    assert "4 finished, 0 failed" in screen
    client, parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "tty")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 4


def test_ctrl_c_stops_cleanly_and_resume_finishes_with_the_study_intact(tmp_path, tiny_backbone, toy_csv):
    spec = _spec(tmp_path, tiny_backbone, toy_csv, "ctrlc", trials=5, steps=300)
    term = _in_terminal(tmp_path, spec)
    db = tmp_path / "mlflow.db"
    assert wait_for(lambda: children_with_status(db, "FINISHED") >= 1 or term.proc.poll() is not None, timeout=400)
    assert term.proc.poll() is None, "the sweep ended before Ctrl-C\n" + term.output[-2000:]
    term.press_ctrl_c()
    rc = term.wait(timeout=300)
    screen = term.output
    assert rc == 130, screen[-3000:]
    assert "Ctrl-C again to exit at once" in screen and "--resume" in screen
    # Tune may log (not raise) a failed background copy of its state when the stop lands mid-copy;
    # the next save repeats it. Any other traceback is a failure.
    assert not [tb for tb in screen.split("Traceback")[1:] if "experiment_state.py" not in tb[:1500]], screen[-4000:]
    uri = f"sqlite:///{db}"
    client, parents, children = runs_of(uri, "ctrlc")
    parent = parents[0]
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true"
    assert "--resume" in parent.data.tags["failure"]
    assert not [c for c in children if c.info.status == "RUNNING"]  # stopped trials' runs are closed
    assert 1 <= sum(c.info.status == "FINISHED" for c in children) < 5

    out, _ = sweep(tmp_path, spec, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_study_agrees_with_mlflow(uri, "ctrlc", 5, OBJ)


def test_second_ctrl_c_exits_at_once_and_still_closes_the_parent(tmp_path, tiny_backbone, toy_csv):
    spec = _spec(tmp_path, tiny_backbone, toy_csv, "twice", trials=4, steps=4000)
    term = _in_terminal(tmp_path, spec)
    db = tmp_path / "mlflow.db"
    assert wait_for(lambda: children_with_status(db, "RUNNING") >= 1, timeout=300)
    term.press_ctrl_c()
    assert wait_for(lambda: "Ctrl-C again" in term.output, timeout=30)
    term.press_ctrl_c()
    rc = term.wait(timeout=60)
    assert rc == 130, term.output[-3000:]
    client, parents, children = runs_of(f"sqlite:///{db}", "twice")
    parent = parents[0]
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true"
    assert "Ctrl-C twice" in parent.data.tags["failure"]  # the second press cut the graceful stop short
    assert children and not [c for c in children if c.info.status == "RUNNING"]


def test_the_default_sweep_in_a_terminal(tmp_path):
    """The main job as the README's first command runs it (default spec: 24 trials on the embedded
    `safety` data and real MiniLM), to the end: live view shown, exit 0, parent FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    term = Terminal([str(BIN), "sweep", "--tracking-uri", uri, "--storage", str(tmp_path / "runs")], cwd=tmp_path)
    rc = term.wait(timeout=1500)  # a fresh machine downloads the data wheels and fine-tunes the teacher first
    screen = term.output
    assert rc == 0, screen[-3000:]
    assert re.search(r"sweep pareto: \d+/24 done", screen) and "24 finished, 0 failed" in screen, screen[-3000:]
    assert "preparing shared artifacts" in screen
    client, parents, children = runs_of(uri, "pareto")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 24
    assert all(0 <= c.data.metrics["kd_alignment"] <= 100 for c in children)


@pytest.mark.parametrize("when", ["teacher", "ray start"])
def test_ctrl_c_while_preparing_exits_at_once_and_logs_nothing(tmp_path, tiny_backbone, toy_csv, when):
    """A cold cache means minutes of preparation (here: a teacher fine-tuned for 2,000 epochs). Ctrl-C
    during the teacher, or half a second in, while the driver imports and starts Ray: a KeyboardInterrupt
    raised inside an import was swallowed there, and the driver waited out the preparation."""
    spec = write_spec(tmp_path, tiny_backbone, toy_csv, name="cold")
    raw = yaml.safe_load(spec.read_text())
    raw["train"]["teacher"]["epochs"] = 2000
    spec.write_text(yaml.safe_dump(raw))
    term = _in_terminal(tmp_path, spec)
    assert wait_for(lambda: "preparing shared artifacts" in term.output, timeout=120, every=0.05)
    if when == "teacher":
        assert wait_for(lambda: (tmp_path / "cache" / "features").exists(), timeout=120)  # the teacher is next
    else:
        time.sleep(0.5)
    term.press_ctrl_c()
    rc = term.wait(timeout=30)
    screen = term.output
    assert rc == 130, screen[-3000:]
    assert "interrupted while preparing shared artifacts; nothing was logged" in screen
    assert "Traceback" not in screen and "Stack trace" not in screen and "Aborted" not in screen
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache" / "teacher").exists()


def test_ctrl_c_during_train_says_interrupted(tmp_path, tiny_backbone, toy_csv):
    """`alignsweep train` stopped by Ctrl-C while its teacher trains: one line and exit 130. Typer
    turns the KeyboardInterrupt into a bare Exit(130), which printed nothing but an empty line."""
    term = Terminal([str(BIN), "train", "--set", f"backbone={tiny_backbone}", "--set", f"data.name={toy_csv}",
                     "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "teacher.epochs=2000"], cwd=tmp_path)
    assert wait_for(lambda: (tmp_path / "cache" / "features").exists(), timeout=120)  # the teacher is next
    term.press_ctrl_c()
    rc = term.wait(timeout=30)
    screen = term.output
    assert rc == 130, screen[-3000:]
    assert screen.strip().splitlines()[-1].replace("^C", "").strip() == "interrupted", screen[-3000:]  # tty echo
    assert "Traceback" not in screen


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5",
                                    timeout=2) as resp:
            return "experiments" in json.load(resp)
    except OSError:
        return False


@pytest.mark.parametrize("how", ["ctrl-c", "hang up"])
def test_ui_stops_with_every_server_process_on_ctrl_c_and_when_its_terminal_closes(tmp_path, how):
    """`alignsweep ui` runs `mlflow server`, which runs uvicorn and its workers. Closing the terminal
    (tmux kill-session) used to stop mlflow only and leave uvicorn serving the port."""
    port = free_port()
    term = Terminal([str(BIN), "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                    cwd=tmp_path)
    server: list[psutil.Process] = []
    try:
        assert wait_for(lambda: _serving(port) or term.proc.poll() is not None, timeout=120), term.output[-2000:]
        assert term.proc.poll() is None, term.output[-2000:]
        server = psutil.Process(term.proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in server), [p.cmdline() for p in server]
        if how == "ctrl-c":
            term.press_ctrl_c()
            assert term.wait(timeout=60) == 130
            assert "interrupted: the MLflow server and its workers stopped" in term.output
        else:
            term.hang_up()
            term.wait(timeout=60)
        alive = lambda: [p for p in server if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # noqa: E731
        assert wait_for(lambda: not alive(), timeout=30), [p.cmdline() for p in alive()]
        assert not _serving(port)
    finally:
        term.kill()
        for p in server:
            if p.is_running():
                p.kill()
