"""Seeing a trained swimmer: its path (matplotlib) and an animation (GIF, MuJoCo's renderer).

``python -m pes.paper.swimmer_view RUN_DIR [RUN_DIR ...] --out DIR`` draws
``DIR/paths.png`` (the front tip's x-y path over one 1000-step episode of each run's final
policy) and ``DIR/swimmer.gif`` (the first run's episode). ``pes compare swimmer`` writes both
into the comparison directory.

Rendering needs an offscreen OpenGL context. MuJoCo picks its GL backend from ``MUJOCO_GL``
when it is first imported, so the GIF is drawn in a child process with ``MUJOCO_GL=egl`` (then
``osmesa``), unless the variable is already set; where neither works, :func:`write_gif` raises
:class:`RenderUnavailable` with one line saying what to install, and the path plot is still
drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PATHS_PNG = "paths.png"
SWIMMER_GIF = "swimmer.gif"
GL_BACKENDS = ("egl", "osmesa")
RENDER_SCRIPT = Path(__file__).with_name("_render_gif.py")


class RenderUnavailable(RuntimeError):
    """No offscreen OpenGL context (EGL or OSMesa) could be made on this machine."""


def final_theta(run_dir: Path | str) -> np.ndarray:
    """The final W (2, 8) of a swimmer run directory (its summary.json)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished pes run")
    summary = json.loads(path.read_text())
    if summary.get("task") != "swimmer":
        raise ValueError(f"{run_dir} is a run of task {summary.get('task')!r}, not swimmer")
    return np.asarray(summary["final_theta"], np.float64)


def plot_paths(paths: dict[str, np.ndarray], out: Path | str, title: str) -> Path:
    """One line per label: xy [T + 1, 2] front-tip positions; the start marked with a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, xy in paths.items():
        (line,) = ax.plot(xy[:, 0], xy[:, 1], lw=1.5, label=label)
        ax.plot(xy[0, 0], xy[0, 1], "o", color=line.get_color(), ms=4)
        ax.plot(xy[-1, 0], xy[-1, 1], ">", color=line.get_color(), ms=6)
    ax.set_xlabel("x (m): the reward is the x velocity")
    ax.set_ylabel("y (m)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_gif(states: np.ndarray, out: Path | str, *, dt: float = 0.04, every: int = 5,
              speed: float = 5.0, width: int = 320, height: int = 240) -> Path:
    """Animate an episode's [T + 1, nphys] physics states (``episode``'s) as a GIF at
    ``speed`` x real time.

    Tries MUJOCO_GL as set, else egl then osmesa, each in a child process running
    ``_render_gif.py`` (MuJoCo fixes its GL backend at import). Raises RenderUnavailable when
    none can render.
    """
    from pes.tasks.swimmer import SWIMMER_XML

    out = Path(out)
    fps = speed / (dt * every)
    backends = [os.environ["MUJOCO_GL"]] if os.environ.get("MUJOCO_GL") else list(GL_BACKENDS)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        npy, xml = Path(tmp) / "states.npy", Path(tmp) / "swimmer.xml"
        np.save(npy, np.asarray(states, np.float64))
        xml.write_text(SWIMMER_XML)
        for backend in backends:
            cmd = [sys.executable, str(RENDER_SCRIPT), str(xml), str(npy), str(out), f"{fps}",
                   str(every), f"{width}x{height}"]
            proc = subprocess.run(cmd, env={**os.environ, "MUJOCO_GL": backend},
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode == 0 and out.is_file():
                return out
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            errors.append(f"MUJOCO_GL={backend}: {last}")
    raise RenderUnavailable(
        "no offscreen OpenGL context for the swimmer GIF (" + "; ".join(errors) + "); install "
        "EGL (Debian: libegl1 libegl-mesa0) or OSMesa (Debian: libosmesa6), or set MUJOCO_GL")


def views(run_dirs: dict[str, Path | str], out_dir: Path | str, *, gif_label: str | None = None,
          seed: int = 0, gif: bool = True, echo: Callable[[str], Any] | None = None
          ) -> list[Path]:
    """paths.png of every labelled run's final policy, and swimmer.gif of ``gif_label``'s run
    (the first label by default), over the episode drawn from ``seed``. Returns the files
    written; a machine without offscreen GL gets the plot and one line on ``echo``."""
    from pes.tasks.swimmer import Swimmer, episode

    echo = echo or (lambda line: print(line, file=sys.stderr))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = Swimmer()
    episodes = {}
    for label, run_dir in run_dirs.items():
        ep = episode(task, final_theta(run_dir), seed=seed)
        episodes[label] = ep
    paths = {f"{label} (return {ep['rewards'].sum():.0f})": ep["xy"]
             for label, ep in episodes.items()}
    files = [plot_paths(paths, out_dir / PATHS_PNG,
                        f"Front-tip path over one {task.horizon}-step episode of each final "
                        "policy (dot: start, arrow: end)")]
    label = gif_label or next(iter(run_dirs))
    if not gif:
        return files
    try:
        files.append(write_gif(episodes[label]["states"], out_dir / SWIMMER_GIF, dt=task.dt))
    except RenderUnavailable as e:
        echo(f"swimmer.gif not written: {e}")
    return files


def comparison_views(out_dir: Path | str, arms: Sequence[Any],
                     echo: Callable[[str], Any] | None = None) -> list[Path]:
    """Views of a ``pes compare swimmer`` directory: each arm's first run (its first seed)
    in paths.png, the first arm's in swimmer.gif; linked from results.md."""
    run_dirs = {res.arm.label: res.runs[0].run_dir for res in arms
                if res.runs and res.runs[0].summary.get("final_theta") is not None}
    if not run_dirs:
        return []
    out_dir = Path(out_dir)
    files = views(run_dirs, out_dir, echo=echo)
    results_md = out_dir / "results.md"
    if results_md.is_file():
        seed = next(iter(arms)).runs[0].summary["seed"]
        links = [f"![{f.stem}]({f.name})" for f in files]
        text = results_md.read_text().rstrip("\n")
        results_md.write_text(f"{text}\n\nThe final policies of seed {seed}, one episode each "
                              f"(swimmer.gif: {next(iter(run_dirs))}, 5x real time):\n\n"
                              + "\n".join(links) + "\n")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pes.paper.swimmer_view",
        description="Draw the path (paths.png) and an animation (swimmer.gif) of trained "
        "swimmer runs.")
    parser.add_argument("runs", nargs="*", help="pes run directories of task swimmer")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episode's start state")
    args = parser.parse_args(argv)
    if not args.runs:
        parser.error("give at least one run directory")
    try:
        labels = [f"{Path(r).resolve().parent.name}/{Path(r).resolve().name}" for r in args.runs]
        files = views(dict(zip(labels, args.runs, strict=True)), args.out, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
