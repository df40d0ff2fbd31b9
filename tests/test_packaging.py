"""The package builds without warnings of our own making, and ships the built-in specs."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_ships_the_specs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    # e.g. "`project.license` as a TOML table is deprecated", "Package 'sweeps.specs' is absent"
    for needle in ("BuildBackendWarning", "DeprecationWarning", "is deprecated", "is absent from the `packages`"):
        assert needle not in log, [line for line in log.splitlines() if needle in line][:5]
    wheel = next(tmp_path.glob("alignsweep-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    specs = sorted(Path(n).stem for n in names if n.startswith("sweeps/specs/") and n.endswith(".yaml"))
    assert specs == sorted(p.stem for p in (REPO / "sweeps" / "specs").glob("*.yaml")) and "pareto" in specs
    assert any(n.endswith(".dist-info/METADATA") and "License-Expression: Apache-2.0" in
               zipfile.ZipFile(wheel).read(n).decode() for n in names)
