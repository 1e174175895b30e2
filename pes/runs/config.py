"""The typed run configuration, its validation, and building a run from it.

A :class:`RunConfig` names a task and an estimator and may override any of the task's
defaults. Constructing one checks every field on its own (type, range, known name);
:meth:`RunConfig.resolve` then fills each unset field from the task's ``defaults()`` and refuses
settings that contradict each other or the task. A resolved configuration has every field that
applies set explicitly: it is what a run directory's ``config.json`` holds, and
``RunConfig.from_dict(json.load(...))`` reads it back. :func:`load_config_file` reads the same
settings from a YAML or JSON file (``pes run --config FILE``).

:func:`build` turns a configuration into a :class:`Setup`: the task, the estimator, the optax
optimizer and the initial theta.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes.runs.errors import ConfigError
from pes.runs.gym_task import POLICIES as GYM_POLICIES
from pes.runs.gym_task import is_gym_task, outer_step_cap
from pes.runs.registry import (
    ESTIMATOR_NAMES,
    ESTIMATOR_SETTINGS,
    RESETS,
    SPEC_SHAPES,
    TASK_NAMES,
    TASK_OPTIONS,
    EstimatorEntry,
    check_option_value,
    get_estimator,
    get_task,
    is_task_name,
    unknown_name,
)
from pes.runs.user_task import is_user_spec, normalize_spec, slug
from pes.tasks.base import OPTIMIZER_NAMES, OptimizerSpec
from pes.training import NONFINITE_POLICIES

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


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name}={value!r} must be true or false", field=name)
    return bool(value)


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
    "backprop_depth": "{est} takes no backprop_depth (the depth of truncated backprop; only "
                      "tbptt takes it)",
    "normalize_losses": "{est} computes gradients by differentiation; normalize_losses (the "
                        "ES family's division by the spread of the particles' losses) does "
                        "not apply to it",
    "stagger": "{est} starts every estimate from a fresh episode at t = 0; stagger does not "
               "apply to it",
    "reset": "{est} takes no reset",
    "centered_ranks": "{est} computes gradients by differentiation; centered_ranks (the ES "
                      "family's rank shaping of the particles' losses) does not apply to it",
    "top_b": "{est} computes gradients by differentiation; top_b (the ES family's selection "
             "of the best antithetic pairs) does not apply to it",
}


@dataclass(frozen=True)
class RunConfig:
    """One run: a task, an estimator, and overrides of the task's defaults.

    task: a task name (``pes list``); estimator: an estimator name.
    seed: the run's PRNG seed (>= 0); the run is a deterministic function of it.
    num_steps: outer steps (estimates); None: the task's default for this estimator.
    num_particles, sigma, truncation_length: the estimator's settings; None: the task's
      default. Settings the estimator does not take must stay None.
    backprop_depth: TBPTT only: k2 >= truncation_length, the steps of history each window's
      losses are backpropagated through (Williams & Peng's TBPTT(k1, k2)); None: the task's
      default, else truncation_length (the history cut at the window's start).
    normalize_losses: ES estimators only: scale each estimate by 2 sigma / (standard deviation
      of the particles' window losses), the reward normalisation of augmented random search;
      None: the task's default, else False.
    centered_ranks: ES estimators only: replace each particle's window loss by its centred rank
      among the 2N window losses (augmented random search's fitness shaping; docs/ars.md);
      None: off.
    top_b: ES estimators only: average the estimate over the b antithetic pairs with the best
      window returns (ARS V2-t), 1 <= b <= num_particles / 2; None: every pair.
    stagger: estimators with K-step windows: burn each particle in to a uniform random step of
      its first episode, so that the particles' windows cover the episode evenly (False: all
      start at t = 0, windows aligned with episodes); None: the task's default, else True.
    reset: when a pair of particles whose episodes ended early (a task whose steps return
      ``done``) restarts: 'slot' when its clock reaches the horizon (exactly unbiased for
      PES, NRES, full ES), 'pair' as soon as all its members have ended (faster; another
      expectation, docs/termination.md); None: 'slot'. Full ES and full BPTT are the same for
      both.
    optimizer ('sgd' or 'adam'), lr, b1 (Adam only): the outer optimizer; None: the default.
    lr_schedule: [[boundary, scale], ...], a piecewise-constant learning rate (x scale from
      outer step boundary on); [] is constant; None: the task's schedule when optimizer and lr
      are the task's defaults, else constant.
    eval_every: evaluate the task's metric every this many outer steps (and before the first
      and after the last); None: num_steps // 100 (at least 1).
    nonfinite: what a NaN/inf loss does: 'raise' stops the run (after checkpointing the last
      good state), 'drop' leaves the particles that produced it out of the estimate (ES
      estimators) and counts them in the metrics.
    out: the run directory; None: ``runs/<task>/<estimator>-seed<seed>``.
    theta0: the initial theta, a number (scalar-theta tasks) or a list with one number per
      component; None: the task's default.
    checkpoint_every: checkpoint the complete run state every this many outer steps; None
      (also once resolved): every 5 minutes of running instead (an orbax write costs tens of
      milliseconds, too much to pay every few steps of a fast task). Whatever this is, the run
      is also checkpointed after its last step, when interrupted (SIGINT/SIGTERM) and when a
      non-finite loss stops it.
    dataset ('fashion-mnist' or 'mnist'), data_dir (a folder searched first), size ('cpu',
      'paper' or 'tiny') and objective ('loss' or 'accuracy'): options of the image tasks
      (mnist-lr-schedule; many-hyperparameters takes all but objective); None: the task's
      default, and must stay None for a task that does not take them.
    backend: the swimmer's or a gym:ENV_ID task's simulator, 'mujoco' (C, through a host
      callback) or 'mjx' (pure JAX through mujoco.mjx, for accelerators; gym:ENV_ID: the MuJoCo
      suite's environments only); None: 'mujoco'. Other tasks take none.
    policy: gym:ENV_ID's policy, 'linear' or 'mlp' (32, 32 tanh); None: 'linear'.
    survival_bonus_shift: gym:ENV_ID (Hopper, Walker2d, Ant): train on the reward less the
      environment's survival bonus per step (evaluations keep the true return); None: False.
    obs_norm: gym:ENV_ID (the MuJoCo suite) with an ES estimator: ARS's observation
      normalisation, the policy acting on observations normalised by running statistics of
      every observation visited (kept in theta, merged after each outer step); None: False.
    env_steps: a budget in environment steps (gym:ENV_ID tasks), an alternative to
      num_steps: the run stops after the outer step at which ``inner_steps``, the steps
      actually taken, reaches it. num_steps becomes a cap that surely spends the budget:
      ceil(env_steps / members) x ceil(horizon / K) (full ES: ceil(env_steps / members)), as
      every member takes at least one step per episode slot however early its episode ends.
    devices: split the particles over this many devices (a 1-D mesh; the pairs of antithetic
      estimators must divide evenly); None: one device, or every device of every process in a
      distributed run (:mod:`pes.runs.distributed`). It changes where the particles
      are computed, not the result (to float tolerance), so a resumed run may change it.
    steps_per_call: outer steps per compiled call of the training loop (``pes.train``'s
      steps_per_call, at most 64), their records read back once per call; None: 'auto',
      calls of about 0.1 s (one step per call with an env_steps budget or in a distributed
      run). Metrics still come per step; calls also end at evaluations and at the multiples
      of checkpoint_every (so checkpoints come at those steps); a signal stops the run at the
      end of the call under way. The result is bit for bit the same for every value, so a
      resumed run may change it.
    keep_checkpoints: how many of the newest intact checkpoints a run keeps (older ones are
      deleted once a newer one is proven by its checksums); None: 2. A resumed run may change
      it.
    """

    task: str
    estimator: str
    seed: int = 0
    num_steps: int | None = None
    num_particles: int | None = None
    sigma: float | None = None
    truncation_length: int | None = None
    backprop_depth: int | None = None
    normalize_losses: bool | None = None
    stagger: bool | None = None
    reset: str | None = None
    centered_ranks: bool | None = None
    top_b: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    b1: float | None = None
    lr_schedule: tuple[tuple[int, float], ...] | None = None
    eval_every: int | None = None
    nonfinite: str = "raise"
    out: str | None = None
    theta0: float | tuple[float, ...] | None = None
    checkpoint_every: int | None = None
    dataset: str | None = None
    data_dir: str | None = None
    size: str | None = None
    objective: str | None = None
    backend: str | None = None
    policy: str | None = None
    survival_bonus_shift: bool | None = None
    obs_norm: bool | None = None
    env_steps: int | None = None
    devices: int | None = None
    steps_per_call: int | None = None
    keep_checkpoints: int | None = None

    def __post_init__(self) -> None:
        for name in self.fields():
            value = getattr(self, name)
            if value is not None or name in _REQUIRED_CHECKS:
                object.__setattr__(self, name, check_field(name, value))

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

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
                  ) -> RunConfig:
        """Settings from a YAML or JSON file (see :func:`load_config_file`), with
        ``overrides`` (non-None values, e.g. command-line flags) taking precedence; resolved
        (:meth:`resolve`)."""
        data = load_config_file(path)
        return config_with_overrides(data, str(path), overrides or {})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.theta0, tuple):
            data["theta0"] = list(self.theta0)
        if self.lr_schedule is not None:
            data["lr_schedule"] = [list(pair) for pair in self.lr_schedule]
        return data

    # --------------------------------------------------------------------------- resolve

    def resolve(self) -> RunConfig:
        """Every applicable field set from the task's defaults, or a ConfigError
        (checkpoint_every may stay None: checkpoints by time).

        Refuses: settings the estimator does not take, full-episode estimators (and NRES) on a
        task that never resets, a truncation longer than the horizon for TES/TBPTT, estimators
        the task has no defaults for, and b1 with SGD. Idempotent.
        """
        task_entry = get_task(self.task)
        est = get_estimator(self.estimator)
        options = self.task_options()
        if task_entry.estimators is not None and est.name not in task_entry.estimators:
            raise _no_settings(self.task, est.name, task_entry.estimators)
        task = make_task(self.task, options)
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
            raise _no_settings(self.task, est.name, defaults.estimators)
        settings = {**est.defaults, **defaults.estimator_settings(est.name)}
        for name in est.params:
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        for name, default in (("normalize_losses", False), ("stagger", True)):
            if name in est.params:
                settings.setdefault(name, default)
        k = settings.get("truncation_length")
        if est.window_within_episode and horizon is not None and k is not None and k > horizon:
            raise ConfigError(
                f"truncation_length={k} is longer than the horizon of task={self.task!r} "
                f"({horizon}): "
                f"{est.name} windows must fit inside an episode (use full-"
                f"{'es' if est.name == 'tes' else 'bptt'} for whole episodes)",
                field="truncation_length")
        if "backprop_depth" in est.params:
            depth = settings.get("backprop_depth")
            settings["backprop_depth"] = depth = k if depth is None else depth
            if depth < k:
                raise ConfigError(
                    f"backprop_depth={depth} is shorter than truncation_length={k}: a window's "
                    "losses are backpropagated through at least the window itself",
                    field="backprop_depth")

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
        if self.lr_schedule is not None:
            lr_schedule = self.lr_schedule
        elif self.lr is None and optimizer == opt.name:
            lr_schedule = opt.schedule  # the task's schedule goes with its learning rate only
        else:
            lr_schedule = ()
        num_steps = self.num_steps or defaults.num_steps_for(est.name)
        if self.env_steps is not None:
            if not is_gym_task(self.task):
                raise ConfigError(f"env_steps={self.env_steps} applies to gym:ENV_ID tasks "
                                  "only; use num_steps", field="env_steps")
            num_steps = outer_step_cap(est.name, settings, horizon, self.env_steps)
            if self.num_steps is not None and self.num_steps != num_steps:
                raise ConfigError(f"env_steps={self.env_steps} contradicts num_steps="
                                  f"{self.num_steps}: give one budget", field="env_steps")
        eval_every = (self.eval_every or getattr(task, "default_eval_every", None)
                      or max(1, num_steps // 100))
        seed = self.seed
        folder = slug(self.task) if is_user_spec(self.task) else self.task
        out = self.out or f"runs/{folder}/{est.name}-seed{seed}"
        theta0 = _resolve_theta0(self.theta0, defaults.theta0, task_entry, task)
        return dataclasses.replace(
            self, num_steps=num_steps, optimizer=optimizer, lr=lr, b1=b1,
            lr_schedule=lr_schedule,
            eval_every=eval_every, out=out, theta0=theta0,
            **{name: settings.get(name) for name in ESTIMATOR_SETTINGS if name in est.params},
            **options,
        )

    def task_options(self) -> dict[str, Any]:
        """The task's options (TASK_OPTIONS) with its defaults filled in; a ConfigError for an
        option the task does not take."""
        entry = get_task(self.task)
        for name in TASK_OPTIONS:
            value = getattr(self, name)
            if value is not None and name not in entry.options:
                takers = [t for t in TASK_NAMES if name in get_task(t).options]
                gym_options = ("policy", "backend", "survival_bonus_shift", "obs_norm")
                takers += ["gym:ENV_ID"] if name in gym_options else []
                raise ConfigError(
                    f"{name}={value!r} does not apply to task={self.task!r}; only "
                    f"{', '.join(takers)} take{'s' * (len(takers) == 1)} it", field=name)
        return {name: (getattr(self, name) if getattr(self, name) is not None else default)
                for name, default in entry.options.items()}

    def estimator_kwargs(self) -> dict[str, Any]:
        """Constructor keyword arguments of the estimator (from a resolved config)."""
        est = get_estimator(self.estimator)
        return {name: getattr(self, name) for name in est.params
                if getattr(self, name) is not None}

    def settings_text(self) -> str:
        """Short human form of a resolved config's settings, e.g. 'N=100, sigma=0.3, K=10,
        adam lr=0.01 b1=0.99, 5000 steps'."""
        parts = []
        short = {"num_particles": "N", "sigma": "sigma", "truncation_length": "K",
                 "backprop_depth": "depth"}
        for name, kwarg in self.estimator_kwargs().items():
            if name == "backprop_depth" and kwarg == self.truncation_length:
                continue  # the plain truncated gradient
            if name == "normalize_losses":
                if kwarg:
                    parts.append("losses normalised")
                continue
            if name == "stagger":
                if not kwarg:
                    parts.append("not staggered")
                continue
            if name == "reset":
                if kwarg != "slot":
                    parts.append(f"reset={kwarg}")
                continue
            if name == "centered_ranks":
                if kwarg:
                    parts.append("centred ranks")
                continue
            if name == "top_b":
                parts.append(f"top-{kwarg} pairs")
                continue
            parts.append(f"{short[name]}={kwarg:g}")
        opt = f"{self.optimizer} lr={self.lr:g}"
        if self.b1 is not None:
            opt += f" b1={self.b1:g}"
        for boundary, scale in self.lr_schedule or ():
            opt += f" x{scale:g}@{boundary}"
        parts.append(opt)
        if self.num_steps is not None:
            parts.append(f"{self.num_steps} steps")
        return ", ".join(parts)


_REQUIRED_CHECKS = {
    "task": lambda v: (normalize_spec(v) if is_user_spec(v) else v) if is_task_name(v)
    else _check_name("task", v, "task", TASK_NAMES + SPEC_SHAPES),
    "estimator": lambda v: _check_name("estimator", v, "estimator", ESTIMATOR_NAMES),
    "seed": lambda v: check_int("seed", v, 0, MAX_SEED),
    "nonfinite": lambda v: _check_name("nonfinite", v, "non-finite policy", NONFINITE_POLICIES),
}
# Fields that may be None (unset); each check sees a set value.
_OPTIONAL_CHECKS = {
    "num_steps": lambda v: check_int("num_steps", v, 1),
    "num_particles": lambda v: check_int("num_particles", v, 1),
    "sigma": lambda v: _check_float("sigma", v, low=0.0),
    "truncation_length": lambda v: check_int("truncation_length", v, 1),
    "backprop_depth": lambda v: check_int("backprop_depth", v, 1),
    "normalize_losses": lambda v: _check_bool("normalize_losses", v),
    "stagger": lambda v: _check_bool("stagger", v),
    "reset": lambda v: _check_name("reset", v, "reset mode", RESETS),
    "centered_ranks": lambda v: _check_bool("centered_ranks", v),
    "top_b": lambda v: check_int("top_b", v, 1),
    "survival_bonus_shift": lambda v: _check_bool("survival_bonus_shift", v),
    "obs_norm": lambda v: _check_bool("obs_norm", v),
    "optimizer": lambda v: _check_name("optimizer", v, "optimizer", OPTIMIZER_NAMES),
    "lr": lambda v: _check_float("lr", v, low=0.0),
    "b1": lambda v: _check_float("b1", v, low=0.0, high=1.0, low_open=False, high_open=True),
    "lr_schedule": lambda v: _check_lr_schedule(v),
    "eval_every": lambda v: check_int("eval_every", v, 1),
    "out": lambda v: _check_out(v),
    "theta0": lambda v: _check_theta0(v),
    "checkpoint_every": lambda v: check_int("checkpoint_every", v, 1),
    "dataset": lambda v: _check_name("dataset", v, "dataset", DATASET_NAMES),
    "data_dir": lambda v: _check_data_dir(v),
    "size": lambda v: _check_name("size", v, "size", TASK_SIZES),
    "objective": lambda v: _check_name("objective", v, "objective", OBJECTIVES),
    "backend": lambda v: check_option_value("backend", v),
    "policy": lambda v: _check_name("policy", v, "policy", GYM_POLICIES),
    "env_steps": lambda v: check_int("env_steps", v, 1),
    "devices": lambda v: check_int("devices", v, 1),
    "steps_per_call": lambda v: check_int("steps_per_call", v, 1),
    "keep_checkpoints": lambda v: check_int("keep_checkpoints", v, 1),
}


def check_field(name: str, value: Any) -> Any:
    """``value`` checked (and normalised) as RunConfig field ``name`` on its own, or a
    ConfigError naming it; None passes for every field but task, estimator, seed, nonfinite.
    The command line checks its flags with it in the order they were given."""
    if name in _REQUIRED_CHECKS:
        return _REQUIRED_CHECKS[name](value)
    if name not in _OPTIONAL_CHECKS:
        raise ConfigError(f"unknown setting {name!r}; valid settings: "
                          f"{', '.join(RunConfig.fields())}", field=name)
    return None if value is None else _OPTIONAL_CHECKS[name](value)


def _check_lr_schedule(value: Any) -> tuple[tuple[int, float], ...]:
    """A list of [boundary, scale] pairs (OptimizerSpec's rules), stored as a tuple."""
    try:
        return OptimizerSpec("sgd", 1.0, schedule=value).schedule
    except ValueError as e:
        raise ConfigError(f"lr_schedule={_plain(value)!r}: {e}", field="lr_schedule") from None


def _check_theta0(value: Any) -> float | tuple[float, ...]:
    """A finite number, or a non-empty list of finite numbers (stored as a tuple)."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise ConfigError(f"theta0={_plain(value)!r} must be a number or a list of numbers",
                              field="theta0")
        if not math.isfinite(float(v)):
            raise ConfigError(f"theta0={_plain(value)!r} must hold finite numbers",
                              field="theta0")
    if isinstance(value, list | tuple):
        if not values:
            raise ConfigError("theta0=[] must hold at least one number", field="theta0")
        return tuple(float(v) for v in values)
    return float(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _resolve_theta0(value: Any, default: Any, entry: Any, task: Any
                    ) -> float | tuple[float, ...]:
    """``value`` (or the task's default) in the shape of the task's theta; a user's factory
    that gave no theta0 takes ``value`` as it is, and needs one."""
    if getattr(task, "theta0_required", False):
        if value is None:
            raise ConfigError(f"task={entry.name!r} gives no theta0: pass --theta0 (e.g. "
                              "--theta0=0,0), or return (system, theta0) from the factory",
                              field="theta0")
        return value
    if value is None:
        return default if isinstance(default, float | int) and not isinstance(default, bool) \
            else tuple(float(v) for v in default)
    want = 1 if not isinstance(default, tuple | list) else len(default)
    got = len(value) if isinstance(value, tuple) else 1
    if got != want:
        shape = "a single number" if not isinstance(default, tuple | list) else \
            f"{want} numbers ({', '.join(entry.theta_names)})"
        raise ConfigError(
            f"theta0={_plain(value)!r} has {got} value{'s' * (got != 1)}, but task="
            f"{entry.name!r} takes {shape}", field="theta0")
    if not isinstance(default, tuple | list):
        return value[0] if isinstance(value, tuple) else value
    return tuple(value)


DATASET_NAMES = ("fashion-mnist", "mnist")
TASK_SIZES = ("cpu", "paper", "tiny", "full")
OBJECTIVES = ("loss", "accuracy")


def _check_data_dir(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"data_dir={value!r} must be a non-empty folder path",
                          field="data_dir")
    return value


def make_task(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """``get_task(name).make(**options)``; a dataset that cannot be found or read is a
    one-line ConfigError saying how to get it."""
    from pes import data as pes_data

    try:
        return get_task(name).make(**dict(options or {}))
    except pes_data.DatasetNotFoundError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        # One line: the searched folders joined by "; " (the message has one per line).
        text = lines[0] if len(lines) < 3 else (
            f"{lines[0]} {'; '.join(lines[1:-1]).replace(':;', ':', 1)}. {lines[-1]}")
        field = "data_dir" if getattr(e, "explicit", None) == "--data-dir" else "dataset"
        raise ConfigError(f"task={name!r}: {text}", field=field) from None
    except pes_data.CorruptFileError as e:
        raise ConfigError(f"task={name!r}: {e}", field="data_dir") from None
    except ConfigError as e:  # the task's own (gym:ENV_ID: an unknown id, a bad space)
        raise ConfigError(f"task={name!r}: {e}", field=e.field) from None
    except ValueError as e:  # e.g. a dataset too small for its validation split
        raise ConfigError(f"task={name!r}: {e}", field="dataset") from None


def _no_settings(task: str, estimator: str, offered: Any) -> ConfigError:
    return ConfigError(f"task={task!r} has no settings for estimator={estimator!r}; "
                       f"estimators for this task: {', '.join(sorted(offered))}",
                       field="estimator")


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


def make_optimizer(name: str, lr: float, b1: float | None = None,
                   schedule: Any = ()) -> optax.GradientTransformation:
    """``schedule``: ((boundary, scale), ...) of a piecewise-constant rate; () is constant."""
    rate = optax.piecewise_constant_schedule(lr, dict(schedule)) if schedule else lr
    if name == "sgd":
        return optax.sgd(rate)
    if name == "adam":
        return optax.adam(rate) if b1 is None else optax.adam(rate, b1=b1)
    raise unknown_name("optimizer", name, "optimizer", OPTIMIZER_NAMES)


def _construct(est: EstimatorEntry, task: Any, kwargs: dict[str, Any]) -> Any:
    # Estimators are immutable and jit keys on their value: an equal estimator built for
    # another seed reuses the compiled code.
    try:
        return est.cls()(task, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"estimator={est.name!r} refused its settings "
                          f"({', '.join(f'{k}={v}' for k, v in kwargs.items())}): {e}",
                          field="estimator") from None


def _even_split_hint(units: int, devices: int, per_unit: int) -> str:
    """The nearest num_particles and device counts that split ``units`` (pairs, or particles
    of estimators without pairs; ``per_unit`` particles each) evenly over the devices."""
    step = devices * per_unit
    counts = sorted({max(step, units // devices * step), -(-units // devices) * step})
    below = [d for d in range(devices - 1, 0, -1) if units % d == 0][:1]
    above = [d for d in range(devices + 1, units + 1) if units % d == 0][:1]
    return (f"use num_particles={' or '.join(map(str, counts))}, or devices="
            f"{' or '.join(map(str, below + above))}")


def build_setup(config: RunConfig) -> Setup:
    """Resolve ``config`` and build its task, estimator (on the mesh of ``config.devices``),
    optimizer and initial theta."""
    from pes.runs.distributed import particle_mesh

    config = config.resolve()
    task = make_task(config.task, config.task_options())
    entry = get_estimator(config.estimator)
    kwargs = config.estimator_kwargs()
    estimator = _construct(entry, task, kwargs)
    mesh = particle_mesh(config.devices)
    if mesh is not None:
        particles = getattr(estimator, "num_particles", 1)
        pairs = getattr(estimator, "num_pairs", None) or particles
        if pairs % mesh.size:
            per = "antithetic pairs" if pairs != particles else "particles"
            raise ConfigError(
                f"devices={mesh.size} does not divide the {pairs} {per} of num_particles="
                f"{particles} evenly (each device holds the same number): "
                + _even_split_hint(pairs, mesh.size, particles // pairs), field="devices")
        estimator = _construct(entry, task, {**kwargs, "mesh": mesh})
    optimizer = make_optimizer(config.optimizer, config.lr, config.b1, config.lr_schedule or ())
    default = task.defaults().initial_theta()
    theta0 = jnp.asarray(config.theta0, default.dtype)
    if not getattr(task, "theta0_required", False):  # else theta is --theta0's shape
        theta0 = theta0.reshape(default.shape)
    if mesh is not None:
        # theta replicated on the mesh from the start, as every later theta is: the first
        # outer step then compiles the same programs as the rest.
        everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        theta0 = jax.make_array_from_process_local_data(everywhere, np.asarray(theta0))
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


# --------------------------------------------------------------------------- config files


@functools.cache
def _yaml_loader() -> Any:
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 and JSON do (PyYAML's
    YAML 1.1 resolver wants a dot, ``1.0e-3``, and would return the string '1e-3'). Made at
    first use: a run without a config file does not import yaml."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                        |\.[0-9_]+(?:[eE][-+][0-9]+)?
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings mapping of a YAML (or, for a ``.json`` name, JSON) config file.

    Keys are RunConfig fields, e.g.::

        task: toy-regression
        estimator: pes
        num_particles: 10
        sigma: 0.3
        theta0: [-1.0, -1.0]

    A missing file, a syntax error or anything but a mapping is a one-line ConfigError
    naming the file (and the line, for a syntax error).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist", field="config")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file", field="config")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read as text: {e}",
                          field="config") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column "
                              f"{e.colno}", field="config") from None
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as e:
            where = ""
            mark = getattr(e, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1}, column {mark.column + 1}"
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML: {problem}{where}",
                              field="config") from None
    if data is None:
        raise ConfigError(f"{path} is empty: it must hold settings such as 'task: "
                          "toy-regression' and 'estimator: pes'", field="config")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of settings (name: value), not a "
                          f"{type(data).__name__}", field="config")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path} has a setting named {bad[0]!r}; setting names are words "
                          f"such as {', '.join(RunConfig.fields()[:3])}", field="config")
    return dict(data)


def config_with_overrides(data: Mapping[str, Any], source: str,
                          overrides: Mapping[str, Any]) -> RunConfig:
    """The resolved RunConfig of ``data`` (read from ``source``) with the non-None
    ``overrides``; an error in a value that came from the file names the file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**data, **given}
    try:
        return RunConfig.from_dict(merged, source=source).resolve()
    except ConfigError as e:
        if e.field in data and e.field not in given and not str(e).startswith(source):
            raise ConfigError(f"{source}: {e}", field=e.field) from None
        raise


# Settings a resumed run may change: they do not alter the steps already taken.
RESUMABLE_SETTINGS = ("num_steps", "checkpoint_every", "nonfinite", "devices",
                      "steps_per_call", "keep_checkpoints")


def resumed_config(stored: RunConfig, source: str, overrides: Mapping[str, Any]
                   ) -> RunConfig:
    """The configuration of a resumed run: ``stored`` (a run directory's config.json, named
    ``source``) with the RESUMABLE_SETTINGS among ``overrides`` applied; any other
    non-None override must equal the stored value (else a ConfigError naming it)."""
    unknown = [k for k in overrides if k not in RunConfig.fields()]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}", field=unknown[0])
    for name, value in overrides.items():
        if value is None or name in RESUMABLE_SETTINGS or name == "out":
            continue
        wanted = getattr(dataclasses.replace(stored, **{name: value}), name)
        have = getattr(stored, name)
        if wanted != have:
            raise ConfigError(
                f"{name}={_plain(wanted)!r} contradicts {source} ({name}={_plain(have)!r}): a "
                f"resumed run keeps its configuration; only "
                f"{', '.join(RESUMABLE_SETTINGS)} may change", field=name)
    changes = {k: overrides[k] for k in RESUMABLE_SETTINGS if overrides.get(k) is not None}
    return dataclasses.replace(stored, **changes).resolve()
