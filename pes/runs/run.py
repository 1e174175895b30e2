"""One run of an estimator on a task, recorded in a run directory.

A run directory holds

* ``config.json``: the resolved RunConfig (``RunConfig.from_dict`` reads it back);
* ``metrics.jsonl``: one JSON object per outer step, written and flushed as the step ends:
  ``step``, ``inner_steps`` (so far, burn-in included), ``loss`` (the window's mean per-step
  loss; absent at step 0), ``meta_objective`` (the task's headline ``meta_loss``) and ``eval``
  (every metric of ``task.evaluate``) on evaluated steps, ``nonfinite`` (particles left out
  for a NaN/inf loss, policy 'drop'; only when > 0) and ``theta`` (when it has at most
  16 numbers). Step 0 is the evaluation of the initial theta. Non-finite numbers are written
  as null (the files are strict JSON). Nothing in it depends on timing: the same
  configuration on the same machine gives the same file, byte for byte, resumed or not;
* ``timing.jsonl``: ``{"step", "wall_time_s"}`` per metrics line (seconds of running since
  the run started, summed over its sessions);
* ``checkpoints/``: the last few checkpoints of the complete run state (:mod:`pes.runs.checkpoint`),
  written every ``checkpoint_every`` outer steps (or at the first call end after every
  CHECKPOINT_INTERVAL_S seconds when it is None: the training loop runs several outer steps per
  compiled call, and calls end at the multiples of checkpoint_every), after the last one, on
  SIGINT/SIGTERM (at the end of the call under way, about 0.1 s at most) and before a
  non-finite loss stops the run; each records how far metrics.jsonl had got;
* ``summary.json``: ``status`` ('completed', 'failed' or 'interrupted'), ``error``,
  ``final_theta``, ``final_meta_loss``, ``final_metrics``, ``inner_steps``, ``wall_time_s``,
  ``outer_steps``, ``checkpoint_step`` and more, written when the run ends for any reason;
* ``meta_objective.png`` (the task's metric against inner steps) and ``theta.png``;
* with trackers (``log=['tensorboard', 'wandb', 'mlflow']``, ``pes run --log ...``):
  ``tensorboard/``, ``wandb/`` and ``mlruns/`` (:mod:`pes.loggers`), which get the config,
  every metrics line and the final plots.

An existing non-empty directory is refused unless ``overwrite=True``, and even then only a
pes run directory (one with a config.json or metrics.jsonl) is cleared, and only of the
files a run writes.

:func:`resume_run` continues a run from its latest checkpoint: metrics.jsonl is cut back to
the line the checkpoint recorded and continued, and the theta trajectory is exactly the one an
uninterrupted run takes (the state, the key and the step fix everything after them).

In a distributed run (:mod:`pes.runs.distributed`) every process runs the same loop on
the same replicated theta; only process 0 writes the files above, all of them write each
checkpoint, and a signal or a due checkpoint in any process stops or checkpoints all of them
after the same outer step.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pes import loggers as trackers
from pes.runs import memory, plots
from pes.runs.checkpoint import (
    CheckpointDamaged,
    Checkpointer,
    CheckpointWriteError,
    abstract_state,
    on_mesh,
)
from pes.runs.config import RunConfig, Setup, build_setup, resumed_config
from pes.runs.distributed import barrier, is_primary, max_over_processes, multiprocess
from pes.runs.errors import ConfigError, RunFailed, RunInterrupted, RunWarning
from pes.runs.gym_task import is_gym_task
from pes.runs.lock import LOCK_FILE, RunLock, RunLocked
from pes.runs.lock import holder as lock_holder
from pes.runs.lock import refusal as lock_refusal
from pes.runs.registry import TaskEntry, export_files, get_task
from pes.training import NonFiniteGradientError, TrainState, train

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TIMING_FILE = "timing.jsonl"
SUMMARY_FILE = "summary.json"
METRIC_PLOT = "meta_objective.png"
THETA_PLOT = "theta.png"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"  # where resume moves checkpoints that failed their checks
# What a run writes (with what a task's export adds); --overwrite removes exactly these.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, TIMING_FILE, SUMMARY_FILE, METRIC_PLOT, THETA_PLOT,
             CHECKPOINT_DIR, DAMAGED_DIR, "tensorboard", "wandb", "mlruns") + export_files()
MAX_LOGGED_THETA = 16
MAX_PRINTED_THETA = 64  # a longer theta is printed as its first numbers and its size
KEEP_CHECKPOINTS = 2  # the default of keep_checkpoints (--keep-checkpoints)
# Without checkpoint_every, a run checkpoints after this many seconds since the last one.
CHECKPOINT_INTERVAL_S = 300.0
CHECKPOINT_FORMAT = 1


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
    """Appends one JSON object per line to metrics.jsonl, flushed line by line.

    ``lines``: lines in the file (those there before, in mode 'a', included).
    """

    def __init__(self, path: Path, mode: str = "w", lines: int = 0):
        self.path = Path(path)
        self._file = open(self.path, mode)
        self.lines = lines if mode == "a" else 0

    def write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(jsonable(obj), allow_nan=False) + "\n")
        self._file.flush()
        self.lines += 1

    def sync(self) -> int:
        """Flush to disk (fsync); returns the file's size in bytes."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class CountingWriter:
    """A MetricsWriter that writes nothing: it counts the lines and bytes the file would get
    (the processes of a distributed run other than process 0, which alone writes files, and
    which record the same numbers in their checkpoints)."""

    def __init__(self, lines: int = 0, size: int = 0):
        self.lines, self.size = lines, size

    def write(self, obj: dict[str, Any]) -> None:
        self.size += len((json.dumps(jsonable(obj), allow_nan=False) + "\n").encode())
        self.lines += 1

    def sync(self) -> int:
        return self.size

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ run folders


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()


def prepare_run_dir(path: Path | str, overwrite: bool = False) -> Path:
    """An empty (or new) directory for a run; never destroys anything not made by a run."""
    path = check_run_dir(path, overwrite)
    remove_entries(path, RUN_FILES)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_entries(path: Path, names: Sequence[str]) -> None:
    """Delete the files or folders ``path / name`` that exist, and nothing else in ``path``."""
    for name in names:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def check_run_dir(path: Path | str, overwrite: bool = False) -> Path:
    """The ConfigError :func:`prepare_run_dir` would raise, if any, without changing
    anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={str(path)!r} exists and is not a directory", field="out")
    # Process 0 alone reads the lock: the others would see its own lock, taken meanwhile.
    record = lock_holder(path) if path.is_dir() and is_primary() else None
    if record is not None and record.get("pid") != os.getpid():
        raise RunLocked(lock_refusal(path, record), record, field="out")
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()):
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
        status = {"completed": "",
                  "interrupted": f" INTERRUPTED after step {s['outer_steps']}:"}.get(
            s["status"], f" {s['status'].upper()} at step {s['outer_steps'] + 1}:")
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
    if isinstance(theta, list) and len(theta) > MAX_PRINTED_THETA:  # e.g. an LSTM's weights
        head = ", ".join(fmt_theta(t, digits) for t in theta[:3])
        return f"({head}, ... {len(theta)} numbers)"
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
    log: str | Sequence[str] | None = None,
) -> RunResult:
    """Run ``config`` to the end, recording it in its run directory (``config.out``).

    ``log``: experiment trackers ('tensorboard', 'wandb', 'mlflow'; a list or a comma-separated
    string) that also get the config, every metrics line and the plots, writing inside the
    run directory (:func:`pes.loggers.make_loggers`); None: those of an enclosing
    :func:`tracking` block, else none. Only process 0 logs.

    Settings are resolved and checked (ConfigError) before anything is written. Shows a tqdm
    progress bar with the current meta-objective when ``progress``. Checkpoints the run every
    ``checkpoint_every`` outer steps (or CHECKPOINT_INTERVAL_S seconds) and at the end. Raises
    RunFailed when a non-finite loss or gradient stops the run (its directory is complete up
    to there, with a checkpoint of the last good state), and RunInterrupted after SIGINT or
    SIGTERM (caught while the run goes on: it stops after the outer steps of the compiled
    call under way, checkpointed) or a KeyboardInterrupt; summary.json and the plots are
    written in every case.
    """
    log = check_log(log)
    setup = build_setup(config)
    cfg = setup.config
    entry = get_task(cfg.task)
    check_memory(setup)
    # In a distributed run every process checks (so all stop on a bad --out), then process 0
    # alone locks and prepares the directory while the others wait.
    run_dir = check_run_dir(cfg.out, overwrite)
    with _locked(run_dir, "out"):
        barrier("pes-run-dir-checked")
        if is_primary():
            run_dir = prepare_run_dir(cfg.out, overwrite)
            write_json(run_dir / CONFIG_FILE, cfg.to_dict())
        barrier("pes-run-dir-ready")
        return _Recorder(setup, entry, run_dir, progress, desc, leave, log=log).run()


def check_memory(setup: Setup) -> None:
    """A one-line ConfigError when the run's state cannot fit (:mod:`pes.runs.memory`)."""
    cfg = setup.config
    devices = int(getattr(getattr(setup.estimator, "mesh", None), "size", 1) or 1)
    field = "num_particles" if cfg.num_particles is not None else "estimator"
    memory.check(setup.estimator, setup.optimizer, setup.theta0, devices=devices, field=field)


@contextmanager
def _locked(run_dir: Path, field: str) -> Iterator[None]:
    """Hold the run directory's lock (:mod:`pes.runs.lock`; process 0 of a distributed run,
    the others learning whether it got it) for the life of the block."""
    lock = RunLock(run_dir, field=field)
    error = None
    if is_primary():
        try:
            lock.acquire()
        except ConfigError as e:
            error = e
    if multiprocess() and max_over_processes([int(error is not None)])[0]:
        raise error or ConfigError(f"{run_dir} is in use by another pes run", field=field)
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


_TRACKING: ContextVar[tuple[str, ...]] = ContextVar("pes_tracking", default=())


@contextmanager
def tracking(log: str | Sequence[str] | None) -> Iterator[None]:
    """Inside this block, every run that is not given ``log`` logs to these trackers (how
    ``pes compare --log`` reaches the runs of a comparison)."""
    token = _TRACKING.set(tuple(check_log(log)))
    try:
        yield
    finally:
        _TRACKING.reset(token)


def check_log(log: str | Sequence[str] | None) -> list[str]:
    """The tracker names of ``log`` (None: the enclosing :func:`tracking` block's), each
    importable; a ConfigError naming the unknown name or the extra to install."""
    if log is None:
        return list(_TRACKING.get())
    try:
        names = trackers.parse_logger_names(log)
        for name in names:
            trackers.require(name)
    except (ValueError, trackers.MissingExtraError) as e:
        raise ConfigError(str(e), field="log") from None
    return names


@dataclass
class _Resumed:
    """Where a resumed run starts: its checkpointed state and the metrics lines kept."""

    state: TrainState
    records: list[dict[str, Any]]
    elapsed_s: float
    checkpointer: Checkpointer
    metrics_bytes: int = 0


def resume_run(
    run_dir: Path | str,
    overrides: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    desc: str | None = None,
    leave: bool = True,
    log: str | Sequence[str] | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, to ``num_steps``.

    The configuration is the run's config.json; ``overrides`` (RunConfig fields, None meaning
    not given) may change num_steps (e.g. to extend a finished run), checkpoint_every and
    nonfinite, and must otherwise agree with it (ConfigError). metrics.jsonl and
    timing.jsonl are cut back to the lines the checkpoint recorded and continued, so every
    step appears once; the theta trajectory is exactly that of an uninterrupted run.
    ``log`` as for :func:`execute_run` (trackers get the steps after the checkpoint). Raises
    like :func:`execute_run`.
    """
    log = check_log(log)
    run_dir = Path(run_dir)
    where = f"--resume {run_dir}"
    if not run_dir.exists():
        raise ConfigError(f"{where}: the directory does not exist", field="resume")
    if not run_dir.is_dir():
        raise ConfigError(f"{where}: not a directory", field="resume")
    # In use: said before anything else (by process 0, as above).
    if is_primary() and (record := lock_holder(run_dir)) is not None:
        raise RunLocked(lock_refusal(run_dir, record), record, field="resume")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{where}: not a pes run directory (it has no {CONFIG_FILE})",
                          field="resume")
    with _locked(run_dir, "resume"):
        return _resume_locked(run_dir, overrides, progress, desc, leave, log)


class CheckpointFallbackWarning(RunWarning):
    """Resume skipped a damaged checkpoint and continues from an older, intact one."""


def _resume_locked(run_dir: Path, overrides: dict[str, Any] | None, progress: bool,
                   desc: str | None, leave: bool, log: list[str]) -> RunResult:
    where = f"--resume {run_dir}"
    overrides = dict(overrides or {})
    out = overrides.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ConfigError(f"out={str(out)!r} contradicts {where}: a resumed run stays in its "
                          "directory", field="out")
    stored = read_config(run_dir)
    cfg = resumed_config(stored, str(run_dir / CONFIG_FILE), overrides)
    if Path(cfg.out).resolve() != run_dir.resolve():  # the directory moved, or another cwd
        cfg = dataclasses.replace(cfg, out=str(run_dir))
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{where}: the run has no checkpoint ({ckpt_dir} does not exist); "
                          "start it again with --overwrite", field="resume")
    setup = build_setup(cfg)
    check_memory(setup)
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints or KEEP_CHECKPOINTS)
    try:
        state, key_data, meta = _restore_intact(checkpointer, setup, where)
        step = state.step
        expected = np.asarray(jax.random.PRNGKey(cfg.seed))
        if meta.get("seed") != cfg.seed or not np.array_equal(np.asarray(key_data), expected):
            raise ConfigError(f"{where}: the checkpoint of step {step} was written with seed "
                              f"{meta.get('seed')}, but {CONFIG_FILE} says seed={cfg.seed}",
                              field="seed")
        primary = is_primary()
        records = _cut_log(run_dir / METRICS_FILE, meta, step, truncate=primary)
        if primary:
            _cut_timing(run_dir / TIMING_FILE, step)
    except BaseException:
        checkpointer.close()
        raise
    if cfg != stored and primary:
        write_json(run_dir / CONFIG_FILE, cfg.to_dict())
    resumed = _Resumed(state, records, float(meta.get("elapsed_s", 0.0)), checkpointer,
                       int(meta["metrics_bytes"]))
    return _Recorder(setup, get_task(cfg.task), run_dir, progress, desc, leave,
                     resumed, log=log).run()


def _restore_intact(checkpointer: Checkpointer, setup: Setup, where: str
                    ) -> tuple[TrainState, Any, dict[str, Any]]:
    """The newest intact checkpoint; damaged newer ones are moved to DAMAGED_DIR with one
    warning line saying which and why. None intact, or one of another run's shape: a
    ConfigError."""
    cfg, ckpt_dir = setup.config, checkpointer.directory
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"{where}: the run has no complete checkpoint in {ckpt_dir}; "
                          "start it again with --overwrite", field="resume")
    if cfg.num_steps < step:
        raise ConfigError(f"num_steps={cfg.num_steps} is less than the {step} outer steps "
                          f"the checkpoint in {ckpt_dir} has already taken", field="num_steps")
    # Restored onto this run's devices, whichever devices and processes wrote it.
    like = on_mesh(abstract_state(setup.estimator, setup.optimizer, setup.theta0),
                   getattr(setup.estimator, "mesh", None))
    try:
        state, key_data, meta, skipped = checkpointer.restore_latest(like)
    except CheckpointDamaged as e:
        raise ConfigError(f"{where}: {e}; start it again with --overwrite",
                          field="resume") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}", field="resume") from None
    if skipped:
        moved = []
        if is_primary():
            moved = [checkpointer.quarantine(s, ckpt_dir.parent / DAMAGED_DIR) for s, _ in skipped]
        barrier("pes-resume-quarantined")
        steps = ", ".join(str(s) for s, _ in skipped)
        why = skipped[0][1].replace(f" in {ckpt_dir}", "")
        kept = f" (moved to {moved[0].parent})" if moved else ""
        warnings.warn(f"{where}: resuming from step {state.step}, the newest intact checkpoint; "
                      f"skipped step {steps}{kept}: {why}", CheckpointFallbackWarning,
                      stacklevel=3)
    return state, key_data, meta


def _cut_log(path: Path, meta: dict[str, Any], step: int, truncate: bool = True
             ) -> list[dict[str, Any]]:
    """Cut metrics.jsonl back to the ``metrics_lines`` lines (``metrics_bytes`` bytes) it had
    when the checkpoint of ``step`` was written (only read them unless ``truncate``);
    returns their records."""
    lines, size = int(meta["metrics_lines"]), int(meta["metrics_bytes"])
    data = path.read_bytes() if path.is_file() else b""
    mismatch = (f"{path} does not hold what it held when the checkpoint of step {step} was "
                f"written ({lines} lines, {size} bytes)")
    if len(data) < size:
        raise ConfigError(f"{mismatch}: it is shorter, so continuing it would leave a gap",
                          field=str(path))
    head = data[:size]
    try:
        texts = head.decode().split("\n")
        records = [json.loads(t) for t in texts[:-1]]
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{mismatch}: it was edited", field=str(path)) from None
    if texts[-1] != "" or len(records) != lines or (records and records[-1].get("step") != step):
        raise ConfigError(f"{mismatch}: it was edited", field=str(path))
    if len(data) > size and truncate:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    return records


def _cut_timing(path: Path, step: int) -> None:
    """Keep timing.jsonl's lines up to ``step`` (the rest came after the checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().split("\n"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(obj, dict) or not isinstance(obj.get("step"), int) or \
                obj["step"] > step:
            break
        kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def _stop_on_signals(recorder: _Recorder) -> Iterator[None]:
    """While the run goes on, SIGINT and SIGTERM ask it to stop after the current outer step
    (the last of the compiled call under way; checkpointed); a second one stops it at once
    (KeyboardInterrupt). Only in the main thread, where Python delivers signals; the previous
    handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if recorder.signal is not None:
            recorder.forced = True
            raise KeyboardInterrupt
        recorder.signal = signum
        recorder.notice(f"{signal.Signals(signum).name}: stopping after this outer step "
                        "with a checkpoint (send it again to stop at once)")

    previous = {}
    try:
        for sig in _SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Recorder:
    """Drives pes.train and writes the run directory as it goes."""

    def __init__(self, setup: Setup, entry: TaskEntry, run_dir: Path, progress: bool,
                 desc: str | None, leave: bool, resumed: _Resumed | None = None,
                 log: Sequence[str] = ()):
        from tqdm import tqdm

        self.setup, self.entry, self.run_dir = setup, entry, run_dir
        cfg = setup.config
        self.resumed = resumed
        self.key = jax.random.PRNGKey(cfg.seed)
        self.evaluator = task_evaluator(setup.task)
        self.log_theta = int(np.size(setup.theta0)) <= MAX_LOGGED_THETA
        self.env_task = is_gym_task(cfg.task)
        self.records: list[dict[str, Any]] = list(resumed.records) if resumed else []
        self.theta = resumed.state.theta if resumed else setup.theta0
        self.outer_steps = resumed.state.step if resumed else 0
        self.inner_steps = resumed.state.inner_steps if resumed else 0
        self.pending_eval: dict[str, float] | None = None
        self.nonfinite_total = sum(int(r.get("nonfinite") or 0) for r in self.records)
        # The TrainState of the step being recorded, and of the last step fully recorded.
        self.pending_state: TrainState | None = None
        self.last_state: TrainState | None = resumed.state if resumed else None
        self.checkpoint_step: int | None = resumed.state.step if resumed else None
        self.signal: int | None = None
        # The signal every process agreed to stop on (a distributed run's processes must stop
        # after the same outer step: each checkpoint is written by all of them together).
        self.stop_signal: int | None = None
        self.forced = False
        self.primary, self.multiprocess = is_primary(), multiprocess()
        self.bar = tqdm(total=cfg.num_steps, initial=self.outer_steps,
                        desc=desc or f"{cfg.task} {cfg.estimator}",
                        # None: only on a terminal (no carriage-return noise in logs).
                        disable=None if progress and self.primary else True, leave=leave,
                        dynamic_ncols=True, unit="step")
        self.start = time.perf_counter() - (resumed.elapsed_s if resumed else 0.0)
        self.checkpoint_time = time.perf_counter()
        mode = "a" if resumed else "w"
        if self.primary:
            self.metrics = MetricsWriter(run_dir / METRICS_FILE, mode, len(self.records))
            self.timing = MetricsWriter(run_dir / TIMING_FILE, mode)
        else:
            self.metrics = CountingWriter(len(self.records),
                                          resumed.metrics_bytes if resumed else 0)
            self.timing = CountingWriter()
        self.checkpointer = resumed.checkpointer if resumed else Checkpointer(
            run_dir / CHECKPOINT_DIR, max_to_keep=cfg.keep_checkpoints or KEEP_CHECKPOINTS)
        self.trackers = _Trackers(log if self.primary else (), run_dir,
                                  f"{cfg.task} {cfg.estimator} seed {cfg.seed}")
        self.trackers.call("log_config", cfg.to_dict())

    def notice(self, text: str) -> None:
        if self.primary:
            self.bar.write(text, file=sys.stderr)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _write(self, step: int, inner_steps: int, loss: float | None, theta: Any,
               evals: dict[str, float] | None, nonfinite: int = 0) -> None:
        obj: dict[str, Any] = {"step": step, "inner_steps": inner_steps}
        if self.env_task:  # an environment's steps are its inner steps (training only)
            obj["env_steps"] = inner_steps
        if loss is not None:
            obj["loss"] = loss
        if nonfinite:
            obj["nonfinite"] = nonfinite
            self.nonfinite_total += nonfinite
        if evals is not None:
            obj["meta_objective"] = evals["meta_loss"]
            if self.env_task:
                obj["return"] = evals["return"]
            obj["eval"] = evals
        if self.log_theta:
            obj["theta"] = _theta_value(theta)
        obj = jsonable(obj)
        self.metrics.write(obj)
        self.trackers.call("log_metrics", step, trackers.flat_metrics(obj), inner_steps)
        self.timing.write({"step": step, "wall_time_s": round(self.elapsed(), 4)})
        self.records.append(obj)

    def evaluate(self, theta: Any, key: jax.Array) -> float:
        evals = {k: float(v) for k, v in self.evaluator(theta, key).items()}
        self.pending_eval = evals  # written by the callback of the same record
        return evals["meta_loss"]

    def _show(self, evals: dict[str, float]) -> None:
        metric = self.entry.metric
        text = f"{metric}={fmt_num(evals.get(metric))}"
        if self.log_theta:
            text += f" theta={fmt_theta(_theta_value(self.theta), 3)}"
        self.bar.set_postfix_str(text, refresh=False)

    def on_state(self, state: TrainState) -> None:
        self.pending_state = state

    def callback(self, record: Any, theta: Any) -> bool:
        evals = self.pending_eval if record.meta_objective is not None else None
        self.pending_eval = None
        self.theta = theta
        self.outer_steps, self.inner_steps = record.step, record.inner_steps
        self._write(record.step, record.inner_steps, record.loss, theta, evals,
                    int(getattr(record, "nonfinite", 0) or 0))
        if evals is not None:
            self._show(evals)
        if record.step == 0:  # the evaluation before training
            return False
        self.bar.update(1)
        state = self.pending_state
        stop = self.signal
        budget = self.setup.config.env_steps  # gym tasks: a budget in environment steps
        spent = budget is not None and record.inner_steps >= budget
        if state is not None and state.step == record.step:
            self.last_state = state
            due = self._checkpoint_due(record.step) or spent
            if self.multiprocess:  # one decision for all: a signal or a clock anywhere
                agreed, due = max_over_processes([stop or 0, int(due)])
                stop = agreed or None
            if stop is not None or due:
                self.checkpoint(state)
        self.stop_signal = stop
        return stop is not None or spent

    def _checkpoint_due(self, step: int) -> bool:
        cfg = self.setup.config
        if step == cfg.num_steps:
            return True
        if cfg.checkpoint_every is not None:
            # The first state seen at or after each multiple: with steps_per_call > 1, train
            # hands over states at chunk ends only, which need not fall on the multiples.
            every, last = cfg.checkpoint_every, self.checkpoint_step or 0
            return step // every > last // every
        return time.perf_counter() - self.checkpoint_time >= CHECKPOINT_INTERVAL_S

    def checkpoint(self, state: TrainState) -> None:
        """Checkpoint ``state``, whose metrics line is the last one written."""
        if self.checkpoint_step is not None and state.step <= self.checkpoint_step:
            return
        if not self.records or self.records[-1]["step"] != state.step:
            raise RuntimeError(f"the last metrics line is not that of outer step {state.step}")
        size = self.metrics.sync()
        self.checkpointer.save(state, self.key, {
            "format": CHECKPOINT_FORMAT, "seed": self.setup.config.seed,
            "metrics_lines": self.metrics.lines, "metrics_bytes": size,
            "elapsed_s": round(self.elapsed(), 4)})
        self.checkpoint_step = state.step
        self.checkpoint_time = time.perf_counter()

    def _try_checkpoint(self, state: TrainState | None) -> str:
        """Checkpoint ``state`` after the run stopped; a few words on what happened."""
        if state is None:
            return "no checkpoint was written (the run stopped before its first outer step)"
        try:
            self.checkpoint(state)
            return (f"checkpointed at outer step {state.step}; continue with: pes run "
                    f"--resume {self.run_dir}")
        except Exception as e:  # the run's record matters more than this checkpoint
            return f"its checkpoint could not be written ({type(e).__name__}: {e})"

    def steps_per_call(self) -> int | str:
        """The config's steps_per_call, else 'auto': calls of about AUTO_CALL_S seconds, so
        that a signal stops the run within one (calls end at checkpoint_every's multiples and
        at evaluations, so those come at their steps). One step per call where a call may not
        run past the step a run stops at: an env_steps budget, and a distributed run (whose
        processes must all run the same steps per call, which timing would not give)."""
        cfg = self.setup.config
        if cfg.steps_per_call is not None:
            return cfg.steps_per_call
        return 1 if cfg.env_steps is not None or self.multiprocess else "auto"

    def run(self) -> RunResult:
        cfg = self.setup.config
        status, error, signum = "completed", None, None
        try:
            with _stop_on_signals(self):
                try:
                    result = train(
                        self.setup.estimator, self.setup.theta0, self.setup.optimizer,
                        num_steps=cfg.num_steps, key=self.key, eval_every=cfg.eval_every,
                        callback=self.callback, evaluate_fn=self.evaluate,
                        nonfinite=cfg.nonfinite, on_state=self.on_state,
                        resume=self.resumed.state if self.resumed else None,
                        steps_per_call=self.steps_per_call(),
                        state_every=cfg.checkpoint_every)
                    self.theta = result.theta
                    if self.stop_signal is not None and self.outer_steps < cfg.num_steps:
                        signum = self.stop_signal
                        status = "interrupted"
                        error = (f"interrupted by {signal.Signals(signum).name} after outer "
                                 f"step {self.outer_steps}; "
                                 + self._try_checkpoint(self.last_state))
                except NonFiniteGradientError as e:
                    status, self.theta = "failed", e.theta
                    good = e.state if e.state is not None else self.last_state
                    error = f"{e}; " + self._try_checkpoint(good).replace(
                        "continue with: pes run",
                        "continue (e.g. with --nonfinite drop or another setting) with: pes "
                        "run")
        except KeyboardInterrupt:
            status, signum = "interrupted", signal.SIGINT
            error = "interrupted (KeyboardInterrupt)"
            if not self.forced:
                error += "; " + self._try_checkpoint(self.last_state)
        except CheckpointWriteError as e:  # e.g. a full disk: the previous one is intact
            status, error = "failed", (f"{e}; free space, then continue with: pes run "
                                       f"--resume {self.run_dir}")
        except OSError as e:
            if e.errno not in DISK_FULL:
                status, error = "failed", f"{type(e).__name__}: {e}"
                raise
            where = f": {e.filename}" if e.filename else ""
            status, error = "failed", (f"the disk is full ({e.strerror}{where}); free space, "
                                       f"then continue with: pes run --resume {self.run_dir}")
        except BaseException as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            if not memory.is_out_of_memory(e):
                raise
            error = memory.out_of_memory_message(e)
        finally:
            self.bar.close()
            try:
                self.checkpointer.close()
            except Exception as e:  # noqa: BLE001 - the run's own error comes first
                if status == "completed":
                    status, error = "failed", str(e)
                    if isinstance(e, CheckpointWriteError):
                        error += (f"; free space, then continue with: pes run --resume "
                                  f"{self.run_dir}")
            for writer in (self.metrics, self.timing):
                try:
                    writer.close()
                except OSError as e:
                    if status == "completed":
                        status, error = "failed", f"{writer.path}: {e}"
            run_result = self._finish(status, error)
            for plot in (METRIC_PLOT, THETA_PLOT):
                if (self.run_dir / plot).is_file():
                    self.trackers.call("log_image", f"plots/{Path(plot).stem}",
                                        self.run_dir / plot)
            self.trackers.close()
        if status == "failed":
            raise RunFailed(f"{cfg.task} {cfg.estimator} seed {cfg.seed}: {error}", run_result)
        if status == "interrupted":
            raise RunInterrupted(error, run_result, signum)
        return run_result

    def _final_metrics(self) -> dict[str, float] | None:
        last = self.records[-1] if self.records else None
        if last is not None and last["step"] == self.outer_steps and "eval" in last:
            return last["eval"]
        if self.forced:
            return None
        try:  # the run stopped between evaluations: evaluate where it stopped
            key = jax.random.fold_in(jax.random.PRNGKey(self.setup.config.seed), 2**31 - 1)
            return jsonable({k: float(v) for k, v in self.evaluator(self.theta, key).items()})
        except Exception:
            return None

    def _finish(self, status: str, error: str | None) -> RunResult:
        cfg = self.setup.config
        final = self._final_metrics()
        if self.entry.export is not None and getattr(self, "primary", True):
            try:  # files the task writes from the final theta (the learned optimizer's)
                self.entry.export(self.setup.task, self.theta, self.run_dir)
            except Exception as e:  # never cost the run its summary
                warnings.warn(f"could not export from {self.run_dir}: {e}", stacklevel=2)
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
            "wall_time_s": round(self.elapsed(), 3),
            "checkpoint_step": self.checkpoint_step,
            "resumed_from_step": self.resumed.state.step if self.resumed else None,
            "initial_theta": _theta_value(self.setup.theta0),
            "final_theta": _theta_value(self.theta),
            "initial_meta_loss": None if initial is None else initial.get("meta_loss"),
            "final_meta_loss": None if final is None else final.get("meta_loss"),
            "initial_metrics": initial,
            "final_metrics": final,
            "estimator_repr": repr(self.setup.estimator),
            **({"env_steps": self.inner_steps,
                "initial_return": None if initial is None else initial.get("return"),
                "return": None if final is None else final.get("return"),
                "return_std": None if final is None else final.get("return_std")}
               if self.env_task else {}),
            "versions": {"pes": _pes_version(), "jax": jax.__version__},
            "backend": jax.default_backend(),
            "devices": int(getattr(getattr(self.setup.estimator, "mesh", None), "size", 1)),
            "processes": jax.process_count(),
        }
        result = RunResult(cfg, self.run_dir, jsonable(summary), self.records)
        if not self.primary:  # process 0 writes the run's files
            return result
        try:
            write_json(self.run_dir / SUMMARY_FILE, summary)
            plot_run(self.run_dir, self.records, self.entry, cfg)
        except OSError as e:
            if e.errno not in DISK_FULL or status == "completed":
                raise
            # A full disk already stopped the run; its error says so, and says enough.
        except Exception as e:  # a plot must never cost the run its summary
            warnings.warn(f"could not plot {self.run_dir}: {e}", stacklevel=2)
        return result


class _Trackers:
    """The run's experiment trackers; one that fails is reported once and left out (a
    tracker must never cost the run)."""

    def __init__(self, names: Sequence[str], run_dir: Path, run_name: str):
        self.loggers = []
        for name in names:
            try:
                self.loggers += trackers.make_loggers([name], run_dir, run_name)
            except Exception as e:
                warnings.warn(f"--log {name}: could not start ({type(e).__name__}: {e}); the "
                              "run goes on without it", stacklevel=2)

    def call(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as e:
                warnings.warn(f"{type(logger).__name__}.{method} failed ({type(e).__name__}: "
                              f"{e}); it logs nothing more for this run", stacklevel=2)
                self.loggers.remove(logger)

    def close(self) -> None:
        self.call("close")
        self.loggers = []


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
