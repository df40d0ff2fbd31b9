#!/usr/bin/env python
"""Where the time goes in a sweep: every benchmark section, one table of ratios measured in this run.

    python benchmarks/run_all.py            # the full run (~50 minutes on 2 CPU cores)
    python benchmarks/run_all.py --smoke    # every section at a tiny size (what CI runs)

Sections (issue 6): 1 step cost, 2 shared cache, 3 service overhead, 4 search efficiency,
5 scale, 6 memory; (issue 12) 7 early stopping; (issue 13) 5f, a 1,000-trial sweep beside row 5b;
(issue 15) 8 packed trials. Each figure is a ratio against a baseline measured side by side in the same
run; each section runs in a fresh process (its module's docstring says exactly what it
measures). Nothing here asserts on time: targets are reported as met or missed, with by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SMOKE_ASSETS_ENV, run_clean  # noqa: E402

SECTIONS = [  # (module, what it prints)
    ("step_cost", "1 step cost"),
    ("cache", "2 shared cache"),
    ("service", "3 service overhead + 6 memory"),
    ("search", "4 search efficiency"),
    ("scale", "5 scale"),
    ("long_sweep", "5 scale: a 1,000-trial sweep"),
    ("early_stopping", "7 early stopping"),
    ("packed", "8 packed trials"),
]
TITLES = {1: "step cost", 2: "shared cache", 3: "service overhead", 4: "search efficiency", 5: "scale", 6: "memory",
          7: "early stopping", 8: "packed trials"}
TIMEOUT_S = {"step_cost": 600, "cache": 600, "service": 1200, "search": 1800, "scale": 1500, "long_sweep": 1800,
             "early_stopping": 1200, "packed": 3600}


def fmt_value(v: float, unit: str) -> str:
    if unit == "nHV":
        return f"{v:.3f}"
    if unit in ("MiB", "HV", "steps"):
        return f"{v:,.0f} {unit}"
    if unit == "ms":
        return f"{v:.2f} ms" if v < 10 else f"{v:,.1f} ms"
    return f"{v:.2f} {unit}" if v < 10 else f"{v:,.1f} {unit}"


def verdict(r: dict) -> str:
    if not r["target"]:
        return ""
    if r["met"] is None:
        return r["target"]
    if r["met"]:
        return f"{r['target']}: met"
    return f"{r['target']}: MISSED"


def table(rows: list[dict]) -> str:
    lines = ["| # | measure | measured | baseline | ratio | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["section"] in (4, 7) else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['key']} | {r['measure']} | {fmt_value(r['value'], r['unit'])} | "
                     f"{fmt_value(r['baseline'], r['unit'])} ({r['baseline_name']}) | {ratio} | {verdict(r)} |")
    return "\n".join(lines)


def warm_cache(smoke: bool, work: Path) -> float:
    """Prepare the shared artifacts once (a no-op on a warm cache), so no section pays for them."""
    code = ("import sys; from pathlib import Path; from benchmarks.common import train_config; "
            "from trainable.loop import prepare_artifacts; "
            f"prepare_artifacts(train_config({smoke}, Path({str(work)!r})))")
    t = time.monotonic()
    rc = run_clean([sys.executable, "-c", code], work / "warm.log", timeout=1800)
    if rc != 0:
        raise SystemExit(f"preparing the shared artifacts failed:\n{(work / 'warm.log').read_text()[-3000:]}")
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="every section at a tiny size (seconds, not minutes)")
    ap.add_argument("--only", help="comma-separated section modules, e.g. step_cost,cache")
    ap.add_argument("--work", help="keep intermediate files (logs, MLflow dbs, JSON) in this directory")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()

    started = time.monotonic()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="alignsweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env_note = (f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}, "
                f"Python {platform.python_version()}")
    print(f"alignsweep benchmarks ({'smoke' if args.smoke else 'full'} run), {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{env_note}", file=sys.stderr, flush=True)
    os.environ[SMOKE_ASSETS_ENV] = str(work / "smoke")  # inherited by every section process
    warm_s = warm_cache(args.smoke, work)

    rows: list[dict] = []
    failures: list[str] = []
    walls: dict[str, float] = {}
    selected = [s for s in SECTIONS if not args.only or s[0] in args.only.split(",")]

    def section(module: str, title: str) -> None:
        out = work / f"{module}.json"
        cmd = [sys.executable, "-m", f"benchmarks.{module}", "--work", str(work / module), "--out", str(out)]
        if args.smoke:
            cmd.append("--smoke")
        print(f"[{time.monotonic() - started:6.0f}s] section {title} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        rc = run_clean(cmd, work / f"{module}.log", timeout=TIMEOUT_S[module])
        walls[module] = time.monotonic() - t
        if rc != 0 or not out.is_file():
            failures.append(module)
            print(f"section {title} failed (exit {rc}); log {work / f'{module}.log'}:\n"
                  f"{(work / f'{module}.log').read_text()[-4000:]}", file=sys.stderr, flush=True)
            return
        rows.extend(json.loads(out.read_text())["rows"])

    for module, title in selected:
        section(module, title)

    rows.sort(key=lambda r: (r["section"], r["key"]))
    total = time.monotonic() - started
    command = "python benchmarks/run_all.py" + (" --smoke" if args.smoke else "")
    print(f"## alignsweep benchmarks ({'smoke: tiny sizes, figures not meaningful' if args.smoke else 'full run'})\n")
    if args.smoke:
        print("Rows 3b and 6d (TorchTrainer launch mode) are in the full run only.\n")
    print(f"Machine: {env_note}. Each ratio is measured against its baseline in this same run.\n")
    print(table(rows))
    print("\nNotes:")
    for r in rows:
        if r["note"]:
            print(f"- {r['key']} ({TITLES[r['section']]}): {r['note']}")
    missed = [r for r in rows if r["met"] is False]
    met = [r for r in rows if r["met"] is True]
    print(f"\nTargets: {len(met)} met, {len(missed)} missed" + (f" ({', '.join(r['key'] for r in missed)})" if missed else ""))
    print("Section wall times: " + ", ".join(f"{m} {s:.0f} s" for m, s in walls.items())
          + f"; shared artifacts prepared/checked in {warm_s:.0f} s")
    print(f"Total wall time: {total:.0f} s")
    print(f"Command: {command}")
    if failures:
        print(f"FAILED sections: {', '.join(failures)} (logs in {work})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "total_s": total, "walls": walls, "command": command}, indent=1))
    if not args.work and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
