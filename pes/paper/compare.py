"""Run a paper comparison: every arm of an Experiment over several seeds, then plot and tabulate.

The output directory holds ``comparison.json`` (what was asked), one run directory per arm and
seed (``<label>/seed-<s>/``), ``meta_objective.png`` (mean over seeds, min-max band),
``theta.png``, ``results.md`` (the table of final results) and ``results.json``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pes.paper.experiments import (
    EXPERIMENTS,
    IMAGE_COMPARISONS,
    TRAINING_RUNS,
    Arm,
    Experiment,
    get_experiment,
    load,
)
from pes.runs import plots
from pes.runs.config import MAX_SEED, RunConfig, check_int
from pes.runs.errors import ConfigError, RunFailed
from pes.runs.registry import ESTIMATOR_SETTINGS, get_estimator, get_task
from pes.runs.run import (
    RunResult,
    execute_run,
    fmt_num,
    fmt_theta,
    write_json,
)

MARKER = "comparison.json"
# Augmented random search's options (docs/ars.md), RunConfig settings that comparisons of
# training runs apply to their arms: the estimator settings to the ES arms only.
ARS_OPTIONS = ("centered_ranks", "top_b", "survival_bonus_shift", "obs_norm")
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); 'a-b' ranges allowed ('0-4'); duplicates and negatives refused."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"seeds={text!r} must be comma-separated integers >= 0, e.g. "
                              "0,1,2 or 0-4", field="seeds") from None
    return check_seeds(seeds)


def check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds:
        raise ConfigError("seeds is empty; give at least one seed, e.g. 0,1,2", field="seeds")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s <= MAX_SEED]
    if bad:
        raise ConfigError(f"seeds: {bad[0]!r} must be an integer in [0, {MAX_SEED}]",
                          field="seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={','.join(map(str, seeds))} repeats a seed", field="seeds")
    return seeds


@dataclass
class ArmResult:
    """One arm's runs (one per seed), or why it was skipped."""

    arm: Arm
    config: RunConfig | None  # resolved, for the first seed
    runs: list[RunResult] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class ComparisonResult:
    """What every comparison returns (each Experiment's runner, see :func:`run_experiment`).

    seeds: the seeds run (None for a comparison that is not over seeds: variance); files: what
    was written (results.md last); lines: what ``pes compare`` prints before
    :meth:`summary_line` (the table of final results, the findings, or the claims); arms: the
    arms' runs (comparisons of training runs); details: the comparison's own results (the
    results.json data of the image and learned-optimizer comparisons; the study and its
    claims for variance).
    """

    experiment: Experiment
    out_dir: Path
    seeds: tuple[int, ...] | None
    files: list[Path]
    wall_time_s: float
    lines: list[str] = field(default_factory=list)
    arms: list[ArmResult] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        """``NAME: S seed(s) in W s; wrote FILES`` (no seed count without seeds)."""
        seeds = "" if self.seeds is None else f"{len(self.seeds)} seed(s) in "
        return (f"{self.experiment.name}: {seeds}{self.wall_time_s:.1f} s; wrote "
                + ", ".join(str(f) for f in self.files))


@dataclass(frozen=True)
class CompareOptions:
    """The options of ``pes compare EXPERIMENT`` as given (None: not given). Each runner uses
    the ones that apply to its experiment and refuses the others (a ConfigError)."""

    seeds: str | None = None
    out: str | None = None
    num_steps: int | None = None
    estimators: Sequence[str] | None = None
    overwrite: bool = False
    progress: bool = True
    data_dir: str | None = None
    dataset: str | None = None
    size: str | None = None
    objective: str | None = None
    heatmap_points: int | None = None
    reset: str | None = None
    centered_ranks: bool | None = None
    top_b: int | None = None
    survival_bonus_shift: bool | None = None
    obs_norm: bool | None = None

    def ars(self) -> dict[str, Any]:
        """The ARS options given (ARS_OPTIONS that are not None)."""
        return {n: getattr(self, n) for n in ARS_OPTIONS if getattr(self, n) is not None}

    def refuse(self, names: Sequence[str], experiment: str, takes: str) -> None:
        """A ConfigError naming the first of ``names`` that was given: ``experiment`` takes
        only ``takes``."""
        for name in names:
            if getattr(self, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} does not apply to pes compare "
                                  f"{experiment}; it takes {takes}")


def run_experiment(name: str, options: CompareOptions,
                   echo: Callable[[str], Any] | None = None) -> ComparisonResult:
    """``pes compare NAME``: the runner that experiment ``name`` names
    (:attr:`Experiment.runner`), called as ``runner(name, options, echo)``. An unknown name
    goes to the runner of training runs, which refuses it after checking the options."""
    runner = EXPERIMENTS[name].runner if name in EXPERIMENTS else TRAINING_RUNS
    for option in ("reset", *ARS_OPTIONS):
        if getattr(options, option) is not None and runner != TRAINING_RUNS:
            raise ConfigError(f"--{option.replace('_', '-')} does not apply to pes compare "
                              f"{name}; it applies to comparisons of training runs (e.g. pes "
                              "compare gym:ENV_ID)", field=option)
    return load(runner)(name, options, echo or (lambda line: None))


def compare_training_runs(name: str, options: CompareOptions,
                          echo: Callable[[str], Any]) -> ComparisonResult:
    """The runner of a comparison of training runs (every arm over every seed):
    :func:`run_comparison` with the options that apply (default seeds 0,1,2)."""
    given = [f"--{n.replace('_', '-')}" for n in (
        "data_dir", "dataset", "size", "objective", "heatmap_points")
        if getattr(options, n) is not None]
    if given:
        raise ConfigError(f"{given[0]} applies only to pes compare "
                          f"{' and '.join(IMAGE_COMPARISONS)}, not {name}")
    seeds = parse_seeds(options.seeds if options.seeds is not None else "0,1,2")
    return run_comparison(name, seeds=seeds, out=options.out, num_steps=options.num_steps,
                          estimators=options.estimators, overwrite=options.overwrite,
                          progress=options.progress, echo=echo, reset=options.reset,
                          ars=options.ars())


def select_arms(experiment: Experiment, estimators: Sequence[str] | None) -> tuple[Arm, ...]:
    """The arms named by label or estimator name (all of them for None), in paper order."""
    if not estimators and experiment.default_arms is not None:
        estimators = experiment.default_arms
    if not estimators:
        return experiment.arms
    valid = experiment.arm_labels()
    names = {a.estimator for a in experiment.arms}
    for name in estimators:
        if name not in valid and name not in names:
            raise ConfigError(
                f"estimators: {name!r} is not in the {experiment.name} comparison; valid: "
                f"{', '.join(dict.fromkeys(valid + tuple(a.estimator for a in experiment.arms)))}",
                field="estimators")
    wanted = set(estimators)
    return tuple(a for a in experiment.arms if a.label in wanted or a.estimator in wanted)


def prepare_comparison_dir(path: Path, overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={str(path)!r} exists and is not a directory", field="out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"out={str(path)!r} already exists and is not empty; pass "
                              "--overwrite to replace that comparison, or choose another --out",
                              field="out")
        if not (path / MARKER).is_file():
            raise ConfigError(f"out={str(path)!r} is not empty and is not a pes comparison "
                              f"directory (no {MARKER}); refusing to delete it", field="out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_arm(cfg: RunConfig, progress: bool, desc: str) -> RunResult:
    """One run of a comparison; a run that fails (non-finite gradient, bad data) is kept with
    its status rather than stopping the comparison."""
    try:
        return execute_run(cfg, progress=progress, leave=False, desc=desc)
    except RunFailed as e:
        return e.result


def options_command(name: str, seeds: Sequence[int], options: dict[str, Any],
                    num_steps: int | None, out: Path, extra: str = "") -> str:
    """The ``pes compare NAME`` command line of a comparison with data/size options."""
    cmd = f"pes compare {name} --seeds {','.join(map(str, seeds))}"
    for key in ("dataset", "size", "data_dir"):
        if options.get(key) is not None:
            cmd += f" --{key.replace('_', '-')} {options[key]}"
    if num_steps is not None:
        cmd += f" --num-steps {num_steps}"
    return cmd + extra + f" --out {out}"


def command_line(experiment: Experiment, seeds: Sequence[int], num_steps: int | None,
                 estimators: Sequence[str] | None, out: Path, reset: str | None = None,
                 ars: dict[str, Any] | None = None) -> str:
    cmd = f"pes compare {experiment.name} --seeds {','.join(map(str, seeds))}"
    if reset is not None:
        cmd += f" --reset {reset}"
    for name, value in (ars or {}).items():
        flag = name.replace("_", "-")
        cmd += (f" --{flag} {value}" if not isinstance(value, bool)
                else f" --{flag}" if value else f" --no-{flag}")
    if num_steps is not None:
        cmd += f" --num-steps {num_steps}"
    if estimators:
        cmd += f" --estimators {','.join(estimators)}"
    return cmd + f" --out {out}"


def run_comparison(
    name: str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
    num_steps: int | None = None,
    estimators: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
    reset: str | None = None,
    ars: dict[str, Any] | None = None,
) -> ComparisonResult:
    """Run experiment ``name``'s arms over ``seeds`` and write plots and results.

    num_steps: outer steps for every arm (quick runs); None keeps the paper's per-estimator
    numbers. estimators: a subset of arms (labels or estimator names). Arms whose estimator
    class this installation lacks are skipped with a note. A failed run (non-finite gradient)
    is reported in the table; the other runs go on. reset: every arm's ``reset`` setting
    (RunConfig.reset; None: the arms' own). ars: ARS_OPTIONS settings (e.g. ``{"obs_norm":
    True, "top_b": 4}``) for every arm; centred ranks and top-b go to the ES arms only.
    """
    ars = {n: v for n, v in (ars or {}).items() if v is not None}
    unknown = sorted(set(ars) - set(ARS_OPTIONS))
    if unknown:
        raise ConfigError(f"ars: {unknown[0]!r} is not one of {', '.join(ARS_OPTIONS)}",
                          field=unknown[0])
    echo = echo or (lambda line: None)
    experiment = get_experiment(name)
    seeds = check_seeds(seeds)
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, 1)
    arms = select_arms(experiment, estimators)
    folder = experiment.folder or experiment.name
    out_dir = Path(out) if out is not None else Path("runs") / "compare" / folder

    plan: list[tuple[ArmResult, list[RunConfig]]] = []
    for arm in arms:
        est = get_estimator(arm.estimator)
        if not est.available():
            plan.append((ArmResult(arm, None, skipped=f"pes.{est.attr} is not available in "
                                   "this installation"), []))
            continue
        # Resolve every configuration before writing anything: a bad setting stops here.
        extra = {n: v for n, v in ars.items()
                 if n not in ESTIMATOR_SETTINGS or n in est.params}
        overrides = dict(arm.overrides)
        if num_steps is not None:  # --num-steps replaces an arm's environment-step budget
            overrides.pop("env_steps", None)
        configs = [RunConfig(task=experiment.task, estimator=arm.estimator, seed=s,
                             num_steps=num_steps, out=str(out_dir / arm.label / f"seed-{s}"),
                             **{**overrides, **extra,
                                **({} if reset is None else {"reset": reset})}).resolve()
                   for s in seeds]
        plan.append((ArmResult(arm, configs[0]), configs))
    prepare_comparison_dir(out_dir, overwrite)
    write_json(out_dir / MARKER, {
        "experiment": experiment.name, "seeds": list(seeds), "num_steps": num_steps,
        "estimators": list(estimators) if estimators else None,
        "arms": [a.label for a in arms],
        "command": command_line(experiment, seeds, num_steps, estimators, out_dir, reset,
                                ars),
    })

    start = time.perf_counter()
    results = [res for res, _ in plan]
    try:
        for res, configs in plan:
            if res.skipped:
                echo(f"{res.arm.label}: skipped ({res.skipped})")
                continue
            for cfg in configs:
                run = run_arm(cfg, progress, f"{res.arm.label} seed {cfg.seed}")
                res.runs.append(run)
                echo(_run_line(res.arm, run, experiment.metric_key))
    except KeyboardInterrupt:
        # Tabulate the runs that finished before re-raising, so the wait was not for nothing.
        write_results(experiment, out_dir, seeds, results, num_steps, estimators,
                      time.perf_counter() - start)
        raise
    wall = time.perf_counter() - start
    files, table = write_results(experiment, out_dir, seeds, results, num_steps, estimators,
                                 wall)
    if experiment.views is not None:  # e.g. the trained swimmers' paths and an animation
        files += load(experiment.views)(out_dir, results, echo)
    return ComparisonResult(experiment, out_dir, seeds, files, wall, [table], results)


def _run_line(arm: Arm, run: RunResult, metric: str) -> str:
    s = run.summary
    state = "" if s["status"] == "completed" else f" [{s['status']}: {s['error']}]"
    value = (s.get("final_metrics") or {}).get(metric)
    return (f"{arm.label:<11} seed {s['seed']}: theta {fmt_theta(s['final_theta'])}, {metric} "
            f"{fmt_num(value)}, {s['inner_steps']:,} inner steps, "
            f"{s['wall_time_s']:.1f} s{state}")


# ---------------------------------------------------------------------------- aggregation


def _metric_curve(label: str, runs: list[RunResult], metric: str) -> plots.Curve | None:
    per_run = [{r["step"]: r for r in run.records if "eval" in r} for run in runs]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    x = np.array([np.mean([p[s]["inner_steps"] for p in per_run]) for s in steps])
    y = np.array([[_f(p[s]["eval"].get(metric)) for s in steps] for p in per_run])
    return plots.Curve(label, x, _nanmean(y), _nanreduce(np.nanmin, y),
                       _nanreduce(np.nanmax, y), steps=np.array(steps))


def _theta_curve(label: str, runs: list[RunResult]) -> plots.Curve | None:
    per_run = [{r["step"]: r for r in run.records if "theta" in r} for run in runs]
    if not per_run or not all(per_run):
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    x = np.array([np.mean([p[s]["inner_steps"] for p in per_run]) for s in steps])
    th = np.array([[np.atleast_1d(np.asarray(p[s]["theta"], float)) for s in steps]
                   for p in per_run])  # [runs, steps, d]
    return plots.Curve(label, x, _nanmean(th), _nanreduce(np.nanmin, th),
                       _nanreduce(np.nanmax, th), steps=np.array(steps))


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _nanreduce(fn, a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[1:], np.nan)
    ok = ~np.all(np.isnan(a), axis=0)
    out[ok] = fn(a[:, ok], axis=0)
    return out


def _nanmean(a: np.ndarray) -> np.ndarray:
    return _nanreduce(np.nanmean, a)


def _mean_std(values: list[Any]) -> tuple[Any, Any]:
    """Mean and sample std over seeds (std None for one seed), per component for vectors."""
    arr = np.array([np.atleast_1d(np.asarray(_nan_list(v), float)) for v in values])
    if arr.size == 0:
        return None, None
    mean = np.nanmean(arr, axis=0) if not np.all(np.isnan(arr)) else np.full(arr.shape[1:],
                                                                             np.nan)
    std = np.nanstd(arr, axis=0, ddof=1) if len(values) > 1 else None
    scalar = np.ndim(_nan_list(values[0])) == 0
    # A vector theta gives a list, a matrix theta (the swimmer's W) a list of lists.
    pick = (lambda a: None if a is None else float(a[0])) if scalar else \
        (lambda a: None if a is None else np.asarray(a, float).tolist())
    return pick(mean), pick(std)


def _nan_list(v: Any) -> Any:
    if isinstance(v, list):
        return [_nan_list(x) for x in v]
    return float("nan") if v is None else v


def _pm(mean: Any, std: Any, digits: int = 4) -> str:
    if isinstance(mean, list):
        stds = std if std is not None else [None] * len(mean)
        return "(" + ", ".join(_pm(m, s, digits) for m, s in zip(mean, stds, strict=True)) + ")"
    text = fmt_num(None if mean is None or np.isnan(mean) else mean, digits)
    if std is not None and not np.isnan(std):
        text += f" ± {std:.2g}"
    return text


def arm_stats(res: ArmResult, metric: str) -> dict[str, Any]:
    """Final results of an arm over its seeds (JSON-ready)."""
    runs = res.runs
    summaries = [r.summary for r in runs]
    theta_mean, theta_std = _mean_std([s["final_theta"] for s in summaries])
    finals = [(s.get("final_metrics") or {}).get(metric) for s in summaries]
    metric_mean, metric_std = _mean_std(finals)
    other: dict[str, float] = {}
    keys = [k for k in (summaries[0].get("final_metrics") or {}) if k != metric] if summaries \
        else []
    for key in keys:
        other[key] = _mean_std([(s.get("final_metrics") or {}).get(key) for s in summaries])[0]
    return {
        "label": res.arm.label,
        "estimator": res.arm.estimator,
        "settings": res.config.settings_text() if res.config else None,
        "skipped": res.skipped,
        "seeds": [s["seed"] for s in summaries],
        "completed": sum(s["status"] == "completed" for s in summaries),
        "errors": [s["error"] for s in summaries if s["error"]],
        "final_theta_mean": theta_mean,
        "final_theta_std": theta_std,
        "final_metric": metric,
        "final_metric_mean": metric_mean,
        "final_metric_std": metric_std,
        "other_final_metrics_mean": other,
        "inner_steps_mean": float(np.mean([s["inner_steps"] for s in summaries]))
        if summaries else None,
        "wall_time_s_mean": float(np.mean([s["wall_time_s"] for s in summaries]))
        if summaries else None,
        "run_dirs": [str(r.run_dir) for r in runs],
    }


def milestone_rows(experiment: Experiment, results: list[ArmResult], metric: str
                   ) -> tuple[list[float], list[dict[str, Any]]]:
    """Per run: the metric within the experiment's budget, its best and final values, and the
    inner steps at which it first reached each milestone (None: never). Returns the levels
    (the experiment's milestones, then 95% of level_arm's mean final value) and the rows."""
    levels = [float(m) for m in experiment.milestones]
    ref = next((r for r in results if r.arm.label == experiment.level_arm and r.runs), None)
    if ref is not None:
        finals = [_f((run.summary.get("final_metrics") or {}).get(metric)) for run in ref.runs]
        if finals and np.all(np.isfinite(finals)):
            levels.append(0.95 * float(np.mean(finals)))
    rows = []
    for res in results:
        for run in res.runs:
            evals = [(r["inner_steps"], _f(r["eval"].get(metric))) for r in run.records
                     if "eval" in r]
            if not evals:
                continue
            within = [v for s, v in evals if experiment.budget is None or s <= experiment.budget]
            rows.append({
                "label": res.arm.label, "seed": run.summary["seed"],
                "within_budget": within[-1] if within else None,
                "best": max(v for _, v in evals), "final": evals[-1][1],
                "first_reached": [next((s for s, v in evals if v >= level), None)
                                  for level in levels],
            })
    return levels, rows


def _milestone_lines(experiment: Experiment, levels: list[float], rows: list[dict[str, Any]]
                     ) -> list[str]:
    if not rows:
        return []
    names = [f"{level:g}" for level in experiment.milestones]
    if len(levels) > len(names):
        names.append(f"{levels[-1]:.4g} (95% of {experiment.level_arm}'s mean final)")
    budget = "" if experiment.budget is None else f" at <= {experiment.budget:,} steps |"
    lines = ["Per run (inner steps: every particle's steps, burn-in included; evaluations as "
             "logged):", "",
             f"| estimator | seed |{budget} best | final | "
             + " | ".join(f"steps to {n}" for n in names) + " |",
             "|---|---|" + "---|" * (bool(budget) + 2 + len(names))]
    for row in rows:
        cells = [row["label"], str(row["seed"])]
        if budget:
            cells.append("" if row["within_budget"] is None else fmt_num(row["within_budget"]))
        cells += [fmt_num(row["best"]), fmt_num(row["final"])]
        cells += ["never" if s is None else f"{s:,}" for s in row["first_reached"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_results(experiment: Experiment, out_dir: Path, seeds: Sequence[int],
                  results: list[ArmResult], num_steps: int | None,
                  estimators: Sequence[str] | None, wall_time_s: float
                  ) -> tuple[list[Path], str]:
    """Plots, results.md and results.json of a finished comparison; returns the files
    written and the markdown table."""
    metric = experiment.metric_key
    entry = get_task(experiment.task)
    ran = [r for r in results if r.runs]
    files: list[Path] = []
    curves = [c for r in ran if (c := _metric_curve(r.arm.label, r.runs, metric)) is not None]
    band = "mean over seeds, band: min to max" if len(seeds) > 1 else f"seed {seeds[0]}"
    if curves:
        files.append(plots.plot_curves(
            out_dir / "meta_objective.png", curves, xlabel="inner steps",
            ylabel=experiment.metric_label, log_y=experiment.log_y,
            title=f"{experiment.title} ({band})", outer_panel=True, log_x=experiment.log_x))
    if experiment.plot_theta:
        tcurves = [c for r in ran if (c := _theta_curve(r.arm.label, r.runs)) is not None]
        if tcurves:
            files.append(plots.plot_theta(
                out_dir / "theta.png", tcurves, theta_names=entry.theta_names,
                reference=entry.reference(), xlabel="inner steps",
                title=f"{experiment.name}: theta ({band})", by_step=True))

    stats = [arm_stats(r, metric) for r in results]
    levels, milestones = (milestone_rows(experiment, results, metric)
                          if experiment.milestones or experiment.level_arm else ([], []))
    cmd = command_line(experiment, seeds, num_steps, estimators, out_dir)
    write_json(out_dir / RESULTS_JSON, {
        "experiment": experiment.name, "task": experiment.task, "seeds": list(seeds),
        "num_steps": num_steps, "metric": metric, "command": cmd,
        "wall_time_s": round(wall_time_s, 3), "arms": stats,
        **({"milestone_levels": levels, "milestones": milestones} if milestones else {}),
    })
    files.append(out_dir / RESULTS_JSON)

    lines = [
        f"# {experiment.title}",
        "",
        f"{experiment.description[0].upper()}{experiment.description[1:]}.",
        "",
        *([f"Paper: {experiment.expected}", ""] if experiment.expected else []),
        f"Command: `{cmd}` ({wall_time_s:.1f} s in all). Seeds: {', '.join(map(str, seeds))}. "
        f"Final values are mean ± sample std over seeds; the metric is {experiment.metric_label}"
        " at the final theta.",
        "",
    ]
    table = [
        f"| estimator | settings | runs ok | final theta | final {metric} | other final "
        "metrics (mean) | inner steps | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        if s["skipped"]:
            table.append(f"| {s['label']} | skipped: {s['skipped']} | 0/0 | | | | | |")
            continue
        other = ", ".join(f"{k} {fmt_num(v)}" for k, v in s["other_final_metrics_mean"].items())
        ok = f"{s['completed']}/{len(s['seeds'])}"
        if s["errors"]:
            ok += " (" + "; ".join(e.split(";")[0] for e in s["errors"]) + ")"
        table.append(
            f"| {s['label']} | {s['settings']} | {ok} | "
            f"{_pm(s['final_theta_mean'], s['final_theta_std'])} | "
            f"{_pm(s['final_metric_mean'], s['final_metric_std'], 3)} | {other} | "
            f"{s['inner_steps_mean']:,.0f} | {s['wall_time_s_mean']:.1f} |")
    lines += table + [""] + _milestone_lines(experiment, levels, milestones)
    for f in files:
        if f.suffix == ".png":
            lines.append(f"![{f.stem}]({f.name})")
    lines.append("")
    (out_dir / RESULTS_MD).write_text("\n".join(lines))
    files.append(out_dir / RESULTS_MD)
    return files, "\n".join(table)
