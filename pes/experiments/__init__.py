"""Layer 5: the paper's comparisons, and the run layer under the command line.

* :mod:`registry`: tasks and estimators by their command-line names;
* :mod:`config`: the typed :class:`RunConfig`, its validation, and :func:`build` (estimator,
  optax optimizer and initial theta from a task's defaults with overrides);
* :mod:`run`: :func:`execute_run` and the run directory it writes, :func:`resume_run`;
* :mod:`comparisons`: the paper's comparisons as data; :mod:`compare` runs one;
* :mod:`surface`: the toy-regression meta-loss surface with trajectories.

User mistakes raise :class:`ConfigError` (one line naming the field and what is allowed).
"""

from pes.experiments.compare import ComparisonResult, parse_seeds, run_comparison
from pes.experiments.comparisons import EXPERIMENT_NAMES, EXPERIMENTS, Arm, Experiment
from pes.experiments.config import RunConfig, Setup, build, build_setup, load_config_file
from pes.experiments.errors import ConfigError, RunFailed, RunInterrupted
from pes.experiments.registry import (
    ESTIMATOR_NAMES,
    ESTIMATORS,
    TASK_NAMES,
    TASKS,
    EstimatorEntry,
    TaskEntry,
    available_estimators,
)
from pes.experiments.run import (
    RunResult,
    execute_run,
    read_config,
    read_metrics,
    resume_run,
)
from pes.experiments.surface import SurfaceResult, draw_surface

__all__ = [
    "ESTIMATORS", "ESTIMATOR_NAMES", "EXPERIMENTS", "EXPERIMENT_NAMES", "TASKS", "TASK_NAMES",
    "Arm", "ComparisonResult", "ConfigError", "EstimatorEntry", "Experiment", "RunConfig",
    "RunFailed", "RunInterrupted", "RunResult", "Setup", "SurfaceResult", "TaskEntry",
    "available_estimators", "build", "build_setup", "draw_surface", "execute_run",
    "load_config_file", "parse_seeds", "read_config", "read_metrics", "resume_run",
    "run_comparison",
]
