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
    (None means the optimizer's own default, 0.9 for optax.adam; ignored for SGD)."""

    name: str
    learning_rate: float
    b1: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer name={self.name!r} must be one of {OPTIMIZER_NAMES}")
        if not self.learning_rate > 0:
            raise ValueError(f"optimizer learning_rate={self.learning_rate!r} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "learning_rate": self.learning_rate}
        if self.b1 is not None:
            out["b1"] = self.b1
        return out


@dataclass(frozen=True)
class TaskDefaults:
    """The paper's outer-loop settings for one task.

    theta0: initial theta, a float (scalar theta) or a tuple of floats (vector theta).
    num_steps: outer steps; ``num_steps_overrides`` replaces it for named estimators.
    optimizer: the outer optimizer; ``optimizer_overrides`` replaces it for named estimators.
    estimators: estimator name -> constructor settings (num_particles, sigma,
      truncation_length); only the estimators the source ran or that make sense on the task.
    """

    theta0: float | tuple[float, ...]
    num_steps: int
    optimizer: OptimizerSpec
    # Mappings are excluded from the hash so the frozen dataclass stays hashable.
    estimators: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    optimizer_overrides: Mapping[str, OptimizerSpec] = field(default_factory=dict, hash=False)
    num_steps_overrides: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for what in ("estimators", "optimizer_overrides", "num_steps_overrides"):
            unknown = set(getattr(self, what)) - set(ESTIMATOR_NAMES)
            if unknown:
                raise ValueError(
                    f"{what} has unknown estimator names {sorted(unknown)}; "
                    f"known: {ESTIMATOR_NAMES}"
                )

    def initial_theta(self) -> jax.Array:
        """theta0 as a float32 array: shape () for a float, (len,) for a tuple."""
        return jnp.asarray(self.theta0, dtype=jnp.float32)

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
        }
