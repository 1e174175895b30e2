"""The meta-loss surface of a 2-D task over [-5, 5]^2, with run trajectories drawn over it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pes.runs import plots
from pes.runs.config import check_int
from pes.runs.errors import ConfigError
from pes.runs.registry import TASKS, get_task
from pes.runs.run import iter_run_dirs, read_config, read_metrics

BOUNDS = (-5.0, 5.0)
MAX_RESOLUTION = 1001


@dataclass
class SurfaceResult:
    """path: the PNG; grid: the values of each theta axis; values[i, j] at (grid[i],
    grid[j]); minimum and argmin over the grid; trajectories: (label, theta[steps, 2])."""

    path: Path
    grid: np.ndarray
    values: np.ndarray
    minimum: float
    argmin: tuple[float, float]
    trajectories: list[tuple[str, np.ndarray]]


def surface_tasks() -> tuple[str, ...]:
    return tuple(name for name, e in TASKS.items() if e.has_surface)


def load_trajectories(task: str, runs: Sequence[str | Path]) -> list[tuple[str, np.ndarray]]:
    """theta[steps, 2] of every run directory in (or below) each path of ``runs``."""
    out = []
    for given in runs:
        given = Path(given)
        if not given.exists():
            raise ConfigError(f"runs: {str(given)!r} does not exist", field="runs")
        dirs = list(iter_run_dirs(given))
        if not dirs:
            raise ConfigError(f"runs: {str(given)!r} holds no run directory (no metrics.jsonl "
                              "in it or below it)", field="runs")
        for run_dir in dirs:
            config = read_config(run_dir)
            if config.task != task:
                raise ConfigError(f"runs: {str(run_dir)!r} is a {config.task} run, not "
                                  f"{task}", field="runs")
            thetas = [r["theta"] for r in read_metrics(run_dir) if "theta" in r]
            theta = np.array(thetas, dtype=float).reshape(len(thetas), -1)
            if theta.shape[0] == 0 or theta.shape[1] != 2:
                raise ConfigError(f"runs: {str(run_dir)!r} has no 2-D theta in its "
                                  "metrics.jsonl", field="runs")
            out.append((f"{config.estimator} (seed {config.seed})", theta))
    return out


def draw_surface(task: str = "toy-regression", *, resolution: int = 101,
                 runs: Sequence[str | Path] = (), out: str | Path | None = None
                 ) -> SurfaceResult:
    """Evaluate the task's meta-objective on a resolution x resolution grid over [-5, 5]^2
    (one vectorised call) and draw it as a heatmap with the runs' theta trajectories."""
    entry = get_task(task)
    if not entry.has_surface:
        raise ConfigError(f"task={task!r} has no meta-loss surface; surface tasks: "
                          f"{', '.join(surface_tasks())}", field="task")
    resolution = check_int("resolution", resolution, 2, MAX_RESOLUTION)
    trajectories = load_trajectories(task, runs)
    path = Path(out) if out is not None else Path("runs") / f"{task}-surface.png"
    if path.suffix.lower() != ".png":
        raise ConfigError(f"out={str(path)!r} must be a .png file", field="out")
    grid = np.linspace(*BOUNDS, resolution)
    values = np.asarray(entry.make().surface(grid, grid), dtype=float)
    finite = np.where(np.isfinite(values), values, np.inf)
    i, j = np.unravel_index(np.argmin(finite), values.shape)
    plots.plot_surface(path, grid, grid, values, trajectories, labels=entry.theta_names[:2],
                       colorbar_label=entry.metric_label,
                       title=f"{task}: meta-objective over [-5, 5]^2 ({resolution} x "
                       f"{resolution})")
    return SurfaceResult(path, grid, values, float(values[i, j]),
                         (float(grid[i]), float(grid[j])), trajectories)
