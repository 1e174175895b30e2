"""One run of an estimator on a task, recorded in a run directory.

A run directory holds

* ``config.json``: the resolved RunConfig (``RunConfig.from_dict`` reads it back);
* ``metrics.jsonl``: one JSON object per outer step, written and flushed as the step ends:
  ``step``, ``inner_steps`` (so far, burn-in included), ``loss`` (the window's mean per-step
  loss; absent at step 0), ``meta_objective`` (the task's headline ``meta_loss``) and ``eval``
  (every metric of ``task.evaluate``) on evaluated steps, ``nonfinite`` (particles left out
  for a NaN/inf loss, policy 'drop'; only when > 0), ``theta`` (when it has at most
  16 numbers) and ``wall_time_s`` (seconds since the run started). Step 0 is the evaluation of
  the initial theta. Non-finite numbers are written as null (the files are strict JSON);
* ``summary.json``: ``status`` ('completed', 'failed' or 'interrupted'), ``error``,
  ``final_theta``, ``final_meta_loss``, ``final_metrics``, ``inner_steps``, ``wall_time_s``,
  ``outer_steps`` and more, written when the run ends for any reason;
* ``meta_objective.png`` (the task's metric against inner steps) and ``theta.png``.

An existing non-empty directory is refused unless ``overwrite=True``, and even then only a
pes run directory (one with a config.json or metrics.jsonl) is cleared, and only of the
files a run writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pes.experiments import plots
from pes.experiments.config import RunConfig, Setup, build_setup
from pes.experiments.errors import ConfigError, RunFailed
from pes.experiments.registry import TaskEntry, get_task
from pes.train import NonFiniteGradientError, train

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
METRIC_PLOT = "meta_objective.png"
THETA_PLOT = "theta.png"
# What a run writes; --overwrite removes exactly these (checkpoints/ is for resumable runs).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, METRIC_PLOT, THETA_PLOT, "checkpoints")
MAX_LOGGED_THETA = 16


# ------------------------------------------------------------------------------- JSON files


def jsonable(value: Any) -> Any:
    """Plain JSON data from arrays, numpy scalars and floats; non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(jsonable(data), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", field=str(path)) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}", field=str(path)) from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The objects of a run directory's metrics.jsonl; a truncated last line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a pes run directory",
                          field=str(path))
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number >= len(lines) - 1:  # the last line, cut short by a crash
                break
            raise ConfigError(f"{path}:{number} is not valid JSON", field=str(path)) from None
    return records


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    return RunConfig.from_dict(read_json(path), source=str(path))


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, flushed line by line."""

    def __init__(self, path: Path, mode: str = "w"):
        self.path = Path(path)
        self._file = open(self.path, mode)

    def write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(jsonable(obj), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


# ------------------------------------------------------------------------------ run folders


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()


def prepare_run_dir(path: Path | str, overwrite: bool = False) -> Path:
    """An empty (or new) directory for a run; never destroys anything not made by a run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={str(path)!r} exists and is not a directory", field="out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"out={str(path)!r} already exists and is not empty; pass --overwrite "
                "(overwrite=True) to replace the run in it, or choose another --out",
                field="out")
        if not is_run_dir(path):
            raise ConfigError(
                f"out={str(path)!r} is not empty and is not a pes run directory (no "
                f"{CONFIG_FILE}); refusing to delete anything in it, even with --overwrite",
                field="out")
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def iter_run_dirs(path: Path | str) -> Iterator[Path]:
    """``path`` if it is a run directory, else every run directory below it (sorted)."""
    path = Path(path)
    if (path / METRICS_FILE).is_file():
        yield path
        return
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            yield from iter_run_dirs(sub)


# ----------------------------------------------------------------------------------- a run


@dataclass
class RunResult:
    """What a run left: its resolved config, directory, summary and metrics lines."""

    config: RunConfig
    run_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "completed"

    def summary_line(self) -> str:
        s = self.summary
        head = f"{s['task']} {s['estimator']} seed {s['seed']}"
        status = ("" if s["status"] == "completed" else f" {s['status'].upper()} at step "
                  f"{s['outer_steps'] + 1}:")
        metric = get_task(s["task"]).metric
        first = (s.get("initial_metrics") or {}).get(metric)
        last = (s.get("final_metrics") or {}).get(metric)
        return (f"{head}:{status} {s['outer_steps']} outer steps, {s['inner_steps']:,} inner "
                f"steps in {s['wall_time_s']:.1f} s; {metric} {fmt_num(first)} -> "
                f"{fmt_num(last)}; theta "
                f"{fmt_theta(s['initial_theta'])} -> {fmt_theta(s['final_theta'])}; "
                f"wrote {self.run_dir}")


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "nan"
    return f"{x:.{digits}g}"


def fmt_theta(theta: Any, digits: int = 4) -> str:
    if isinstance(theta, list):
        return "(" + ", ".join(fmt_theta(t, digits) for t in theta) + ")"
    return fmt_num(theta, digits)


_EVALUATORS: dict[Any, Callable] = {}


def task_evaluator(task: Any) -> Callable:
    """``jit(task.evaluate)``, one per task object (reused across runs)."""
    fn = _EVALUATORS.get(task)
    if fn is None:
        fn = _EVALUATORS[task] = jax.jit(task.evaluate)
    return fn


def _theta_value(theta: Any) -> Any:
    return jsonable(np.asarray(theta, dtype=np.float64))


def execute_run(
    config: RunConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    desc: str | None = None,
    leave: bool = True,
) -> RunResult:
    """Run ``config`` to the end, recording it in its run directory (``config.out``).

    Settings are resolved and checked (ConfigError) before anything is written. Shows a tqdm
    progress bar with the current meta-objective when ``progress``. Raises RunFailed when a
    non-finite gradient stops the run (its directory is complete up to there); a
    KeyboardInterrupt still writes summary.json ('interrupted') and the plots, then propagates.
    """
    setup = build_setup(config)
    cfg = setup.config
    entry = get_task(cfg.task)
    run_dir = prepare_run_dir(cfg.out, overwrite)
    write_json(run_dir / CONFIG_FILE, cfg.to_dict())
    return _Recorder(setup, entry, run_dir, progress, desc, leave).run()


class _Recorder:
    """Drives pes.train and writes the run directory as it goes."""

    def __init__(self, setup: Setup, entry: TaskEntry, run_dir: Path, progress: bool,
                 desc: str | None, leave: bool):
        from tqdm import tqdm

        self.setup, self.entry, self.run_dir = setup, entry, run_dir
        cfg = setup.config
        self.evaluator = task_evaluator(setup.task)
        self.log_theta = int(np.size(setup.theta0)) <= MAX_LOGGED_THETA
        self.records: list[dict[str, Any]] = []
        self.theta = setup.theta0
        self.outer_steps = 0
        self.inner_steps = 0
        self.pending_eval: dict[str, float] | None = None
        self.evaluations = 0
        self.nonfinite_total = 0
        self.bar = tqdm(total=cfg.num_steps, desc=desc or f"{cfg.task} {cfg.estimator}",
                        # None: only on a terminal (no carriage-return noise in logs).
                        disable=None if progress else True, leave=leave, dynamic_ncols=True,
                        unit="step")
        self.start = time.perf_counter()
        self.metrics = MetricsWriter(run_dir / METRICS_FILE)

    def _write(self, step: int, inner_steps: int, loss: float | None, theta: Any,
               evals: dict[str, float] | None, nonfinite: int = 0) -> None:
        obj: dict[str, Any] = {"step": step, "inner_steps": inner_steps}
        if loss is not None:
            obj["loss"] = loss
        if nonfinite:
            obj["nonfinite"] = nonfinite
            self.nonfinite_total += nonfinite
        if evals is not None:
            obj["meta_objective"] = evals["meta_loss"]
            obj["eval"] = evals
        if self.log_theta:
            obj["theta"] = _theta_value(theta)
        obj["wall_time_s"] = round(time.perf_counter() - self.start, 4)
        obj = jsonable(obj)
        self.metrics.write(obj)
        self.records.append(obj)

    def evaluate(self, theta: Any, key: jax.Array) -> float:
        evals = {k: float(v) for k, v in self.evaluator(theta, key).items()}
        if self.evaluations == 0 and self.outer_steps == 0:
            self._write(0, 0, None, theta, evals)
            self._show(evals)
        self.evaluations += 1
        self.pending_eval = evals
        return evals["meta_loss"]

    def _show(self, evals: dict[str, float]) -> None:
        metric = self.entry.metric
        text = f"{metric}={fmt_num(evals.get(metric))}"
        if self.log_theta:
            text += f" theta={fmt_theta(_theta_value(self.theta), 3)}"
        self.bar.set_postfix_str(text, refresh=False)

    def callback(self, record: Any, theta: Any) -> None:
        evals = self.pending_eval if record.meta_objective is not None else None
        self.pending_eval = None
        self.theta = theta
        self.outer_steps, self.inner_steps = record.step, record.inner_steps
        self._write(record.step, record.inner_steps, record.loss, theta, evals,
                    int(getattr(record, "nonfinite", 0) or 0))
        if evals is not None:
            self._show(evals)
        self.bar.update(1)

    def run(self) -> RunResult:
        cfg = self.setup.config
        status, error = "completed", None
        try:
            result = train(self.setup.estimator, self.setup.theta0, self.setup.optimizer,
                           num_steps=cfg.num_steps, key=jax.random.PRNGKey(cfg.seed),
                           eval_every=cfg.eval_every, callback=self.callback,
                           evaluate_fn=self.evaluate, nonfinite=cfg.nonfinite)
            self.theta = result.theta
        except NonFiniteGradientError as e:
            status, error, self.theta = "failed", str(e), e.theta
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted (KeyboardInterrupt)"
            raise
        except BaseException as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            self.bar.close()
            self.metrics.close()
            run_result = self._finish(status, error)
        if status == "failed":
            raise RunFailed(f"{cfg.task} {cfg.estimator} seed {cfg.seed}: {error}", run_result)
        return run_result

    def _final_metrics(self) -> dict[str, float] | None:
        last = self.records[-1] if self.records else None
        if last is not None and last["step"] == self.outer_steps and "eval" in last:
            return last["eval"]
        try:  # the run stopped between evaluations: evaluate where it stopped
            key = jax.random.fold_in(jax.random.PRNGKey(self.setup.config.seed), 2**31 - 1)
            return jsonable({k: float(v) for k, v in self.evaluator(self.theta, key).items()})
        except Exception:
            return None

    def _finish(self, status: str, error: str | None) -> RunResult:
        cfg = self.setup.config
        final = self._final_metrics()
        initial = self.records[0].get("eval") if self.records and self.records[0]["step"] == 0 \
            else None
        summary = {
            "status": status,
            "error": error,
            "task": cfg.task,
            "estimator": cfg.estimator,
            "seed": cfg.seed,
            "settings": cfg.settings_text(),
            "num_steps": cfg.num_steps,
            "outer_steps": self.outer_steps,
            "inner_steps": self.inner_steps,
            "nonfinite_dropped": self.nonfinite_total,
            "wall_time_s": round(time.perf_counter() - self.start, 3),
            "initial_theta": _theta_value(self.setup.theta0),
            "final_theta": _theta_value(self.theta),
            "initial_meta_loss": None if initial is None else initial.get("meta_loss"),
            "final_meta_loss": None if final is None else final.get("meta_loss"),
            "initial_metrics": initial,
            "final_metrics": final,
            "estimator_repr": repr(self.setup.estimator),
            "versions": {"pes": _pes_version(), "jax": jax.__version__},
            "backend": jax.default_backend(),
        }
        write_json(self.run_dir / SUMMARY_FILE, summary)
        result = RunResult(cfg, self.run_dir, jsonable(summary), self.records)
        try:
            plot_run(self.run_dir, self.records, self.entry, cfg)
        except Exception as e:  # a plot must never cost the run its summary
            import warnings

            warnings.warn(f"could not plot {self.run_dir}: {e}", stacklevel=2)
        return result


def _pes_version() -> str:
    import pes

    return getattr(pes, "__version__", "unknown")


def plot_run(run_dir: Path, records: list[dict[str, Any]], entry: TaskEntry,
             config: RunConfig) -> None:
    """meta_objective.png (the task's plot metric against inner steps) and theta.png."""
    evaluated = [r for r in records if "eval" in r]
    title = f"{config.task}: {config.estimator}, seed {config.seed}"
    if evaluated:
        x = np.array([r["inner_steps"] for r in evaluated], float)
        y = np.array([_nan(r["eval"].get(entry.metric)) for r in evaluated], float)
        plots.plot_curves(run_dir / METRIC_PLOT, [plots.Curve(config.estimator, x, y)],
                          xlabel="inner steps", ylabel=entry.metric_label, log_y=entry.log_y,
                          title=title)
    with_theta = [r for r in records if "theta" in r]
    if with_theta and len(entry.theta_names) <= 8:
        x = np.array([r["inner_steps"] for r in with_theta], float)
        theta = np.array([np.atleast_1d(np.asarray(r["theta"], float)) for r in with_theta])
        plots.plot_theta(run_dir / THETA_PLOT, [plots.Curve(config.estimator, x, theta)],
                         theta_names=entry.theta_names, reference=entry.reference(),
                         xlabel="inner steps", title=title)


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)
