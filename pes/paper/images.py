"""The image-data comparisons of PAPER.md experiments 3 and 4 (``pes compare``).

``pes compare mnist-lr-schedule`` (:func:`run_lr_schedule_comparison`): for each objective
('loss', 'accuracy'), a grid of full unperturbed runs over the (log lr0, log decay) rectangle
(vmapped, several runs at once) gives the heatmap of the final meta-objective; PES and TES runs
(one per seed) from theta0 = (log 0.003, log 30) are drawn on it. Writes, under ``--out``::

    comparison.json, results.md, results.json
    <objective>/heatmap.npz, <objective>/heatmap.png
    <objective>/<pes|tes>/seed-<s>/        (run directories, as `pes run` writes them)

``pes compare many-hyperparameters`` (:func:`run_many_hyperparameters_comparison`): per seed,
PES and TES runs from a random theta (``sample_theta(PRNGKey(seed))``, the prior random search
draws from) and random search given PES's inner steps. Best-so-far meta-objective (the
evaluations of full unperturbed episodes for PES and TES; each configuration's episode for
random search) against total inner steps: ``best_so_far.png``; ``results.md``. Each of those
values is one noisy episode, and random search's minimum runs over many more of them than
PES's, so the configuration each method returns (PES's and TES's final theta, random search's
best draw) is also scored on the same ``REEVAL_EPISODES`` fresh episodes (the paper's code
averaged 10 episodes per point).

Inner steps count training steps only (PES/TES windows including their stagger burn-in; one
episode of T steps per random-search configuration); the evaluations that trace PES's and
TES's curves are not counted (they do not steer the estimators).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pes.paper.compare import (
    MARKER,
    RESULTS_JSON,
    RESULTS_MD,
    CompareOptions,
    ComparisonResult,
    check_seeds,
    options_command,
    parse_seeds,
    prepare_comparison_dir,
    run_arm,
)
from pes.paper.experiments import get_experiment
from pes.paper.random_search import random_search, running_best
from pes.runs import plots
from pes.runs.config import RunConfig, check_int, make_task
from pes.runs.errors import ConfigError
from pes.runs.run import RunResult, fmt_num, write_json

DEFAULT_SEEDS = {"mnist-lr-schedule": "0", "many-hyperparameters": "0,1,2"}
LR_OBJECTIVES = ("loss", "accuracy")
ARMS = ("pes", "tes")  # the estimators each image comparison runs
# The heatmap's "good region": cells within this fraction of the grid's range of its minimum.
GOOD_FRACTION = 0.1
HEATMAP_CHUNK = 12  # full runs vmapped at once (a 784-100-100-10 MLP: a few MB each)
REEVAL_EPISODES = 10  # fresh episodes scoring each method's returned configuration


def _echo(echo: Callable[[str], Any] | None) -> Callable[[str], Any]:
    return echo or (lambda line: None)


def _trajectory(run: RunResult) -> np.ndarray:
    return np.array([r["theta"] for r in run.records if "theta" in r], float)


def compare_images(name: str, options: CompareOptions,
                   echo: Callable[[str], Any]) -> ComparisonResult:
    """The runner of ``pes compare mnist-lr-schedule | many-hyperparameters``: the options
    that apply (--estimators never; --objective and --heatmap-points for mnist-lr-schedule),
    the comparison, and its findings (the lines of results.md that start with '* ' or
    'Finding') to print."""
    if options.estimators is not None:
        raise ConfigError(f"--estimators does not apply to pes compare {name}: it always runs "
                          "PES and TES" + (" and random search" if name != "mnist-lr-schedule"
                                           else ""))
    lr = name == "mnist-lr-schedule"
    for flag, value in (("--objective", options.objective),
                        ("--heatmap-points", options.heatmap_points)):
        if value is not None and not lr:
            raise ConfigError(f"{flag} applies only to pes compare mnist-lr-schedule")
    seeds = parse_seeds(options.seeds if options.seeds is not None else DEFAULT_SEEDS[name])
    common = dict(seeds=seeds, out=options.out, dataset=options.dataset,
                  data_dir=options.data_dir, size=options.size, num_steps=options.num_steps,
                  overwrite=options.overwrite, progress=options.progress, echo=echo)
    if lr:
        result = run_lr_schedule_comparison(
            objectives=(options.objective,) if options.objective else LR_OBJECTIVES,
            heatmap_points=options.heatmap_points, **common)
    else:
        result = run_many_hyperparameters_comparison(**common)
    results_md = Path(result["files"][-1])
    findings = [line for line in results_md.read_text().splitlines()
                if line.startswith(("* ", "Finding"))]
    return ComparisonResult(get_experiment(name), results_md.parent, seeds, result["files"],
                            result["wall_time_s"], findings, details=result)


# ------------------------------------------------------------------- mnist-lr-schedule


def heatmap_value(axes: tuple[np.ndarray, np.ndarray], values: np.ndarray,
                  theta: Sequence[float]) -> float:
    """Bilinear interpolation of the grid ``values`` at ``theta`` (clamped to the grid)."""
    out = []
    for ax, v in zip(axes, theta, strict=True):
        v = float(np.clip(v, ax[0], ax[-1]))
        i = int(np.clip(np.searchsorted(ax, v) - 1, 0, len(ax) - 2))
        out.append((i, (v - ax[i]) / (ax[i + 1] - ax[i])))
    (i, a), (j, b) = out
    g = values
    return float((1 - a) * (1 - b) * g[i, j] + a * (1 - b) * g[i + 1, j]
                 + (1 - a) * b * g[i, j + 1] + a * b * g[i + 1, j + 1])


def good_threshold(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.min() + GOOD_FRACTION * (finite.max() - finite.min()))


def plot_heatmap(path: Path, axes: tuple[np.ndarray, np.ndarray], values: np.ndarray,
                 trajectories: Sequence[tuple[str, np.ndarray]], *, label: str,
                 title: str) -> Path:
    """The (log lr0, log decay) heatmap with the good region outlined and the trajectories."""
    fig, ax = plots._figure(size=(7.5, 5.5))
    ax = ax[0, 0]
    a, b = axes
    mesh = ax.pcolormesh(a, b, values.T, shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=label)
    if len(a) > 1 and len(b) > 1:
        ax.contour(a, b, values.T, levels=[good_threshold(values)], colors="white",
                   linewidths=1.2, linestyles="--")
    colors = {"pes": "tab:red", "tes": "tab:orange"}
    for name, traj in trajectories:
        if traj.size == 0:
            continue
        est = name.split()[0]
        ax.plot(traj[:, 0], traj[:, 1], "-", color=colors.get(est, "w"), lw=1.6, label=name)
        ax.plot(traj[-1, 0], traj[-1, 1], "o", color=colors.get(est, "w"), ms=6,
                markeredgecolor="k")
    starts = [t[0] for _, t in trajectories if t.size]
    if starts:
        ax.plot(starts[0][0], starts[0][1], "*", color="w", ms=12, markeredgecolor="k",
                label="theta0")
    ax.set_xlabel("log lr0")
    ax.set_ylabel("log decay")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return plots._save(fig, path)


def run_lr_schedule_comparison(
    *,
    seeds: Sequence[int] = (0,),
    out: str | Path | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    size: str | None = None,
    objectives: Sequence[str] = LR_OBJECTIVES,
    num_steps: int | None = None,
    heatmap_points: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """PES and TES on mnist-lr-schedule for each objective, over a heatmap of full runs.

    Returns the results dict written to results.json (plus 'files' and 'wall_time_s').
    """
    name = "mnist-lr-schedule"
    say = _echo(echo)
    seeds = check_seeds(seeds)
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, 1)
    if heatmap_points is not None:
        heatmap_points = check_int("heatmap_points", heatmap_points, 2)
    for obj in objectives:
        if obj not in LR_OBJECTIVES:
            raise ConfigError(f"objective={obj!r} is not a known objective; valid objectives: "
                              f"{', '.join(LR_OBJECTIVES)}", field="objective")
    out_dir = Path(out) if out is not None else Path("runs") / "compare" / name
    base = {"dataset": dataset, "data_dir": data_dir, "size": size}
    # Resolve every configuration (and load the data) before writing anything.
    plan: dict[str, list[RunConfig]] = {}
    for obj in objectives:
        plan[obj] = [RunConfig(task=name, estimator=est, seed=s, num_steps=num_steps,
                               out=str(out_dir / obj / est / f"seed-{s}"), objective=obj,
                               **base).resolve()
                     for est in ARMS for s in seeds]
    first = plan[objectives[0]][0]
    options = first.task_options()
    cmd = options_command(name, seeds, base, num_steps, out_dir,
                   "" if heatmap_points is None else f" --heatmap-points {heatmap_points}")
    prepare_comparison_dir(out_dir, overwrite)
    write_json(out_dir / MARKER, {"experiment": name, "seeds": list(seeds),
                                  "num_steps": num_steps, "objectives": list(objectives),
                                  "options": options, "command": cmd})
    start = time.perf_counter()
    files: list[Path] = []
    per_obj: dict[str, Any] = {}
    for obj in objectives:
        heatmap_png, per_obj[obj] = _lr_objective(obj, plan[obj], heatmap_points, out_dir,
                                                  options, progress, say)
        files.append(heatmap_png)
    wall = time.perf_counter() - start
    result = {"experiment": name, "seeds": list(seeds), "options": options,
              "command": cmd, "wall_time_s": round(wall, 2), "objectives": per_obj}
    write_json(out_dir / RESULTS_JSON, result)
    files.append(out_dir / RESULTS_JSON)
    files.append(_lr_results_md(out_dir, result))
    return {**result, "files": files}


def _lr_objective(obj: str, configs: list[RunConfig], heatmap_points: int | None,
                  out_dir: Path, options: dict[str, Any], progress: bool,
                  say: Callable[[str], Any]) -> tuple[Path, dict[str, Any]]:
    """One objective of mnist-lr-schedule: the heatmap of full runs (saved as
    ``obj/heatmap.npz``), the PES and TES runs of ``configs``, and the heatmap plot with their
    trajectories. Returns (the plot's path, the objective's entry of results.json)."""
    name = "mnist-lr-schedule"
    task = make_task(name, configs[0].task_options())
    axes = task.heatmap_axes(heatmap_points)
    t0 = time.perf_counter()
    grid = task.surface(axes[0], axes[1], jax.random.PRNGKey(0), chunk_size=HEATMAP_CHUNK)
    heat_s = time.perf_counter() - t0
    values = np.asarray(grid["meta_loss"], float)
    (out_dir / obj).mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / obj / "heatmap.npz", log_lr0=axes[0], log_decay=axes[1],
             **{k: np.asarray(v) for k, v in grid.items()})
    i, j = np.unravel_index(np.nanargmin(values), values.shape)
    say(f"{obj}: heatmap {len(axes[0])}x{len(axes[1])} full runs in {heat_s:.1f} s; best "
        f"{values[i, j]:.4g} at (log lr0, log decay) = ({axes[0][i]:.2f}, "
        f"{axes[1][j]:.2f})")
    runs: dict[str, list[RunResult]] = {est: [] for est in ARMS}
    for cfg in configs:
        run = run_arm(cfg, progress, f"{obj} {cfg.estimator} seed {cfg.seed}")
        runs[cfg.estimator].append(run)
        s = run.summary
        say(f"{obj} {cfg.estimator} seed {cfg.seed}: theta {s['final_theta']}, meta "
            f"{fmt_num(s['final_meta_loss'])}, {s['inner_steps']:,} inner steps, "
            f"{s['wall_time_s']:.1f} s")
    threshold = good_threshold(values)
    stats: dict[str, Any] = {}
    for est, rs in runs.items():
        finals = np.array([r.summary["final_theta"] for r in rs], float)
        on_map = [heatmap_value(axes, values, th) for th in finals]
        stats[est] = {
            "final_theta": finals.tolist(),
            "final_log_decay_mean": float(finals[:, 1].mean()),
            "final_decay_mean": float(np.exp(finals[:, 1]).mean()),
            "final_meta_objective": [r.summary["final_meta_loss"] for r in rs],
            "heatmap_value_at_final_theta": on_map,
            "in_good_region": [bool(v <= threshold) for v in on_map],
            "inner_steps": [r.summary["inner_steps"] for r in rs],
            "wall_time_s": [r.summary["wall_time_s"] for r in rs],
        }
    label = ("mean training loss over the run" if obj == "loss"
             else "minus mean validation accuracy over the run")
    trajectories = [(f"{est} seed {r.config.seed}", _trajectory(r))
                    for est, rs in runs.items() for r in rs]
    heatmap_png = plot_heatmap(
        out_dir / obj / "heatmap.png", axes, values, trajectories, label=label,
        title=f"mnist-lr-schedule ({options['dataset']}, size {options['size']}, objective "
        f"{obj})\nfinal meta-objective of full runs; dashed: good region; PES and TES "
        "from theta0")
    return heatmap_png, {
        "heatmap": {"points": len(axes[0]), "min": float(values[i, j]),
                    "argmin": [float(axes[0][i]), float(axes[1][j])],
                    "good_threshold": threshold, "wall_time_s": round(heat_s, 2)},
        "settings": {est: runs[est][0].config.settings_text() for est in runs},
        "estimators": stats,
        "tes_decay_larger": stats["tes"]["final_log_decay_mean"]
        > stats["pes"]["final_log_decay_mean"],
        "pes_in_good_region": all(stats["pes"]["in_good_region"]),
    }


def _lr_results_md(out_dir: Path, result: dict[str, Any]) -> Path:
    o = result["options"]
    lines = [
        "# Learning-rate schedule of an MLP on image data (PES paper, experiment 3)",
        "",
        f"Dataset {o['dataset']}, size {o['size']}. theta = (log lr0, log decay) of "
        "lr_t = lr0 / (1 + t/T)^decay, from (log 0.003, log 30). The heatmap is the final "
        "meta-objective of full unperturbed runs on a grid (one shared key); its good region "
        f"(dashed white contour) is the cells within {GOOD_FRACTION:.0%} of the grid's range "
        "of its minimum.",
        "",
        "Paper: TES settles at a larger decay than PES (short-horizon bias), and PES reaches "
        "the good region of the heatmap, for both objectives.",
        "",
        f"Command: `{result['command']}` ({result['wall_time_s']:.1f} s in all). Seeds: "
        f"{', '.join(map(str, result['seeds']))}.",
        "",
        "| objective | estimator | settings | final theta (log lr0, log decay) | final decay | "
        "final meta-objective | heatmap at final theta (good if <= threshold) | in good "
        "region | inner steps | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for obj, r in result["objectives"].items():
        for est, s in r["estimators"].items():
            thetas = "; ".join(f"({a:.2f}, {b:.2f})" for a, b in s["final_theta"])
            lines.append(
                f"| {obj} | {est} | {r['settings'][est]} | {thetas} | "
                f"{s['final_decay_mean']:.3g} | "
                f"{', '.join(fmt_num(v) for v in s['final_meta_objective'])} | "
                f"{', '.join(fmt_num(v) for v in s['heatmap_value_at_final_theta'])} "
                f"(<= {r['heatmap']['good_threshold']:.4g}) | "
                f"{sum(s['in_good_region'])}/{len(s['in_good_region'])} | "
                f"{int(np.mean(s['inner_steps'])):,} | {np.mean(s['wall_time_s']):.1f} |")
    lines += ["", "Findings:", ""]
    for obj, r in result["objectives"].items():
        h = r["heatmap"]
        pes_d = r["estimators"]["pes"]["final_log_decay_mean"]
        tes_d = r["estimators"]["tes"]["final_log_decay_mean"]
        lines.append(
            f"* {obj}: TES settles at {'a larger' if r['tes_decay_larger'] else 'NOT a larger'}"
            f" decay than PES (mean log decay {tes_d:.2f} vs {pes_d:.2f}); PES "
            f"{'lands' if r['pes_in_good_region'] else 'does NOT land'} in the good region "
            f"(grid minimum {h['min']:.4g} at ({h['argmin'][0]:.2f}, {h['argmin'][1]:.2f}); "
            f"{h['points']}x{h['points']} heatmap in {h['wall_time_s']:.0f} s).")
    lines.append("")
    for obj in result["objectives"]:
        lines.append(f"![{obj} heatmap]({obj}/heatmap.png)")
    lines.append("")
    path = out_dir / RESULTS_MD
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------ many-hyperparameters


def _best_curve(run: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """(inner steps, best-so-far meta-objective) of a run's evaluations."""
    evals = [r for r in run.records if r.get("meta_objective") is not None]
    x = np.array([r["inner_steps"] for r in evals], float)
    best, _ = running_best([r["meta_objective"] for r in evals])
    return x, best


def best_at(x: np.ndarray, best: np.ndarray, budget: Any) -> np.ndarray:
    """Step function: the best-so-far after at most ``budget`` inner steps (nan before)."""
    idx = np.searchsorted(x, np.asarray(budget, float), side="right")
    return np.concatenate([[np.nan], best])[idx]


def run_many_hyperparameters_comparison(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    size: str | None = None,
    num_steps: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """PES, TES and random search (PES's inner steps) on many-hyperparameters per seed."""
    name = "many-hyperparameters"
    say = _echo(echo)
    seeds = check_seeds(seeds)
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, 1)
    out_dir = Path(out) if out is not None else Path("runs") / "compare" / name
    base = {"dataset": dataset, "data_dir": data_dir, "size": size}
    probe = RunConfig(task=name, estimator="pes", **base).resolve()
    options = probe.task_options()
    task = make_task(name, options)
    plan = []
    for s in seeds:
        theta0 = [float(v) for v in np.asarray(task.sample_theta(jax.random.PRNGKey(s)))]
        steps = num_steps or probe.num_steps
        # ~20 evaluations per run: each costs a full episode, like a random-search draw.
        plan.append([RunConfig(task=name, estimator=est, seed=s, num_steps=num_steps,
                               eval_every=max(1, steps // 20), theta0=theta0,
                               out=str(out_dir / est / f"seed-{s}"), **base).resolve()
                     for est in ARMS])
    cmd = options_command(name, seeds, base, num_steps, out_dir)
    prepare_comparison_dir(out_dir, overwrite)
    write_json(out_dir / MARKER, {"experiment": name, "seeds": list(seeds),
                                  "num_steps": num_steps, "options": options, "command": cmd})
    start = time.perf_counter()
    per_seed = []
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"pes": [], "tes": [],
                                                              "random search": []}
    for s, configs in zip(seeds, plan, strict=True):
        row: dict[str, Any] = {"seed": s}
        for cfg in configs:
            run = run_arm(cfg, progress, f"{cfg.estimator} seed {s}")
            x, best = _best_curve(run)
            curves[cfg.estimator].append((x, best))
            row[f"_final_theta_{cfg.estimator}"] = run.summary["final_theta"]
            row[cfg.estimator] = {"inner_steps": int(run.summary["inner_steps"]),
                                  "best": float(best[-1]), "final": run.summary[
                                      "final_meta_loss"], "status": run.summary["status"],
                                  "wall_time_s": run.summary["wall_time_s"]}
            say(f"{cfg.estimator} seed {s}: best meta-objective {best[-1]:.4g}, "
                f"{run.summary['inner_steps']:,} inner steps, {run.summary['wall_time_s']:.1f} s")
        budget = row["pes"]["inner_steps"]
        n = max(1, math.ceil(budget / task.horizon))
        t0 = time.perf_counter()
        rs = random_search(task, n, jax.random.fold_in(jax.random.PRNGKey(s), 1))
        rs_s = time.perf_counter() - t0
        curves["random search"].append((rs.inner_steps.astype(float), rs.best_so_far))
        np.savez(out_dir / f"random-search-seed-{s}.npz", thetas=rs.thetas,
                 meta_losses=rs.meta_losses, inner_steps=rs.inner_steps)
        row["random search"] = {"configs": n, "inner_steps": int(rs.inner_steps[-1]),
                                "best": float(rs.best_so_far[-1]), "wall_time_s": round(rs_s, 2)}
        say(f"random search seed {s}: {n} configurations, best {rs.best_so_far[-1]:.4g}, "
            f"{rs_s:.1f} s")
        # PES against random search at equal inner steps: at PES's budget, and at each of
        # PES's evaluations once random search has finished a configuration.
        px, pb = curves["pes"][-1]
        rb = best_at(*curves["random search"][-1], px)
        ok = np.isfinite(rb)
        row["pes_le_random_at_budget"] = bool(
            best_at(px, pb, budget) <= best_at(*curves["random search"][-1], budget))
        row["pes_le_random_fraction"] = float(np.mean(pb[ok] <= rb[ok])) if ok.any() else None
        t0 = time.perf_counter()
        row["returned"] = score_returned(
            task, {"pes": row.pop("_final_theta_pes"), "tes": row.pop("_final_theta_tes"),
                   "random search": rs.best_theta},
            jax.random.fold_in(jax.random.PRNGKey(s), 2))
        ret = row["returned"]
        row["pes_le_random_returned"] = bool(ret["pes"]["mean"] <= ret["random search"]["mean"])
        say(f"returned configurations seed {s} ({REEVAL_EPISODES} fresh episodes, "
            f"{time.perf_counter() - t0:.1f} s): " + ", ".join(
                f"{k} {v['mean']:.4g} +- {v['se']:.2g}" for k, v in ret.items()))
        per_seed.append(row)
    wall = time.perf_counter() - start
    files = [_plot_best(out_dir / "best_so_far.png", curves, options)]
    wins = sum(r["pes_le_random_at_budget"] for r in per_seed)
    returned_wins = sum(r["pes_le_random_returned"] for r in per_seed)
    result = {"experiment": name, "seeds": list(seeds), "options": options, "command": cmd,
              "wall_time_s": round(wall, 2), "settings": {
                  est: c.settings_text() for est, c in zip(ARMS, plan[0], strict=True)},
              "per_seed": per_seed, "pes_le_random_seeds": wins,
              "pes_le_random_in_most_seeds": wins > len(seeds) / 2,
              "reeval_episodes": REEVAL_EPISODES,
              "pes_le_random_returned_seeds": returned_wins}
    write_json(out_dir / RESULTS_JSON, result)
    files.append(out_dir / RESULTS_JSON)
    files.append(_mh_results_md(out_dir, result, task))
    return {**result, "files": files}


def score_returned(task: Any, thetas: dict[str, Any], key: jax.Array,
                   episodes: int = REEVAL_EPISODES) -> dict[str, dict[str, float]]:
    """Each theta's meta-objective over the same ``episodes`` fresh episodes (keys split from
    ``key``: common random numbers across methods): {name: {'mean', 'se'}}, se = std / sqrt(n).
    """
    names = list(thetas)
    rows = np.repeat(np.stack([np.asarray(thetas[n], np.float32) for n in names]), episodes,
                     axis=0)
    keys = np.asarray(jax.random.split(key, episodes))
    values = task.evaluate_many(rows, np.tile(keys, (len(names), 1)), chunk_size=episodes)[
        "meta_loss"].reshape(len(names), episodes)
    return {n: {"mean": float(v.mean()),
                "se": float(v.std(ddof=1) / np.sqrt(episodes)) if episodes > 1 else math.nan}
            for n, v in zip(names, values, strict=True)}


def _plot_best(path: Path, curves: dict[str, list[tuple[np.ndarray, np.ndarray]]],
               options: dict[str, Any]) -> Path:
    fig, ax = plots._figure(size=(7.5, 4.8))
    ax = ax[0, 0]
    colors = {"pes": "tab:red", "tes": "tab:orange", "random search": "tab:blue"}
    for label, runs in curves.items():
        if not runs:
            continue
        end = max(float(x[-1]) for x, _ in runs if len(x))
        grid = np.linspace(0.0, end, 400)
        stack = np.array([best_at(x, b, grid) for x, b in runs])
        for x, b in runs:
            ax.step(x, b, where="post", color=colors[label], alpha=0.3, lw=0.8)
        with warnings.catch_warnings():  # columns where no seed has a value yet: nan
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stack, axis=0)
        ax.plot(grid, mean, color=colors[label], lw=2,
                label=f"{label} (mean of {len(runs)} seed{'s' * (len(runs) != 1)})")
    ax.set_xlabel("total inner steps (training steps; PES/TES evaluations not counted)")
    ax.set_ylabel("best-so-far meta-objective (mean validation loss)")
    ax.set_title(f"many-hyperparameters ({options['dataset']}, size {options['size']}): "
                 "best-so-far against inner steps", fontsize=10)
    ax.legend(fontsize=8)
    return plots._save(fig, path)


def _mh_results_md(out_dir: Path, result: dict[str, Any], task: Any) -> Path:
    o = result["options"]
    n = len(result["seeds"])
    lines = [
        "# Many hyperparameters of an MLP on image data (PES paper, experiment 4)",
        "",
        f"Dataset {o['dataset']}, size {o['size']}: {task.num_hyperparameters} hyperparameters "
        f"(per-tensor log lr and momentum logit, per-layer keep logit) of a "
        f"{'-'.join(map(str, task.layer_sizes))} MLP trained for T = {task.horizon} steps; "
        "meta-objective: mean validation loss over the run. Per seed, PES and TES start from "
        "sample_theta(PRNGKey(seed)); random search draws from the same prior, one full "
        "episode per configuration, with PES's inner steps as its budget. PES's and TES's "
        "best-so-far are over their evaluations (full unperturbed episodes at the current "
        "theta, every num_steps/20 outer steps). Inner steps count training steps only: PES's "
        "and TES's windows with their stagger burn-in, T per random-search configuration; "
        "evaluations are not counted. Each best-so-far value is one noisy episode, and random "
        "search's minimum is over more of them, so the returned configurations (PES's and "
        "TES's final theta, random search's best draw) are also scored on the same "
        f"{result['reeval_episodes']} fresh episodes (mean +- standard error).",
        "",
        "Paper: PES's best-so-far is at or below random search's at equal inner steps.",
        "",
        f"Command: `{result['command']}` ({result['wall_time_s']:.1f} s in all). Settings: "
        + "; ".join(f"{k}: {v}" for k, v in result["settings"].items()) + ".",
        "",
        "| seed | PES best | TES best | random search best (configs) | PES <= random at PES's "
        "budget | PES <= random, fraction of PES's evaluations | inner steps (PES) | wall time "
        "PES / TES / random (s) | returned configuration, fresh episodes: PES / TES / random "
        "search |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["per_seed"]:
        frac = r["pes_le_random_fraction"]
        lines.append(
            f"| {r['seed']} | {r['pes']['best']:.4g} | {r['tes']['best']:.4g} | "
            f"{r['random search']['best']:.4g} ({r['random search']['configs']}) | "
            f"{'yes' if r['pes_le_random_at_budget'] else 'no'} | "
            f"{'n/a' if frac is None else f'{frac:.2f}'} | {r['pes']['inner_steps']:,} | "
            f"{r['pes']['wall_time_s']:.0f} / {r['tes']['wall_time_s']:.0f} / "
            f"{r['random search']['wall_time_s']:.0f} | "
            + " / ".join(f"{v['mean']:.4f} +- {v['se']:.4f}" for v in r["returned"].values())
            + " |")
    lines += [
        "",
        f"Finding: PES's best-so-far is at or below random search's at equal inner steps in "
        f"{result['pes_le_random_seeds']} of {n} seeds "
        f"({'most' if result['pes_le_random_in_most_seeds'] else 'NOT most'} seeds). "
        f"PES's final theta scores at or below random search's best draw on fresh episodes in "
        f"{result['pes_le_random_returned_seeds']} of {n} seeds.",
        "",
        "![best so far](best_so_far.png)",
        "",
    ]
    path = out_dir / RESULTS_MD
    path.write_text("\n".join(lines))
    return path
