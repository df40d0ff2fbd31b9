"""alignsweep's sweep service: Ray Tune + multi-objective Optuna, tracked in MLflow (DESIGN §2).

Tune reads some of its settings when it is imported, so the sweeps' defaults are set here,
before any module of this package imports Ray.
"""

import os

# Driver state saved every second, or less often only while a save takes over 1/20 of that
# (sweeps.tune.pace_driver_snapshots): a killed driver resumes cleanly (DESIGN §7). A number
# here fixes the period instead.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "auto")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# No CSV or TensorBoard files per trial (sweeps.tune adds the JSON logger, which Tune's ResultGrid
# reads): MLflow holds every metric (DESIGN §2), and TensorBoard's writer thread and queue were
# ~15% of the driver's CPU at 64 trials at once (benchmarks/scale.py under py-spy).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Snapshots every second are what we want; Tune warns about them when trials checkpoint often.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Intermediate results (losses at checkpoints) carry no objectives; only the final one does.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# Ctrl-C is handled by sweeps.tune (it asks Tune to stop through Tune's SIGUSR1 handler instead).
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


PREPARING_THREAD = "alignsweep-prepare"
"""The daemon thread that builds a sweep's shared artifacts while Ray starts (sweeps.tune)."""


class StartupError(RuntimeError):
    """Ray could not be started or reached: the CLI prints one line with a hint and exits 1."""
