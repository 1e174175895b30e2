"""The run layer: one configured run of one estimator on one task, and its run directory.

* :mod:`~pes.runs.registry`: tasks and estimators by their command-line names;
* :mod:`~pes.runs.config`: the typed :class:`RunConfig`, its validation, and :func:`build`
  (estimator, optax optimizer and initial theta from a task's defaults with overrides);
* :mod:`~pes.runs.run`: :func:`execute_run`, the run directory it writes, :func:`resume_run`;
* :mod:`~pes.runs.checkpoint`: orbax checkpoints of a :class:`pes.TrainState`;
* :mod:`~pes.runs.user_task`: a user's System as a task (``pes run FILE.py:fn``,
  :class:`UserTask`);
* :mod:`~pes.runs.distributed`: multi-process runs; :mod:`~pes.runs.plots`: a run's pictures.

This layer knows train, tasks and estimators, never the paper's comparisons (:mod:`pes.paper`).
User mistakes raise :class:`ConfigError` (one line naming the field and what is allowed).
"""

from pes.runs.config import RunConfig, Setup, build, build_setup, load_config_file
from pes.runs.errors import ConfigError, RunFailed, RunInterrupted
from pes.runs.registry import (
    ESTIMATOR_NAMES,
    ESTIMATORS,
    TASK_NAMES,
    TASKS,
    EstimatorEntry,
    TaskEntry,
    available_estimators,
)
from pes.runs.run import (
    RunResult,
    execute_run,
    read_config,
    read_metrics,
    resume_run,
    tracking,
)
from pes.runs.user_task import UserTask

__all__ = [
    "ESTIMATORS", "ESTIMATOR_NAMES", "TASKS", "TASK_NAMES", "ConfigError", "EstimatorEntry",
    "RunConfig", "RunFailed", "RunInterrupted", "RunResult", "Setup", "TaskEntry", "UserTask",
    "available_estimators", "build", "build_setup", "execute_run", "load_config_file",
    "read_config", "read_metrics", "resume_run", "tracking",
]
