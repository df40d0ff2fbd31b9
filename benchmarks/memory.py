"""6. Memory: peak RSS of the sweep driver, of a trial worker, and of the whole sweep.

Measured during the section 3 runs (no extra sweep): a sampler thread in each process reads
the process and all its descendants every 0.5 s (psutil; ``common.TreeSampler``). The driver
is the process that called ``run_sweep``; a trial worker is a Ray process running a trial
(``ray::ImplicitFunc``) or, in TorchTrainer mode, a Train worker (``ray::RayTrainWorker``);
the whole sweep is the sum over the tree (driver, GCS, raylet, agents, idle and trial
workers) as PSS, so pages shared between processes (torch, Ray) count once. The baseline is
the bare Optuna loop process of section 3, which trains the same trials.
"""

from __future__ import annotations

from benchmarks.common import MB, Row, row


def rows(sweep: dict, bare: dict, sweep_tt: dict | None, bare_tt: dict | None) -> list[Row]:
    base, base_pss = bare["root_rss"] / MB, bare["root_pss"] / MB
    out = [
        row(6, "6a", "driver peak RSS (in-process sweep) / bare Optuna loop process", sweep["root_rss"] / MB, "MiB",
            base, "bare loop peak RSS", note=f"{sweep['samples']} samples"),
        row(6, "6b", "one trial worker peak RSS / bare Optuna loop process", sweep["trial_rss"] / MB, "MiB", base,
            "bare loop peak RSS", note="processes: " + ", ".join(sweep["trial_titles"] or ["none seen"])),
        row(6, "6c", "whole sweep peak (sum of PSS over the process tree) / bare loop PSS", sweep["tree_pss"] / MB,
            "MiB", base_pss, "bare loop peak PSS",
            note=f"peak {sweep['procs']} processes; sum of RSS {sweep['tree_rss'] / MB:.0f} MiB"),
    ]
    if sweep_tt is None:  # the smoke run has no TorchTrainer sweep
        return out
    out += [
        row(6, "6d", "whole sweep peak PSS, TorchTrainer launch / its bare loop PSS", sweep_tt["tree_pss"] / MB, "MiB",
            bare_tt["root_pss"] / MB, "bare loop peak PSS",
            note=f"peak {sweep_tt['procs']} processes; largest Train worker {sweep_tt['trial_rss'] / MB:.0f} MiB RSS; "
                 "processes: " + ", ".join(sweep_tt["trial_titles"] or ["none seen"])),
    ]
    return out
