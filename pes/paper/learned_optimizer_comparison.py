"""``pes compare learned-optimizer``: meta-training a learned optimizer with PES, TES, full ES
and NRES (PAPER.md experiment 5), against SGD with a tuned constant learning rate.

Per seed, each estimator meta-trains the task's learned optimizer from the same untrained
weights (:meth:`LearnedOptimizerTask.initial_theta`); PES, TES and NRES take the size's outer
steps and full ES the number that gives it the same inner steps (``num_steps * K / T``),
each with its own Adam rate where the size gives one (``Size.learning_rates``). The
runs' evaluations (the meta-loss of fresh inner problems every few outer steps) trace the
meta-loss against inner steps. Afterwards every meta-trained optimizer is scored on the same
held-out inner problems (the *meta-test* loss: keys from ``PRNGKey(TEST_SEED)``, never seen in
training or tuning), next to the untrained optimizer and SGD and Adam, whose constant learning
rates are chosen on a grid by their meta-loss on separate tuning problems
(``PRNGKey(TUNE_SEED)``). Writes, under ``--out``::

    comparison.json, results.json, results.md, meta_loss.png
    <pes|tes|full-es|nres>/seed-<s>/      (run directories, with learned_optimizer.npz)

Inner steps count meta-training steps (windows and stagger burn-in); the evaluations that
trace the curves are not counted. ``--estimators`` runs a subset of the four (the findings
that need a left-out one are not reported).
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
from pes.runs import plots
from pes.runs.config import ConfigError, RunConfig, check_int, make_task
from pes.runs.run import RunResult, write_json

NAME = "learned-optimizer"
ARMS = ("pes", "tes", "full-es", "nres")
DEFAULT_SEEDS = "0,1,2"
EVALUATIONS = 10  # evaluations per run (each costs eval_problems episodes)
TUNE_SEED, TEST_SEED = 1_000_003, 2_000_003
# Constant learning rates tried for the hand-designed baselines (log-spaced).
SGD_GRID = tuple(float(v) for v in np.geomspace(0.01, 3.0, 11))
ADAM_GRID = tuple(float(v) for v in np.geomspace(1e-4, 0.1, 10))
PROBLEMS = {"paper": 32, "full": 32, "cpu": 16, "tiny": 3}  # tuning and test problems each
COLORS = {"pes": "tab:red", "tes": "tab:orange", "full-es": "tab:blue", "nres": "tab:green"}


def select_estimators(estimators: Sequence[str] | None) -> tuple[str, ...]:
    """The named estimators among ARMS, in ARMS's order (all four for None or empty)."""
    if not estimators:
        return ARMS
    unknown = [e for e in estimators if e not in ARMS]
    if unknown:
        raise ConfigError(f"estimators: {unknown[0]!r} is not in the {NAME} comparison; "
                          f"valid: {', '.join(ARMS)}", field="estimators")
    return tuple(e for e in ARMS if e in estimators)


def _curve(run: RunResult) -> tuple[np.ndarray, np.ndarray]:
    evals = [r for r in run.records if r.get("meta_objective") is not None]
    return (np.array([r["inner_steps"] for r in evals], float),
            np.array([r["meta_objective"] for r in evals], float))


def curve_spread(runs: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 50
                 ) -> float | None:
    """A second view of the spread across seeds: the std over seeds (ddof 1) of the
    evaluation curves, interpolated at ``points`` inner-step counts spread over the second
    half of the seeds' common range, averaged over those points. Each point's evaluation
    draws its own few inner problems per seed, so this includes their sampling noise."""
    runs = [(x, y) for x, y in runs if len(x)]
    if len(runs) < 2:
        return None
    end = min(float(x[-1]) for x, _ in runs)
    grid = np.linspace(end / 2, end, points)
    stack = np.array([np.interp(grid, x, y) for x, y in runs])
    return float(np.mean(np.std(stack, axis=0, ddof=1)))


def tune(task: Any, name: str, grid: Sequence[float], tune_keys: Any,
         test_keys: Any) -> dict[str, Any]:
    """Pick ``name``'s ('sgd' or 'adam') constant learning rate on the tuning problems and
    score it on the test problems."""
    losses = task.grid_meta_losses(name, grid, tune_keys).mean(axis=1)
    finite = np.where(np.isfinite(losses), losses, np.inf)
    best = int(np.argmin(finite))
    # The whole grid again (same shapes: no second compilation); only the chosen rate counts.
    test = task.grid_meta_losses(name, grid, test_keys)[best]
    edge = best in (0, len(grid) - 1)
    return {"grid": list(grid), "tune_meta_loss": losses.tolist(),
            "learning_rate": grid[best], "at_grid_edge": edge,
            "test_meta_loss": float(test.mean()), "test_meta_loss_per_problem": test.tolist()}


def compare_learned_optimizer(name: str, options: CompareOptions,
                              echo: Callable[[str], Any]) -> ComparisonResult:
    """The runner of ``pes compare learned-optimizer``: the comparison with the options that
    apply, and its findings (the lines of results.md that start with '* ') to print."""
    options.refuse(("objective", "heatmap_points"), NAME, "--seeds, --num-steps, "
                   "--estimators, --size, --dataset, --data-dir, --out")
    seeds = parse_seeds(options.seeds if options.seeds is not None else DEFAULT_SEEDS)
    result = run_learned_optimizer_comparison(
        seeds=seeds, out=options.out, dataset=options.dataset, data_dir=options.data_dir,
        size=options.size, num_steps=options.num_steps, estimators=options.estimators,
        overwrite=options.overwrite, progress=options.progress, echo=echo)
    results_md = Path(result["files"][-1])
    findings = [line for line in results_md.read_text().splitlines() if line.startswith("* ")]
    return ComparisonResult(get_experiment(name), results_md.parent, seeds, result["files"],
                            result["wall_time_s"], findings, details=result)


def run_learned_optimizer_comparison(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    size: str | None = None,
    num_steps: int | None = None,
    estimators: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """The comparison of the module docstring; returns the results dict written to
    results.json (plus 'files'). ``estimators``: a subset of ARMS (all four by default); a
    finding that needs an estimator left out is reported as not measured."""
    say = echo or (lambda line: None)
    seeds = check_seeds(seeds)
    arms = select_estimators(estimators)
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, 1)
    out_dir = Path(out) if out is not None else Path("runs") / "compare" / NAME
    base = {"dataset": dataset, "data_dir": data_dir, "size": size}
    probe = RunConfig(task=NAME, estimator="pes", num_steps=num_steps, **base).resolve()
    options = probe.task_options()
    task = make_task(NAME, options)
    steps = {est: num_steps for est in arms}
    if num_steps is not None and "full-es" in arms:  # full ES keeps PES's inner steps
        steps["full-es"] = max(1, math.ceil(num_steps * probe.truncation_length / task.horizon))
    plan = []
    for s in seeds:
        row = []
        for est in arms:
            cfg = RunConfig(task=NAME, estimator=est, seed=s, num_steps=steps[est],
                            out=str(out_dir / est / f"seed-{s}"), **base).resolve()
            cfg = RunConfig(**{**cfg.to_dict(), "theta0": None,
                               "eval_every": max(1, cfg.num_steps // EVALUATIONS)}).resolve()
            row.append(cfg)
        plan.append(row)
    cmd = options_command(NAME, seeds, base, num_steps, out_dir,
                          extra="" if arms == ARMS else f" --estimators {','.join(arms)}")
    prepare_comparison_dir(out_dir, overwrite)
    write_json(out_dir / MARKER, {"experiment": NAME, "seeds": list(seeds),
                                  "num_steps": num_steps, "options": options, "command": cmd})
    start = time.perf_counter()
    n_problems = PROBLEMS.get(options["size"], 16)
    tune_keys = jax.random.split(jax.random.PRNGKey(TUNE_SEED), n_problems)
    test_keys = jax.random.split(jax.random.PRNGKey(TEST_SEED), n_problems)

    t0 = time.perf_counter()
    baselines = {"sgd": tune(task, "sgd", SGD_GRID, tune_keys, test_keys),
                 "adam": tune(task, "adam", ADAM_GRID, tune_keys, test_keys)}
    untrained = task.meta_test(task.initial_theta(), test_keys)["meta_loss"]
    baselines["untrained"] = {"test_meta_loss": float(untrained.mean())}
    for name in ("sgd", "adam"):
        b = baselines[name]
        say(f"tuned {name}: lr {b['learning_rate']:.3g}, meta-test loss "
            f"{b['test_meta_loss']:.4f}" + (" (at the edge of the grid)" if b["at_grid_edge"]
                                              else ""))
    say(f"untrained learned optimizer: meta-test loss {untrained.mean():.4f} "
        f"({time.perf_counter() - t0:.1f} s for the baselines)")

    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {est: [] for est in arms}
    per_seed = []
    for s, configs in zip(seeds, plan, strict=True):
        row: dict[str, Any] = {"seed": s}
        for cfg in configs:
            run = run_arm(cfg, progress, f"{cfg.estimator} seed {s}")
            curves[cfg.estimator].append(_curve(run))
            theta = np.asarray(run.summary["final_theta"], np.float32)
            test = task.meta_test(theta, test_keys)
            row[cfg.estimator] = {
                "test_meta_loss": float(test["meta_loss"].mean()),
                "test_accuracy": float(test["final_test_accuracy"].mean()),
                "final_meta_loss": run.summary["final_meta_loss"],
                "inner_steps": int(run.summary["inner_steps"]),
                "outer_steps": int(run.summary["outer_steps"]),
                "status": run.summary["status"],
                "wall_time_s": run.summary["wall_time_s"]}
            say(f"{cfg.estimator} seed {s}: meta-test loss {test['meta_loss'].mean():.4f}, "
                f"{run.summary['inner_steps']:,} inner steps, "
                f"{run.summary['wall_time_s']:.1f} s ({run.summary['status']})")
        per_seed.append(row)
    wall = time.perf_counter() - start
    result = _summarise(seeds, options, cmd, wall, plan, per_seed, baselines, task,
                        n_problems, arms)
    result["spread_along_curve"] = {est: curve_spread(curves[est]) for est in arms}
    files = [_plot(out_dir / "meta_loss.png", curves, baselines, options, task)]
    write_json(out_dir / RESULTS_JSON, result)
    files.append(out_dir / RESULTS_JSON)
    files.append(_results_md(out_dir, result, task))
    return {**result, "files": files}


def _summarise(seeds, options, cmd, wall, plan, per_seed, baselines, task, n_problems, arms):
    test = {est: np.array([r[est]["test_meta_loss"] for r in per_seed]) for est in arms}
    sgd = baselines["sgd"]["test_meta_loss"]
    n = len(seeds)
    spread = {est: float(np.std(v, ddof=1)) if n > 1 else None for est, v in test.items()}
    has = set(arms)
    # Each finding needs its estimators; without them it is None (not measured).
    beats_tes = int(np.sum(test["pes"] < test["tes"])) if {"pes", "tes"} <= has else None
    beats_sgd = int(np.sum(test["pes"] < sgd)) if "pes" in has else None
    smaller = (spread["pes"] < spread["full-es"]
               if {"pes", "full-es"} <= has and spread["pes"] is not None else None)
    return {
        "experiment": NAME, "seeds": list(seeds), "estimators": list(arms), "options": options,
        "command": cmd, "wall_time_s": round(wall, 2), "test_problems": n_problems,
        "settings": {est: c.settings_text() for est, c in zip(arms, plan[0], strict=True)},
        "task": repr(task), "baselines": baselines, "per_seed": per_seed,
        "mean_test_meta_loss": {est: float(v.mean()) for est, v in test.items()},
        "spread_test_meta_loss": spread,
        "pes_beats_tes_seeds": beats_tes,
        "pes_beats_tes_in_most_seeds": None if beats_tes is None else beats_tes > n / 2,
        "pes_spread_smaller_than_full_es": smaller,
        "pes_beats_tuned_sgd_seeds": beats_sgd,
        "pes_beats_tuned_sgd_in_most_seeds": None if beats_sgd is None else beats_sgd > n / 2,
    }


def _plot(path: Path, curves, baselines, options, task) -> Path:
    fig, ax = plots._figure(size=(7.5, 4.8))
    ax = ax[0, 0]
    for est, runs in curves.items():
        if not runs:
            continue
        for x, y in runs:
            ax.plot(x, y, color=COLORS[est], alpha=0.35, lw=0.8)
        # The seeds' common range, so the mean is over every seed at each point.
        end = min(float(x[-1]) for x, _ in runs if len(x))
        grid = np.linspace(0.0, end, 200)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stack = np.array([np.interp(grid, x, y, right=np.nan) for x, y in runs if len(x)])
            middle = np.nanmedian(stack, axis=0)  # one diverged seed must not hide the rest
        ax.plot(grid, middle, color=COLORS[est], lw=2,
                label=f"{est} (median of {len(runs)} seed{'s' * (len(runs) != 1)}; thin: each)")
    for name, style in (("sgd", "--"), ("adam", ":")):
        b = baselines[name]
        ax.axhline(b["test_meta_loss"], color="k", ls=style, lw=1,
                   label=f"{name}, tuned lr {b['learning_rate']:.3g} (meta-test)")
    start = [y[0] for runs in curves.values() for _, y in runs if len(y) and np.isfinite(y[0])]
    if start:  # a diverged run (the loss cap) would squash the others: it leaves the top
        top = 1.15 * max(start)
        ax.set_ylim(top=top)
        if any(np.nanmax(y) > top for runs in curves.values() for _, y in runs if len(y)):
            ax.text(0.01, 0.98, "runs above the top of the plot diverged", fontsize=8,
                    transform=ax.transAxes, va="top")
    ax.set_xlabel("meta-training inner steps (evaluations not counted)")
    ax.set_ylabel("meta-loss of fresh inner problems\n(mean training loss over T steps)")
    ax.set_title(f"learned optimizer ({options['dataset']}, size {options['size']}, "
                 f"T = {task.horizon}): meta-loss against inner steps", fontsize=10)
    ax.legend(fontsize=8)
    return plots._save(fig, path)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _results_md(out_dir: Path, result: dict[str, Any], task: Any) -> Path:
    o, n = result["options"], len(result["seeds"])
    arms = tuple(result["estimators"])
    b = result["baselines"]
    lines = [
        "# Meta-training a learned optimizer (PES paper, experiment 5)",
        "",
        f"Dataset {o['dataset']} ({task.data_name}), size {o['size']}: a per-parameter MLP "
        f"optimizer ({task.num_weights} weights) meta-trained on "
        f"{'-'.join(map(str, task.layer_sizes))} MLP classifiers, T = {task.horizon} inner "
        f"steps of batch {task.batch_size}; meta-loss: mean training loss over the T steps. "
        f"Meta-test loss: the mean over {result['test_problems']} held-out inner problems "
        "(their own initialisations and data orders), the same for every optimizer. SGD and "
        "Adam: the constant learning rate of a log grid with the lowest meta-loss on "
        f"{result['test_problems']} separate tuning problems."
        + (" Outer (Adam) learning rates: each estimator's own, chosen at this size by "
           "examples/tune_learned_optimizer_lr.py on a seed outside the reported ones and the "
           "tuning problems (see the settings below)." if task.size.learning_rates else ""),
        "",
        "Paper: PES reaches lower meta-losses than TES (and ES) in most seeds, with a smaller "
        "spread across seeds than full ES at equal inner steps, and the PES-trained optimizer "
        "beats SGD with a tuned constant learning rate.",
        "",
        f"Command: `{result['command']}` ({result['wall_time_s']:.0f} s in all). Settings: "
        + "; ".join(f"{k}: {v}" for k, v in result["settings"].items()) + ".",
        "",
        f"Baselines (meta-test loss): untrained learned optimizer "
        f"{b['untrained']['test_meta_loss']:.4f}; SGD, tuned lr {b['sgd']['learning_rate']:.3g}"
        f": {b['sgd']['test_meta_loss']:.4f}; Adam, tuned lr {b['adam']['learning_rate']:.3g}: "
        f"{b['adam']['test_meta_loss']:.4f}.",
        "",
        "| seed | " + " | ".join(f"{e} meta-test loss" for e in arms)
        + " | inner steps (" + " / ".join(arms) + ") |",
        "|---|" + "---|" * (len(arms) + 1),
    ]
    for r in result["per_seed"]:
        lines.append(f"| {r['seed']} | " + " | ".join(
            f"{r[e]['test_meta_loss']:.4f}" + ("" if r[e]["status"] == "completed"
                                               else f" ({r[e]['status']})") for e in arms)
            + " | " + " / ".join(f"{r[e]['inner_steps']:,}" for e in arms) + " |")
    mean, spread = result["mean_test_meta_loss"], result["spread_test_meta_loss"]
    lines.append("| mean | " + " | ".join(f"{mean[e]:.4f}" for e in arms) + " | |")
    lines.append("| std across seeds | " + " | ".join(_fmt(spread[e]) for e in arms) + " | |")
    smaller = result["pes_spread_smaller_than_full_es"]
    along = result.get("spread_along_curve", {})
    findings = []
    if result["pes_beats_tes_seeds"] is not None:
        findings.append(
            f"* PES reaches a lower meta-test loss than TES in {result['pes_beats_tes_seeds']} "
            f"of {n} seeds ({'most' if result['pes_beats_tes_in_most_seeds'] else 'NOT most'}).")
    if {"pes", "full-es"} <= set(arms):
        findings.append(
            "* Spread across seeds at equal inner steps: PES "
            f"{_fmt(spread['pes'])}, full ES {_fmt(spread['full-es'])} ("
            + ("n/a with one seed" if smaller is None else
               f"PES's is {'smaller' if smaller else 'NOT smaller'}") + ").")
    findings.append(
        "* Second view (std over seeds of the evaluation curves, mean over the second half "
        "of the inner steps; includes the sampling noise of each evaluation's few problems): "
        + ", ".join(f"{e} {_fmt(along.get(e))}" for e in arms) + ".")
    if result["pes_beats_tuned_sgd_seeds"] is not None:
        findings.append(
            f"* The PES-trained optimizer beats SGD with a tuned constant learning rate "
            f"({b['sgd']['test_meta_loss']:.4f}) in {result['pes_beats_tuned_sgd_seeds']} of "
            f"{n} seeds "
            f"({'most' if result['pes_beats_tuned_sgd_in_most_seeds'] else 'NOT most'}).")
    left_out = [e for e in ARMS if e not in arms]
    if left_out:
        findings.append(f"* Not run (--estimators): {', '.join(left_out)}; the findings that "
                        "need them are left out.")
    lines += ["", "Findings:", "", *findings, "",
              "![meta-loss against inner steps](meta_loss.png)", ""]
    path = out_dir / RESULTS_MD
    path.write_text("\n".join(lines))
    return path
