"""The outer loop: an estimator's gradients fed to any optax optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes.estimators._particles import check_positive_int
from pes.system import PyTree, check_theta, evaluate


class Record(NamedTuple):
    """One outer step of training.

    step: outer steps taken so far (0 for the evaluation before training).
    inner_steps: inner ``system.step`` calls so far, burn-in included.
    loss: the window's mean per-step loss (None at step 0).
    meta_objective: the evaluation at this step, None when not evaluated.
    """

    step: int
    inner_steps: int
    loss: float | None
    meta_objective: float | None


class History(list):
    """The list of Records of a run, with ``column(name)`` as a float numpy array (None->nan)."""

    def column(self, name: str) -> np.ndarray:
        if name not in Record._fields:
            raise KeyError(f"{name!r} is not a Record field; fields are {Record._fields}")
        return np.array([np.nan if (v := getattr(r, name)) is None else v for r in self],
                        dtype=float)

    def evaluated(self) -> list[Record]:
        return [r for r in self if r.meta_objective is not None]


class TrainResult(NamedTuple):
    theta: PyTree
    history: History


class NonFiniteGradientError(FloatingPointError):
    """The estimator returned a NaN or inf gradient; theta was not updated with it.

    Attributes: step (the outer step that failed, 1-based), theta (the last good theta),
    loss (that window's loss).
    """

    def __init__(self, message: str, step: int, theta: PyTree, loss: float):
        super().__init__(message)
        self.step, self.theta, self.loss = step, theta, loss


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def train(
    estimator: Any,
    theta: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    key: jax.Array,
    eval_every: int | None = None,
    callback: Callable[[Record, PyTree], Any] | None = None,
    evaluate_fn: Callable[[PyTree, jax.Array], Any] | None = None,
    eval_episodes: int = 1,
    eval_steps: int | None = None,
) -> TrainResult:
    """Minimise the mean per-step loss: theta <- optimizer(estimator's gradient), num_steps times.

    Args:
      estimator: any pes estimator (``init(key, theta)``, ``estimate(state, theta, key)``).
      theta: initial outer parameters, a pytree of float arrays.
      optimizer: an optax GradientTransformation (it receives the gradient of a loss).
      num_steps: outer steps (one estimate each).
      key: PRNG key; the run is a deterministic function of it.
      eval_every: evaluate the meta-objective before training, every this many steps and at the
        end; None never evaluates.
      callback: called as ``callback(record, theta)`` after every outer step; returning True
        stops training early.
      evaluate_fn: ``(theta, key) -> scalar`` used for evaluation; by default
        ``pes.evaluate(estimator.system, theta, key, eval_episodes, eval_steps)``.

    Returns TrainResult(theta, history). Raises NonFiniteGradientError (naming the outer step)
    instead of applying a NaN or inf gradient.
    """
    num_steps = check_positive_int("num_steps", num_steps)
    if eval_every is not None:
        eval_every = check_positive_int("eval_every", eval_every)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer={optimizer!r} must be an optax.GradientTransformation, "
            "e.g. optax.adam(1e-2)"
        )
    theta = check_theta(theta)
    if evaluate_fn is None:
        system = estimator.system

        def evaluate_fn(theta, key):
            return evaluate(system, theta, key, num_episodes=eval_episodes, eval_steps=eval_steps)

    @jax.jit
    def update(theta, opt_state, grad):
        finite = _all_finite(grad)
        updates, new_opt_state = optimizer.update(grad, opt_state, theta)
        new_theta = optax.apply_updates(theta, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        return (jax.tree_util.tree_map(keep, new_theta, theta),
                jax.tree_util.tree_map(keep, new_opt_state, opt_state), finite)

    k_init, k_train, k_eval = jax.random.split(key, 3)
    state = estimator.init(k_init, theta)
    opt_state = optimizer.init(theta)
    history = History()
    inner_steps = 0

    def evaluation(step):
        return float(evaluate_fn(theta, jax.random.fold_in(k_eval, step)))

    if eval_every is not None:
        history.append(Record(0, 0, None, evaluation(0)))
    for step in range(1, num_steps + 1):
        grad, state, info = estimator.estimate(state, theta, jax.random.fold_in(k_train, step))
        theta, opt_state, finite = update(theta, opt_state, grad)
        loss = float(info.loss)
        if not bool(finite):
            raise NonFiniteGradientError(
                f"non-finite gradient at outer step {step} (window loss {loss}); theta was not "
                "updated with it and holds the value from the step before",
                step, theta, loss,
            )
        inner_steps += int(info.inner_steps)
        meta = None
        if eval_every is not None and (step % eval_every == 0 or step == num_steps):
            meta = evaluation(step)
        record = Record(step, inner_steps, loss, meta)
        history.append(record)
        if callback is not None and callback(record, theta) is True:
            break
    return TrainResult(theta, history)
