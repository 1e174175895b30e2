"""Tasks and estimators by their command-line names.

A task name maps to a :class:`TaskEntry` (how to make the task, what to plot, the theta it
should reach); an estimator name maps to an :class:`EstimatorEntry` (which ``pes`` class, which
constructor settings it takes, what it needs from the task). Estimator classes are looked up
on the ``pes`` package by name when a run needs them, so an estimator added to ``pes`` later
(``pes.RTRL``, ``pes.UORO``) plugs in without touching this file.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pes.estimators._window import RESETS  # noqa: F401 (the valid ``reset`` settings)
from pes.runs.errors import ConfigError
from pes.tasks import InfluenceBalancing, Lorenz, ToyRegression
from pes.tasks.learned_optimizer import EXPORT_FILE as LEARNED_OPTIMIZER_FILE
from pes.tasks.swimmer import BACKENDS as SWIMMER_BACKENDS  # no mujoco import until used

ESTIMATOR_SETTINGS = ("num_particles", "sigma", "truncation_length", "backprop_depth",
                      "normalize_losses", "stagger", "centered_ranks", "top_b", "reset")


def unknown_name(field_name: str, value: Any, what: str, valid: tuple[str, ...] | list[str]):
    """The ConfigError for a name that is not one of ``valid``."""
    plural = what[:-1] + "ies" if what.endswith("y") else what + "s"
    return ConfigError(
        f"{field_name}={value!r} is not a known {what}; valid {plural}: {', '.join(valid)}",
        field=field_name,
    )


# ----------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskEntry:
    """A task on the command line.

    factory: builds the task (a pes.System with ``defaults()`` and ``evaluate(theta, key)``).
    metric: key of ``task.evaluate(...)`` plotted for a run (the headline ``meta_loss`` is
      always logged as ``meta_objective``); metric_label: its axis label; log_y: log scale.
    theta_names: one axis label per component of theta.
    reference_theta: the theta the task should reach (drawn as a dashed line), or None.
    has_surface: ``pes surface`` can draw its meta-loss over [-5, 5]^2.
    """

    name: str
    factory: Callable[[], Any]
    description: str
    metric: str
    metric_label: str
    log_y: bool
    theta_names: tuple[str, ...]
    reference_theta: Callable[[Any], Any] | None = None
    has_surface: bool = False
    # Writes files a run leaves besides the standard ones, from its final theta:
    # ``export(task, theta, run_dir) -> path`` (e.g. the learned optimizer's file).
    export: Callable[[Any, Any, Any], Any] | None = None
    # The names of the files ``export`` writes (``--overwrite`` removes them with the rest).
    export_files: tuple[str, ...] = ()
    # Task options (TASK_OPTIONS) the factory takes as keyword arguments, with their defaults.
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    # The values allowed for an option only this task takes (others are checked by RunConfig).
    option_values: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # Every estimator the task can offer, whatever its options (None: only its defaults()
    # know): checked before the task is built, so that a task needing a dataset names an
    # estimator it never takes before saying the dataset is missing.
    estimators: tuple[str, ...] | None = None

    def make(self, **options: Any) -> Any:
        """The task object (one per name and options); ``options``: some of ``self.options``."""
        return _make_task(self.name, tuple(sorted(options.items())))

    def reference(self) -> np.ndarray | None:
        if self.reference_theta is None:
            return None
        return np.atleast_1d(np.asarray(self.reference_theta(self.make()), dtype=float))


TASKS: dict[str, TaskEntry] = {
    "influence-balancing": TaskEntry(
        name="influence-balancing",
        factory=InfluenceBalancing,
        description="Tallec & Ollivier's linear system: short truncations see the wrong sign "
        "(theta* = -1/6, never resets)",
        metric="meta_loss",
        metric_label="500-step loss (last step of a 500-step unroll)",
        log_y=True,
        theta_names=("theta",),
        reference_theta=lambda task: task.optimal_theta(),
    ),
    "toy-regression": TaskEntry(
        name="toy-regression",
        factory=ToyRegression,
        description="learning-rate schedule of SGD on a 2-D function with a chaotic "
        "meta-loss (T = 100)",
        metric="meta_objective",
        metric_label="meta-objective (sum of f over T = 100 steps)",
        log_y=False,
        theta_names=("theta0 = log initial lr", "theta1 = log final lr"),
        has_surface=True,
    ),
    "lorenz": TaskEntry(
        name="lorenz",
        factory=Lorenz,
        description="identify log a and log r of a chaotic Lorenz system from its z "
        "trajectory (T = 2000)",
        metric="meta_loss",
        metric_label="mean per-step loss (z - z_true)^2 over T = 2000",
        log_y=True,
        theta_names=("log a", "log r"),
        reference_theta=lambda task: task.true_theta(),
    ),
}


def _mnist_lr_schedule(**options: Any) -> Any:
    from pes.tasks.mnist_lr_schedule import MnistLRSchedule

    return MnistLRSchedule(**options)


def _many_hyperparameters(**options: Any) -> Any:
    from pes.tasks.many_hyperparameters import ManyHyperparameters

    return ManyHyperparameters(**options)


# Task options (RunConfig fields): the image tasks' --dataset, --data-dir, --size,
# --objective; the swimmer's and gym:ENV_ID's --backend; gym:ENV_ID's --policy and
# --survival-bonus-shift and --obs-norm.
TASK_OPTIONS = ("dataset", "data_dir", "size", "objective", "backend", "policy",
                "survival_bonus_shift", "obs_norm")
_IMAGE_OPTIONS = {"dataset": "fashion-mnist", "data_dir": None, "size": "cpu"}

TASKS["mnist-lr-schedule"] = TaskEntry(
    name="mnist-lr-schedule",
    factory=_mnist_lr_schedule,
    description="learning-rate schedule lr0 / (1 + t/T)^decay of an MLP on (Fashion-)MNIST; "
    "--objective loss (mean training loss) or accuracy (minus validation accuracy)",
    metric="meta_loss",
    metric_label="meta-objective (mean training loss, or minus validation accuracy)",
    log_y=False,
    theta_names=("log lr0", "log decay"),
    options={**_IMAGE_OPTIONS, "objective": "loss"},
    estimators=("pes", "tes", "nres", "full-es", "tbptt"),
)
TASKS["many-hyperparameters"] = TaskEntry(
    name="many-hyperparameters",
    factory=_many_hyperparameters,
    description="29 hyperparameters of a 5-hidden-layer MLP on (Fashion-)MNIST: per-tensor "
    "log lr and momentum, per-layer dropout keep (mean validation loss)",
    metric="meta_loss",
    metric_label="meta-objective (mean validation loss over the run)",
    log_y=False,
    theta_names=tuple(f"theta[{i}]" for i in range(29)),
    options=dict(_IMAGE_OPTIONS),
    estimators=("pes", "tes", "nres", "full-es"),
)


def _learned_optimizer(**options: Any) -> Any:
    from pes.tasks.learned_optimizer import LearnedOptimizerTask

    return LearnedOptimizerTask(**options)


def _export_learned_optimizer(task: Any, theta: Any, run_dir: Any) -> Any:
    from pes.tasks.learned_optimizer import export_run

    return export_run(task, theta, run_dir)


TASKS["learned-optimizer"] = TaskEntry(
    name="learned-optimizer",
    factory=_learned_optimizer,
    description="meta-train a per-parameter MLP optimizer on MLP classifiers on "
    "(Fashion-)MNIST, 8x8 (--size full: 28x28); writes learned_optimizer.npz",
    metric="meta_loss",
    metric_label="meta-test loss (mean training loss over T steps, fresh inner problems)",
    log_y=False,
    theta_names=("learned-optimizer weights",),
    options=dict(_IMAGE_OPTIONS),
    estimators=("pes", "tes", "nres", "full-es"),
    export=_export_learned_optimizer,
    export_files=(LEARNED_OPTIMIZER_FILE,),
)


def _text_lstm(variant: str) -> Callable[[], Any]:
    def factory() -> Any:
        from pes.tasks.text_lstm import TextLSTM

        return TextLSTM(variant)

    return factory


# The variance study's character LSTM (5 units, T = 1000), one task name per sequence.
_TEXT_LSTM_DIM = 1238  # 4H(V + H + 1) + (H + 1)V for H = 5 units, V = 43 characters
for _suffix, _variant, _what in (("", "text", "the opening of Pride and Prejudice"),
                                 ("-random", "random", "uniformly random tokens"),
                                 ("-repeat", "repeat", "one repeated token")):
    TASKS[f"text-lstm{_suffix}"] = TaskEntry(
        name=f"text-lstm{_suffix}",
        factory=_text_lstm(_variant),
        description=f"character LSTM (5 units, 1238 weights) predicting {_what} "
        "(T = 1000; the variance study's task)",
        metric="meta_loss",
        metric_label="mean cross-entropy per character (nats)",
        log_y=False,
        theta_names=tuple(f"theta[{i}]" for i in range(_TEXT_LSTM_DIM)),
    )


def _swimmer(**options: Any) -> Any:
    from pes.tasks.swimmer import Swimmer  # imports mujoco only when the task is used

    try:
        return Swimmer(**options)
    except ImportError as e:  # mujoco, or mujoco-mjx for backend mjx, is not installed
        field_name = "backend" if options.get("backend") == "mjx" else "task"
        raise ConfigError(f"task='swimmer': {e}", field=field_name) from None


TASKS["swimmer"] = TaskEntry(
    name="swimmer",
    factory=_swimmer,
    description="MuJoCo Swimmer (gymnasium's Swimmer-v5) with a linear policy W (2 x 8), "
    "episodes of 1000 steps; rewards are maximised (PES paper, experiment 6)",
    metric="reward",
    metric_label="episode return (1000 steps, mean of 5 episodes)",
    log_y=False,
    theta_names=tuple(f"W[{a},{o}]" for a in range(2) for o in range(8)),
    options={"backend": "mujoco"},
    option_values={"backend": SWIMMER_BACKENDS},
)

TASK_NAMES = tuple(TASKS)


def check_option_value(option: str, value: Any) -> str:
    """``value`` if it is allowed for ``option``, an option whose values one task defines
    (its ``option_values``); otherwise the ConfigError naming them (e.g. 'not a known swimmer
    backend')."""
    entry = next(e for e in TASKS.values() if option in e.option_values)
    valid = entry.option_values[option]
    if not isinstance(value, str) or value not in valid:
        raise unknown_name(option, value, f"{entry.name} {option}", valid)
    return value


def export_files() -> tuple[str, ...]:
    """Every file a task's ``export`` may add to a run directory."""
    from pes.runs.gym_task import POLICY_FILE  # gym:ENV_ID tasks are registered on first use

    names = tuple(name for e in TASKS.values() for name in e.export_files)
    return names + ((POLICY_FILE,) if POLICY_FILE not in names else ())


@functools.cache
def _make_task(name: str, options: tuple[tuple[str, Any], ...] = ()) -> Any:
    # One task object per name (and options), so the jitted evaluation and estimators built
    # for it are reused.
    return TASKS[name].factory(**dict(options))


def _gym_entry(name: str) -> TaskEntry:
    """The TaskEntry of 'gym:ENV_ID' (any gymnasium environment), made on first use."""
    from pes.runs import gym_task

    env_id = name[len(gym_task.PREFIX):]
    return TaskEntry(
        name=name,
        factory=functools.partial(gym_task.make_gym_task, env_id),
        description=f"gymnasium's {env_id} with a linear or MLP policy (--policy); "
        "rewards are maximised; writes policy.npz",
        metric="return",
        metric_label="episode return (mean of 10 episodes)",
        log_y=False,
        theta_names=("policy parameters",),
        options={"policy": "linear", "survival_bonus_shift": False, "backend": "mujoco",
                 "obs_norm": False},
        option_values={"backend": SWIMMER_BACKENDS},
        export=gym_task.export_policy,
        export_files=(gym_task.POLICY_FILE,),
    )


def _user_entry(name: str) -> TaskEntry:
    """The TaskEntry of a user's factory, 'FILE.py:fn' or 'package.module:fn' (imported and
    called when the task is made: :mod:`pes.runs.user_task`)."""
    from pes.runs import user_task

    return TaskEntry(
        name=name,
        factory=functools.partial(user_task.make_user_task, name),
        description=f"your System from {name}",
        metric="meta_loss",
        metric_label="mean per-step loss of unperturbed episodes",
        log_y=False,
        theta_names=("theta",),
    )


# Task specs besides the registered names: (is it one, its TaskEntry), tried in order.
def _spec_resolvers() -> tuple[tuple[Callable[[str], bool], Callable[[str], TaskEntry]], ...]:
    from pes.runs.user_task import is_user_spec

    return ((lambda n: n.startswith("gym:") and len(n) > len("gym:"), _gym_entry),
            (is_user_spec, _user_entry))


def is_task_name(name: Any) -> bool:
    """A registered task, 'gym:ENV_ID' (any gymnasium id; checked when the task is made), or
    a user's factory 'FILE.py:fn' / 'package.module:fn' (imported when the task is made)."""
    if not isinstance(name, str):
        return False
    return name in TASKS or any(match(name) for match, _ in _spec_resolvers())


def get_task(name: str, field_name: str = "task") -> TaskEntry:
    if name not in TASKS:
        for match, entry in _spec_resolvers():
            if isinstance(name, str) and match(name):
                TASKS[name] = entry(name)
                break
    if name not in TASKS:
        raise unknown_name(field_name, name, "task", TASK_NAMES + SPEC_SHAPES)
    return TASKS[name]


SPEC_SHAPES = ("gym:ENV_ID", "FILE.py:FUNCTION", "package.module:FUNCTION")


# ------------------------------------------------------------------------------ estimators


@dataclass(frozen=True)
class EstimatorEntry:
    """An estimator on the command line.

    attr: the class's name on the ``pes`` package (looked up when needed).
    params: the constructor settings it takes, among ESTIMATOR_SETTINGS.
    defaults: constructor defaults, written into a resolved configuration when the task's
      defaults leave them out.
    needs_horizon: only meaningful on a task whose episodes end (finite horizon).
    window_within_episode: a truncation_length longer than the horizon is refused.
    """

    name: str
    attr: str
    description: str
    params: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_horizon: bool = False
    window_within_episode: bool = False

    def available(self) -> bool:
        return getattr(importlib.import_module("pes"), self.attr, None) is not None

    def cls(self) -> type:
        """The estimator class, or a ConfigError saying this installation lacks it."""
        cls = getattr(importlib.import_module("pes"), self.attr, None)
        if cls is None:
            raise ConfigError(
                f"estimator={self.name!r} needs pes.{self.attr}, which this installation of "
                f"pes does not have; available estimators: {', '.join(available_estimators())}",
                field="estimator",
            )
        return cls


_ES = ("num_particles", "sigma", "truncation_length", "normalize_losses", "stagger",
       "centered_ranks", "top_b", "reset")
_BACKPROP = ("num_particles", "truncation_length", "stagger", "reset")

ESTIMATORS: dict[str, EstimatorEntry] = {
    e.name: e
    for e in (
        EstimatorEntry("pes", "PES", "Persistent ES: unbiased ES updating every K steps, "
                       "crediting each window to the accumulated perturbations", _ES),
        EstimatorEntry("tes", "TruncatedES", "truncated ES: ES over one K-step window from an "
                       "unperturbed state (short-horizon bias)", _ES, window_within_episode=True),
        EstimatorEntry("full-es", "FullES", "ES over whole episodes from a fresh state "
                       "(unbiased, one update per episode)",
                       ("num_particles", "sigma", "normalize_losses", "centered_ranks",
                        "top_b", "reset"),
                       needs_horizon=True),
        EstimatorEntry("nres", "NRES", "noise-reuse ES: one perturbation per particle per "
                       "episode, reused in every window (unbiased)", _ES, needs_horizon=True),
        EstimatorEntry("tbptt", "TBPTT", "truncated backprop through K-step windows (biased)",
                       _BACKPROP + ("backprop_depth",), {"num_particles": 1},
                       window_within_episode=True),
        EstimatorEntry("full-bptt", "FullBPTT", "backprop through whole episodes (exact, "
                       "memory linear in T)", ("num_particles", "reset"), {"num_particles": 1},
                       needs_horizon=True),
        EstimatorEntry("rtrl", "RTRL", "real-time recurrent learning: exact forward-mode "
                       "sensitivity carried online", _BACKPROP, {"num_particles": 1}),
        EstimatorEntry("uoro", "UORO", "unbiased online recurrent optimisation: a rank-one "
                       "estimate of RTRL's sensitivity", _BACKPROP, {"num_particles": 1}),
    )
}
ESTIMATOR_NAMES = tuple(ESTIMATORS)


def get_estimator(name: str, field_name: str = "estimator") -> EstimatorEntry:
    if name not in ESTIMATORS:
        raise unknown_name(field_name, name, "estimator", ESTIMATOR_NAMES)
    return ESTIMATORS[name]


def available_estimators() -> tuple[str, ...]:
    """The estimator names whose classes this installation of pes has."""
    return tuple(name for name, e in ESTIMATORS.items() if e.available())
