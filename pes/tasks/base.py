"""Plain-data defaults a task carries for the outer loop (no estimator or optax import).

A task's ``defaults()`` returns a :class:`TaskDefaults`; the train layer turns it into an
estimator and an optax optimizer, e.g.::

    d = task.defaults()
    est = pes.PES(task, **d.estimator_settings("pes"))
    opt = d.optimizer_for("pes")          # OptimizerSpec(name, learning_rate, b1)
    theta = d.initial_theta()             # float32 array

``num_particles`` always counts perturbed copies of the system, so an antithetic estimator
with ``num_particles=N`` runs N/2 (+eps, -eps) pairs (the PES paper's convention for N).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

ESTIMATOR_NAMES = ("pes", "tes", "full-es", "nres", "tbptt", "full-bptt", "rtrl", "uoro")
OPTIMIZER_NAMES = ("sgd", "adam")


@dataclass(frozen=True)
class OptimizerSpec:
    """Outer optimizer: ``name`` in {'sgd', 'adam'}, ``learning_rate``, and Adam's ``b1``
    (None means the optimizer's own default, 0.9 for optax.adam; ignored for SGD).

    ``schedule``: an optional piecewise-constant learning rate, ``((boundary, scale), ...)``
    with strictly increasing positive integer boundaries and positive scales: from outer step
    ``boundary`` on (counting applied updates from 0) the rate is multiplied by ``scale``, as in
    ``optax.piecewise_constant_schedule(learning_rate, dict(schedule))`` (the follow-up's
    ``PIECEWISE_CONSTANT1e-5(1000,0.1)`` is ``OptimizerSpec('sgd', 1e-5, schedule=((1000,
    0.1),))``). Empty (the default) means a constant ``learning_rate``.
    """

    name: str
    learning_rate: float
    b1: float | None = None
    schedule: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer name={self.name!r} must be one of {OPTIMIZER_NAMES}")
        if not self.learning_rate > 0:
            raise ValueError(f"optimizer learning_rate={self.learning_rate!r} must be > 0")
        object.__setattr__(self, "schedule", _check_schedule(self.schedule))

    def boundaries_and_scales(self) -> dict[int, float]:
        """The schedule as optax.piecewise_constant_schedule's ``boundaries_and_scales``."""
        return dict(self.schedule)

    def learning_rate_at(self, step: int) -> float:
        """The rate of the update applied at outer step ``step`` (0-based)."""
        lr = self.learning_rate
        for boundary, scale in self.schedule:
            if step >= boundary:
                lr *= scale
        return lr

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "learning_rate": self.learning_rate}
        if self.b1 is not None:
            out["b1"] = self.b1
        if self.schedule:
            out["schedule"] = [list(pair) for pair in self.schedule]
        return out


def _check_schedule(schedule: Any) -> tuple[tuple[int, float], ...]:
    """``schedule`` as a tuple of (int boundary, float scale), or a ValueError."""
    try:
        pairs = [tuple(pair) for pair in schedule]
    except TypeError:
        raise ValueError(f"optimizer schedule={schedule!r} must be a sequence of "
                         "(boundary, scale) pairs") from None
    out: list[tuple[int, float]] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"optimizer schedule entry {pair!r} must be a (boundary, scale) "
                             "pair")
        boundary, scale = pair
        if isinstance(boundary, bool) or not isinstance(boundary, numbers.Integral) or boundary < 1:
            raise ValueError(f"optimizer schedule boundary {boundary!r} must be an int >= 1")
        if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                or not (math.isfinite(scale) and scale > 0)):
            raise ValueError(f"optimizer schedule scale {scale!r} must be a finite number > 0")
        if out and boundary <= out[-1][0]:
            raise ValueError(f"optimizer schedule boundaries must increase strictly, got "
                             f"{boundary} after {out[-1][0]}")
        out.append((int(boundary), float(scale)))
    return tuple(out)


@dataclass(frozen=True)
class TaskDefaults:
    """The paper's outer-loop settings for one task.

    theta0: initial theta, a float (scalar theta) or a tuple of floats (vector theta).
    num_steps: outer steps; ``num_steps_overrides`` replaces it for named estimators.
    optimizer: the outer optimizer; ``optimizer_overrides`` replaces it for named estimators.
    estimators: estimator name -> constructor settings (num_particles, sigma,
      truncation_length); only the estimators the source ran or that make sense on the task.
    theta_shape: the shape of theta when it is not that of theta0 (a matrix theta, e.g. a
      policy's weights, whose theta0 lists its entries in row-major order); None: theta0's.
    """

    theta0: float | tuple[float, ...]
    num_steps: int
    optimizer: OptimizerSpec
    # Mappings are excluded from the hash so the frozen dataclass stays hashable.
    estimators: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    optimizer_overrides: Mapping[str, OptimizerSpec] = field(default_factory=dict, hash=False)
    num_steps_overrides: Mapping[str, int] = field(default_factory=dict, hash=False)
    theta_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for what in ("estimators", "optimizer_overrides", "num_steps_overrides"):
            unknown = set(getattr(self, what)) - set(ESTIMATOR_NAMES)
            if unknown:
                raise ValueError(
                    f"{what} has unknown estimator names {sorted(unknown)}; "
                    f"known: {ESTIMATOR_NAMES}"
                )

    def initial_theta(self) -> jax.Array:
        """theta0 as a float32 array: shape () for a float, (len,) for a tuple, or
        ``theta_shape`` when set."""
        theta = jnp.asarray(self.theta0, dtype=jnp.float32)
        return theta if self.theta_shape is None else theta.reshape(self.theta_shape)

    def estimator_settings(self, name: str) -> dict[str, Any]:
        """A fresh copy of the constructor settings for estimator ``name``."""
        if name not in self.estimators:
            raise KeyError(
                f"estimator {name!r} has no defaults for this task; "
                f"available: {sorted(self.estimators)}"
            )
        return dict(self.estimators[name])

    def optimizer_for(self, name: str) -> OptimizerSpec:
        return self.optimizer_overrides.get(name, self.optimizer)

    def num_steps_for(self, name: str) -> int:
        return self.num_steps_overrides.get(name, self.num_steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for config.json)."""
        return {
            "theta0": list(self.theta0) if isinstance(self.theta0, tuple) else self.theta0,
            "num_steps": self.num_steps,
            "optimizer": self.optimizer.to_dict(),
            "estimators": {k: dict(v) for k, v in self.estimators.items()},
            "optimizer_overrides": {k: v.to_dict() for k, v in self.optimizer_overrides.items()},
            "num_steps_overrides": dict(self.num_steps_overrides),
            **({"theta_shape": list(self.theta_shape)} if self.theta_shape is not None else {}),
        }
