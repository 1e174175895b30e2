"""PNG plots of runs, comparisons and meta-loss surfaces.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global
backend state, no display needed). matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Curve:
    """One line: y against x, with an optional band [low, high] (e.g. min-max over seeds).

    y, low, high have shape (len(x),) for a metric or (len(x), d) for a d-dimensional theta.
    steps: the outer step of each point, for a second panel against outer steps.
    """

    label: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    steps: np.ndarray | None = None


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _positive_floor(values: Sequence[np.ndarray]) -> float | None:
    pos = [v[np.isfinite(v) & (v > 0)] for v in values]
    pos = [p for p in pos if p.size]
    return float(min(p.min() for p in pos)) if pos else None


def plot_curves(path: Path, curves: Sequence[Curve], *, xlabel: str, ylabel: str,
                log_y: bool, title: str, outer_panel: bool = False, log_x: bool = True) -> Path:
    """The metric of each curve against x, with its band shaded.

    outer_panel: two panels, the metric against outer steps (``curve.steps``) and against
    x, on a log axis when ``log_x`` (estimators that spend 1 or 1000 inner steps per update
    share a plot).
    """
    fig, axes = _figure(1, 2 if outer_panel else 1, size=(6.5, 4.5) if outer_panel
                        else (7.0, 4.5))
    floor = _positive_floor([c.y for c in curves]) if log_y else None
    panels = [(axes[0, 0], "outer steps", True), (axes[0, 1], xlabel, False)] if outer_panel \
        else [(axes[0, 0], xlabel, False)]
    for ax, label, by_step in panels:
        for curve, color in zip(curves, _colors(len(curves)), strict=True):
            x = np.asarray(curve.steps if by_step else curve.x, float)
            y = np.asarray(curve.y, float)
            if log_y and floor is not None:
                # Exact zeros cannot be drawn on a log axis; show them at the smallest value.
                y = np.where(y <= 0, floor, y)
            ax.plot(x, y, color=color, lw=1.6, label=curve.label)
            if curve.low is not None and curve.high is not None:
                low, high = np.asarray(curve.low, float), np.asarray(curve.high, float)
                if log_y and floor is not None:
                    low = np.where(low <= 0, floor, low)
                    high = np.where(high <= 0, floor, high)
                ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        if log_y and floor is not None:
            ax.set_yscale("log")
        if outer_panel and not by_step:
            if log_x:
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(curves) > 1 and ax is axes[0, 0]:
            ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


def plot_theta(path: Path, curves: Sequence[Curve], *, theta_names: Sequence[str],
               reference: np.ndarray | None, xlabel: str, title: str,
               by_step: bool = False) -> Path:
    """One panel per component of theta, a line per curve; the reference theta dashed.
    by_step: against outer steps (``curve.steps``) instead of x."""
    dims = len(theta_names)
    fig, axes = _figure(1, dims, size=(6.0, 4.0))
    for d in range(dims):
        ax = axes[0, d]
        # One diverging curve (e.g. theta -> 9000) would flatten the others: switch to a
        # symlog axis, linear within the typical range of the curves.
        scales = [np.nanmax(np.abs(np.asarray(c.y, float).reshape(len(c.x), -1)[:, d]),
                            initial=0.0) for c in curves]
        typical = float(np.median(scales)) if scales else 0.0
        if typical > 0 and max(scales) > 20 * typical:
            ax.set_yscale("symlog", linthresh=typical)
        for curve, color in zip(curves, _colors(len(curves)), strict=True):
            x = np.asarray(curve.steps if by_step else curve.x, float)
            y = np.asarray(curve.y, float).reshape(len(x), -1)
            ax.plot(x, y[:, d], color=color, lw=1.6, label=curve.label)
            if curve.low is not None and curve.high is not None:
                low = np.asarray(curve.low, float).reshape(len(x), -1)[:, d]
                high = np.asarray(curve.high, float).reshape(len(x), -1)[:, d]
                ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        if reference is not None:
            ax.axhline(float(reference[d]), color="black", ls="--", lw=1,
                       label=f"target {float(reference[d]):.4g}")
        ax.set_xlabel("outer steps" if by_step else xlabel)
        ax.set_ylabel(theta_names[d])
        ax.grid(True, alpha=0.3)
        if d == 0 and (len(curves) > 1 or reference is not None):
            ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


def plot_surface(path: Path, grid0: np.ndarray, grid1: np.ndarray, values: np.ndarray,
                 trajectories: Sequence[tuple[str, np.ndarray]], *, labels: tuple[str, str],
                 colorbar_label: str, title: str) -> Path:
    """Heatmap of values[i, j] at (grid0[i], grid1[j]) (log colour scale), with trajectories
    (label, theta[steps, 2]) drawn over it from a circle (start) to a star (end)."""
    from matplotlib.colors import LogNorm

    fig, axes = _figure(size=(7.5, 6.0))
    ax = axes[0, 0]
    v = np.asarray(values, float)
    finite = v[np.isfinite(v)]
    positive = finite.size and finite.min() > 0
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if positive else None
    mesh = ax.pcolormesh(grid0, grid1, v.T, shading="nearest", cmap="viridis", norm=norm)
    fig.colorbar(mesh, ax=ax, label=colorbar_label)
    for (label, theta), color in zip(trajectories, _colors(len(trajectories)), strict=True):
        theta = np.asarray(theta, float)
        ax.plot(theta[:, 0], theta[:, 1], color=color, lw=1.5, label=label)
        ax.plot(theta[0, 0], theta[0, 1], "o", color=color, mec="white", ms=6)
        ax.plot(theta[-1, 0], theta[-1, 1], "*", color=color, mec="white", ms=12)
    ax.set_xlim(grid0[0], grid0[-1])
    ax.set_ylim(grid1[0], grid1[-1])
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    if trajectories:
        ax.legend(fontsize="small", loc="upper left")
    return _save(fig, path)
