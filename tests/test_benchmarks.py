"""The benchmarks execute: `benchmarks/run_all.py --smoke` runs every section at a tiny size and
prints the table. No assertion on any time or ratio: speed targets live in the benchmarks, whose
full run reports them as met or missed; a timed unit test would only be flaky."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    1: [f"1{c}" for c in "abcdefghijkl"],  # 8 full-method variants, 2 floors, embeddings, train_loop
    2: ["2a"],
    3: ["3a"],  # 3b and 6d (TorchTrainer launch) are in the full run only
    4: ["4a", "4b", "4c", "4d"],
    5: ["5a", "5b", "5c", "5d", "5e", "5f"],  # 5f: the 1,000-trial sweep (a few trials in the smoke run)
    6: ["6a", "6b", "6c"],
    7: ["7a", "7b"],  # early stopping, MO-ASHA vs FIFO
    8: ["8a", "8b", "8c", "8d"],  # packed: the trainer alone, its ceiling, through the sweep (pack 2 in the smoke run), hypervolume
}


def test_smoke_run_prints_every_section(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/run_all.py", "--smoke", "--work", str(tmp_path / "work")],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    keys = [line.split("|")[1].strip() for line in table[1:]]
    assert keys == [k for section in ROWS.values() for k in section], keys
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6, line
        assert re.search(r"\d", cells[2]) and re.search(r"\d", cells[3]), line  # measured and baseline
        assert re.fullmatch(r"[\d.]+x?|nan|inf", cells[4]), line  # a ratio (inf: MO-ASHA never got there)
    assert "Command: python benchmarks/run_all.py --smoke" in out.stdout
    assert "Total wall time:" in out.stdout
