"""Experiment trackers: the metrics of a run sent to TensorBoard, Weights & Biases or MLflow.

A logger is any object with the four methods of :class:`Logger`; ``pes.train(...,
loggers=[...])`` calls ``log_metrics`` after every outer step (step 0, the evaluation before
training, included), and ``pes run ... --log tensorboard,wandb,mlflow`` also sends the run's
config and its final plots. Three implementations ship, each needing an optional extra:

* :class:`TensorBoardLogger` (``pip install 'pes[tensorboard]'``: tensorboardX, no
  TensorFlow) writes event files;
* :class:`WandbLogger` (``pes[wandb]``) logs to Weights & Biases, offline (files only) unless
  ``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise;
* :class:`MLflowLogger` (``pes[mlflow]``) logs to an MLflow tracking store, by default a file
  store in a folder of your choice.

A missing library raises :class:`MissingExtraError` (an ImportError) naming the extra.
Metric names are flat strings; nested groups use '/' (``eval/accuracy``, ``theta/0``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

LOGGER_NAMES = ("tensorboard", "wandb", "mlflow")
# The module each backend needs, and the extra that installs it.
_REQUIRES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow")}


@runtime_checkable
class Logger(Protocol):
    """What ``pes.train`` and ``pes run`` call; implement it to send metrics anywhere.

    * ``log_config(config)``: the run's settings, a JSON-able dict, once at the start.
    * ``log_metrics(step, metrics, inner_steps)``: the numbers of outer step ``step`` (0 = the
      evaluation before training) after ``inner_steps`` inner steps; ``metrics`` maps names
      to finite or non-finite floats. Backends show them against both step counts.
    * ``log_image(name, path)``: a PNG file (the final plots).
    * ``close()``: flush and finish; called once, by whoever made the logger (``pes run``
      for ``--log``; in Python, you, or a ``with`` block).
    """

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, float], inner_steps: int) -> None:
        ...

    def log_image(self, name: str, path: str | os.PathLike) -> None: ...

    def close(self) -> None: ...


class MissingExtraError(ImportError):
    """A tracker's library is not installed; the message names the extra that installs it."""


def require(name: str) -> Any:
    """Import the library of backend ``name`` or raise MissingExtraError naming its extra."""
    module, extra = _REQUIRES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"--log {name} needs the {module} package, which is not installed: "
            f"pip install 'pes[{extra}]'") from None


def flat_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line (or any nested mapping) as flat '/'-joined names;
    ``step`` and ``inner_steps`` (the axes) and None values are left out, lists are indexed
    (``theta`` -> ``theta/0``, ...)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if value is None or isinstance(value, str):
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = float(value)

    walk("", {k: v for k, v in record.items() if k not in ("step", "inner_steps")})
    return out


class _Base:
    """Context-manager support: ``with TensorBoardLogger(dir) as log: ...`` closes it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


class TensorBoardLogger(_Base):
    """TensorBoard event files in ``log_dir`` (tensorboardX's writer; no TensorFlow).

    Scalars appear twice: ``NAME`` against the outer step and ``by_inner_steps/NAME`` against
    the inner steps; the config is a text summary and an hparams session (its flat numeric
    and string settings); images are the PNG bytes as written.
    """

    def __init__(self, log_dir: str | os.PathLike):
        tbx = require("tensorboard")
        self.log_dir = Path(log_dir)
        self._writer = tbx.SummaryWriter(logdir=str(self.log_dir), flush_secs=10)
        self._step = 0

    def log_config(self, config: Mapping[str, Any]) -> None:
        from tensorboardX.summary import hparams

        text = "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```"
        self._writer.add_text("config", text, 0)
        hp = {k: v if isinstance(v, bool | int | float | str) else json.dumps(v, default=str)
              for k, v in config.items()}
        exp, ssi, sei = hparams(hp, {"meta_objective": math.nan})
        file_writer = self._writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)

    def log_metrics(self, step: int, metrics: Mapping[str, float], inner_steps: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
            self._writer.add_scalar(f"by_inner_steps/{name}", value, inner_steps)
        self._step = step

    def log_image(self, name: str, path: str | os.PathLike) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        data = Path(path).read_bytes()
        height, width = _png_size(data)
        image = Summary.Image(height=height, width=width, colorspace=4,
                              encoded_image_string=data)
        self._writer._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=name, image=image)]), self._step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger(_Base):
    """A Weights & Biases run whose files go to ``dir`` (``dir/wandb/...``).

    mode: 'online', 'offline' or 'disabled'; None: ``$WANDB_MODE`` if set, else 'online' when
    ``WANDB_API_KEY`` is set and 'offline' otherwise (offline runs are files only; upload
    them later with ``wandb sync``). Metrics are logged with the outer step as wandb's step
    and ``inner_steps`` as a metric every other metric is also plotted against
    (``define_metric``); images as ``wandb.Image``; the config as the run's config.
    """

    def __init__(self, dir: str | os.PathLike, project: str = "pes", name: str | None = None,
                 mode: str | None = None, run_id: str | None = None, **init_kwargs: Any):
        wandb = require("wandb")
        if mode is None:
            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                  x_disable_meta=True)
        self.run = wandb.init(project=project, name=name, dir=str(self.dir), mode=mode,
                              id=run_id, resume="allow" if run_id else None,
                              settings=settings, **init_kwargs)
        self.run.define_metric("inner_steps")
        self._wandb = wandb
        self._defined: set[str] = set()
        self._step = 0

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float], inner_steps: int) -> None:
        for name in metrics:
            if name not in self._defined:
                self.run.define_metric(f"by_inner_steps/{name}", step_metric="inner_steps")
                self._defined.add(name)
        data = {**metrics, **{f"by_inner_steps/{k}": v for k, v in metrics.items()},
                "inner_steps": inner_steps}
        self.run.log(data, step=step)
        self._step = step

    def log_image(self, name: str, path: str | os.PathLike) -> None:
        self.run.log({name: self._wandb.Image(str(path))}, step=self._step)

    def close(self) -> None:
        self.run.finish()


class MLflowLogger(_Base):
    """An MLflow run in the tracking store ``tracking_uri`` (a folder path means a file
    store there), experiment ``experiment``.

    Metrics are logged with the outer step as MLflow's step, and ``inner_steps`` as a metric
    (choose it as the x-axis in the MLflow UI); the config as params (values cut to MLflow's
    limit) and as the artifact ``config.json``; images as artifacts under ``plots/``.
    """

    def __init__(self, tracking_uri: str | os.PathLike, experiment: str = "pes",
                 run_name: str | None = None, tags: Mapping[str, str] | None = None):
        mlflow = require("mlflow")
        from mlflow.tracking import MlflowClient

        uri = str(tracking_uri)
        if "://" not in uri:
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless this
            # is set; a database store would cost seconds of schema migrations per run.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            path = Path(uri).absolute()
            path.mkdir(parents=True, exist_ok=True)
            uri = path.as_uri()
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                             tags=dict(tags or {})).info.run_id
        self._entities = mlflow.entities

    def log_config(self, config: Mapping[str, Any]) -> None:
        params = [self._entities.Param(str(k), json.dumps(v, default=str)[:500]
                                       if not isinstance(v, str) else v[:500])
                  for k, v in config.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, json.dumps(dict(config), indent=2, default=str),
                             "config.json")

    def log_metrics(self, step: int, metrics: Mapping[str, float], inner_steps: int) -> None:
        now = int(time.time() * 1000)
        rows = [self._entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        rows.append(self._entities.Metric("inner_steps", float(inner_steps), now, step))
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def log_image(self, name: str, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def make_loggers(names: str | Sequence[str], run_dir: str | os.PathLike,
                 run_name: str | None = None) -> list[Any]:
    """The loggers named (a list, or a comma-separated string such as 'tensorboard,wandb'),
    each writing inside ``run_dir``: ``tensorboard/``, ``wandb/``, ``mlruns/``.

    Raises ValueError for an unknown name and MissingExtraError for a missing library, in
    both cases before any logger is made.
    """
    names = parse_logger_names(names)
    for name in names:
        require(name)
    run_dir = Path(run_dir)
    made: list[Any] = []
    try:
        for name in names:
            if name == "tensorboard":
                made.append(TensorBoardLogger(run_dir / "tensorboard"))
            elif name == "wandb":
                made.append(WandbLogger(run_dir, name=run_name,
                                        run_id=_stable_id(run_dir)))
            else:
                made.append(MLflowLogger(run_dir / "mlruns", run_name=run_name))
    except BaseException:
        close_all(made)
        raise
    return made


def parse_logger_names(names: str | Sequence[str] | None) -> list[str]:
    """['tensorboard', ...] from 'tensorboard,wandb' or a list; ValueError for an unknown
    name; duplicates are dropped."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    out: list[str] = []
    for name in names:
        if name not in LOGGER_NAMES:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(LOGGER_NAMES)}")
        if name not in out:
            out.append(name)
    return out


def _stable_id(run_dir: Path) -> str:
    """A wandb run id fixed by the run directory, so a resumed run continues the same run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:12]


def close_all(loggers: Sequence[Any]) -> None:
    """Close every logger, even when one fails (the first error is raised after)."""
    error = None
    for logger in loggers:
        try:
            logger.close()
        except Exception as e:  # keep closing the others
            error = error or e
    if error is not None:
        raise error
