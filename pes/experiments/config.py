"""The typed run configuration, its validation, and building a run from it.

A :class:`RunConfig` names a task and an estimator and may override any of the task's
defaults. Constructing one checks every field on its own (type, range, known name);
:meth:`RunConfig.resolve` then fills each unset field from the task's ``defaults()`` and refuses
settings that contradict each other or the task. A resolved configuration has every field that
applies set explicitly: it is what a run directory's ``config.json`` holds, and
``RunConfig.from_dict(json.load(...))`` reads it back.

:func:`build` turns a configuration into a :class:`Setup`: the task, the estimator, the optax
optimizer and the initial theta.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax

from pes.experiments.errors import ConfigError
from pes.experiments.registry import (
    ESTIMATOR_NAMES,
    ESTIMATOR_SETTINGS,
    TASK_NAMES,
    EstimatorEntry,
    get_estimator,
    get_task,
    unknown_name,
)
from pes.tasks.base import OPTIMIZER_NAMES
from pes.train import NONFINITE_POLICIES

MAX_SEED = 2**31 - 1


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}", field=name)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name}={value} must be an integer {allowed}", field=name)
    return int(value)


def _check_float(name: str, value: Any, *, low: float, high: float | None = None,
                 low_open: bool = True, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name}={value!r} must be a number", field=name)
    value = float(value)
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ConfigError(f"{name}={value!r} must be a finite number {lo}{hi}", field=name)
    return value


def _check_name(name: str, value: Any, what: str, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise unknown_name(name, value, what, valid)
    return value


_INAPPLICABLE = {
    "sigma": "{est} computes gradients by differentiation; sigma (the ES perturbation scale) "
             "does not apply to it",
    "truncation_length": "{est} unrolls whole episodes from a fresh state (K = the task's "
                         "horizon); it takes no truncation_length (use pes, tes or nres for "
                         "K-step windows)",
    "num_particles": "{est} takes no num_particles",
}


@dataclass(frozen=True)
class RunConfig:
    """One run: a task, an estimator, and overrides of the task's defaults.

    task: a task name (``pes list``); estimator: an estimator name.
    seed: the run's PRNG seed (>= 0); the run is a deterministic function of it.
    num_steps: outer steps (estimates); None: the task's default for this estimator.
    num_particles, sigma, truncation_length: the estimator's settings; None: the task's
      default. Settings the estimator does not take must stay None.
    optimizer ('sgd' or 'adam'), lr, b1 (Adam only): the outer optimizer; None: the default.
    eval_every: evaluate the task's metric every this many outer steps (and before the first
      and after the last); None: num_steps // 100 (at least 1).
    nonfinite: what a NaN/inf loss does: 'raise' stops the run, 'drop' leaves the particles
      that produced it out of the estimate (ES estimators) and counts them in the metrics.
    out: the run directory; None: ``runs/<task>/<estimator>-seed<seed>``.
    """

    task: str
    estimator: str
    seed: int = 0
    num_steps: int | None = None
    num_particles: int | None = None
    sigma: float | None = None
    truncation_length: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    b1: float | None = None
    eval_every: int | None = None
    nonfinite: str = "raise"
    out: str | None = None

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "task": _check_name("task", self.task, "task", TASK_NAMES),
            "estimator": _check_name("estimator", self.estimator, "estimator", ESTIMATOR_NAMES),
            "seed": check_int("seed", self.seed, 0, MAX_SEED),
            "nonfinite": _check_name("nonfinite", self.nonfinite, "non-finite policy",
                                     NONFINITE_POLICIES),
        }
        optional = {
            "num_steps": lambda v: check_int("num_steps", v, 1),
            "num_particles": lambda v: check_int("num_particles", v, 1),
            "sigma": lambda v: _check_float("sigma", v, low=0.0),
            "truncation_length": lambda v: check_int("truncation_length", v, 1),
            "optimizer": lambda v: _check_name("optimizer", v, "optimizer", OPTIMIZER_NAMES),
            "lr": lambda v: _check_float("lr", v, low=0.0),
            "b1": lambda v: _check_float("b1", v, low=0.0, high=1.0, low_open=False,
                                         high_open=True),
            "eval_every": lambda v: check_int("eval_every", v, 1),
            "out": _check_out,
        }
        for name, check in optional.items():
            value = getattr(self, name)
            checked[name] = None if value is None else check(value)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    # ---------------------------------------------------------------------- dict round trip

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from a mapping (a parsed config.json); unknown or missing keys are refused."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a mapping of settings, got "
                              f"{type(data).__name__}", field=source)
        unknown = [k for k in data if k not in cls.fields()]
        if unknown:
            raise ConfigError(
                f"{source} has unknown setting {unknown[0]!r}; valid settings: "
                f"{', '.join(cls.fields())}", field=str(unknown[0]))
        missing = [k for k in ("task", "estimator") if k not in data]
        if missing:
            raise ConfigError(f"{source} lacks the required setting {missing[0]!r}",
                              field=missing[0])
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------------------- resolve

    def resolve(self) -> RunConfig:
        """Every applicable field set from the task's defaults, or a ConfigError.

        Refuses: settings the estimator does not take, full-episode estimators (and NRES) on a
        task that never resets, a truncation longer than the horizon for TES/TBPTT, estimators
        the task has no defaults for, and b1 with SGD. Idempotent.
        """
        task_entry = get_task(self.task)
        est = get_estimator(self.estimator)
        task = task_entry.make()
        horizon = task.horizon
        for name in ESTIMATOR_SETTINGS:
            if getattr(self, name) is not None and name not in est.params:
                reason = _INAPPLICABLE[name]
                if name == "sigma" and est.name in ("full-es",):
                    reason = "{est} takes no sigma"
                raise ConfigError(f"{name}={getattr(self, name)} contradicts "
                                  f"estimator={est.name!r}: " + reason.format(est=est.name),
                                  field=name)
        if est.needs_horizon and horizon is None:
            why = ("it draws one perturbation per episode" if est.name == "nres"
                   else "it unrolls whole episodes")
            raise ConfigError(
                f"estimator={est.name!r} needs episodes that end ({why}), but task="
                f"{self.task!r} never resets (horizon None); use pes, tes, tbptt, rtrl or uoro",
                field="estimator")
        defaults = task.defaults()
        if est.name not in defaults.estimators:
            raise ConfigError(
                f"task={self.task!r} has no settings for estimator={est.name!r}; estimators "
                f"for this task: {', '.join(sorted(defaults.estimators))}", field="estimator")
        settings = {**est.defaults, **defaults.estimator_settings(est.name)}
        for name in est.params:
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        k = settings.get("truncation_length")
        if est.window_within_episode and horizon is not None and k is not None and k > horizon:
            raise ConfigError(
                f"truncation_length={k} is longer than the horizon of task={self.task!r} "
                f"({horizon}): "
                f"{est.name} windows must fit inside an episode (use full-"
                f"{'es' if est.name == 'tes' else 'bptt'} for whole episodes)",
                field="truncation_length")

        opt = defaults.optimizer_for(est.name)
        optimizer = self.optimizer or opt.name
        lr = self.lr if self.lr is not None else opt.learning_rate
        if optimizer == "adam":
            b1 = self.b1 if self.b1 is not None else (opt.b1 if opt.name == "adam" else None)
        elif self.b1 is not None:
            raise ConfigError(f"b1={self.b1} contradicts optimizer='sgd': b1 is Adam's "
                              "momentum; SGD takes none", field="b1")
        else:
            b1 = None
        num_steps = self.num_steps or defaults.num_steps_for(est.name)
        eval_every = self.eval_every or max(1, num_steps // 100)
        seed = self.seed
        out = self.out or f"runs/{self.task}/{est.name}-seed{seed}"
        return dataclasses.replace(
            self, num_steps=num_steps, optimizer=optimizer, lr=lr, b1=b1,
            eval_every=eval_every, out=out,
            **{name: settings.get(name) for name in ESTIMATOR_SETTINGS if name in est.params},
        )

    def estimator_kwargs(self) -> dict[str, Any]:
        """Constructor keyword arguments of the estimator (from a resolved config)."""
        est = get_estimator(self.estimator)
        return {name: getattr(self, name) for name in est.params
                if getattr(self, name) is not None}

    def settings_text(self) -> str:
        """Short human form of a resolved config's settings, e.g. 'N=100, sigma=0.3, K=10,
        adam lr=0.01 b1=0.99, 5000 steps'."""
        parts = []
        short = {"num_particles": "N", "sigma": "sigma", "truncation_length": "K"}
        for name, kwarg in self.estimator_kwargs().items():
            parts.append(f"{short[name]}={kwarg:g}")
        opt = f"{self.optimizer} lr={self.lr:g}"
        if self.b1 is not None:
            opt += f" b1={self.b1:g}"
        parts.append(opt)
        if self.num_steps is not None:
            parts.append(f"{self.num_steps} steps")
        return ", ".join(parts)


def _check_out(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"out={value!r} must be a non-empty directory path", field="out")
    return value


# ------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Setup:
    """Everything a run needs: config (resolved), task, estimator, optimizer, theta0."""

    config: RunConfig
    task: Any
    estimator: Any
    optimizer: optax.GradientTransformation
    theta0: jax.Array


_ESTIMATOR_CACHE: dict[tuple, Any] = {}


def make_optimizer(name: str, lr: float, b1: float | None = None) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr) if b1 is None else optax.adam(lr, b1=b1)
    raise unknown_name("optimizer", name, "optimizer", OPTIMIZER_NAMES)


def _construct(est: EstimatorEntry, task: Any, kwargs: dict[str, Any]) -> Any:
    cls = est.cls()
    # Estimators hold their jitted functions: reusing one across seeds skips recompiling.
    key = (est.name, cls, task, tuple(sorted(kwargs.items())))
    cached = _ESTIMATOR_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        estimator = cls(task, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"estimator={est.name!r} refused its settings "
                          f"({', '.join(f'{k}={v}' for k, v in kwargs.items())}): {e}",
                          field="estimator") from None
    if len(_ESTIMATOR_CACHE) > 32:
        _ESTIMATOR_CACHE.clear()
    _ESTIMATOR_CACHE[key] = estimator
    return estimator


def build_setup(config: RunConfig) -> Setup:
    """Resolve ``config`` and build its task, estimator, optimizer and initial theta."""
    config = config.resolve()
    entry = get_task(config.task)
    task = entry.make()
    estimator = _construct(get_estimator(config.estimator), task, config.estimator_kwargs())
    optimizer = make_optimizer(config.optimizer, config.lr, config.b1)
    theta0 = task.defaults().initial_theta()
    return Setup(config, task, estimator, optimizer, theta0)


def build(task: str, estimator: str, **overrides: Any) -> Setup:
    """Estimator + optax optimizer + initial theta from a task's defaults with overrides.

    ``overrides`` are RunConfig fields (num_particles, sigma, truncation_length, optimizer, lr,
    b1, num_steps, ...). Example::

        s = build("toy-regression", "pes", sigma=0.1)
        pes.train(s.estimator, s.theta0, s.optimizer, num_steps=s.config.num_steps, key=key)
    """
    config = RunConfig.from_dict({"task": task, "estimator": estimator, **overrides},
                                 source="settings")
    return build_setup(config)
