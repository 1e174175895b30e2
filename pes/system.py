"""The System protocol: an unrolled computation graph with outer parameters theta.

A System is any object with

* ``horizon``: ``int`` steps per episode (T), or ``None`` for a system that never resets;
* ``init(key) -> state``: a fresh inner state s_0 (any pytree of arrays);
* ``step(state, theta, t, key) -> (state, loss)``: one inner step s_{t+1} = f(s_t, theta, t)
  and its scalar loss l_t. ``t`` is the step index inside the episode (an int32 scalar) and
  ``key`` carries all of the step's randomness (minibatches included).
* or ``step(...) -> (state, loss, done)``: ``done`` (a bool scalar) says the episode ended with
  this step (its loss counts); the particle's next episode starts from ``init``. ``horizon`` is
  then the maximum episode length (``None``: no limit).

``init`` must be cheap, pure JAX: the estimators call it (under vmap, on every step of a small
state) to reset particles by selection.

The meta-objective is the mean per-step loss of an episode, L(theta) = E[sum_{t<tau} l_t] / T,
tau <= T the episode's length (T without termination: the mean of l_t). See
docs/termination.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@runtime_checkable
class System(Protocol):
    """An unrolled computation graph: ``s_{t+1}, l_t = step(s_t, theta, t, key)``."""

    horizon: int | None

    def init(self, key: jax.Array) -> PyTree: ...

    def step(
        self, state: PyTree, theta: PyTree, t: jax.Array, key: jax.Array
    ) -> tuple[PyTree, jax.Array]: ...


def check_system(system: Any) -> int | None:
    """Validate the shape of a System object and return its horizon.

    Raises ``TypeError`` naming what is missing, ``ValueError`` for a bad horizon.
    """
    missing = [
        name
        for name in ("init", "step")
        if not callable(getattr(system, name, None))
    ]
    if not hasattr(system, "horizon"):
        missing.append("horizon")
    if missing:
        raise TypeError(
            f"system={type(system).__name__!r} is not a pes.System: it lacks "
            f"{', '.join(missing)} (a System needs `horizon`, `init(key)` and "
            "`step(state, theta, t, key)`)"
        )
    horizon = system.horizon
    if horizon is None:
        return None
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer):
        raise TypeError(
            f"system.horizon={horizon!r} must be a positive int or None (never resets)"
        )
    if horizon < 1:
        raise ValueError(f"system.horizon={horizon} must be >= 1 (or None for no resets)")
    return int(horizon)


def check_theta(theta: PyTree, name: str = "theta") -> PyTree:
    """Return theta with every leaf as a floating JAX array; reject integer or empty leaves."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(theta)
    if not leaves:
        raise ValueError(f"{name} has no array leaves; it must be a pytree of float arrays")
    out = []
    for path, leaf in leaves:
        where = f"{name}{jax.tree_util.keystr(path)}"
        if isinstance(leaf, bool | np.bool_) or (
            hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.bool_)
        ):
            raise TypeError(f"{where} is boolean; theta leaves must be float arrays")
        if isinstance(leaf, int | np.integer) or (
            hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{where}={leaf!r} has an integer dtype; theta leaves must be float arrays "
                "(write 1.0, not 1)"
            )
        arr = jnp.asarray(leaf)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{where} has dtype {arr.dtype}; theta leaves must be float arrays")
        out.append(arr)
    return jax.tree_util.tree_unflatten(treedef, out)


# (system, theta's structure, shapes and dtypes, key's shape and dtype) -> whether step returns
# done: the checks passed for these. Tracing a step again costs more than a whole chunk of
# cheap outer steps, and every estimator init (so every pes.train call) checks.
_STEP_CHECKS: dict[tuple, bool] = {}
_MAX_STEP_CHECKS = 64


def check_step_output(system: Any, theta: PyTree, key: jax.Array) -> bool:
    """Trace ``system.init`` and one ``system.step`` abstractly and check what step returns:
    ``(state, loss)`` or ``(state, loss, done)`` with a float scalar loss, a bool (or int)
    scalar done, and a state of init's structure whose leaves keep their shapes and dtypes.

    Returns whether the step returns ``done`` (the system can end an episode early). Raises
    TypeError/ValueError naming the offending part. A check passed once is remembered for
    the same (hashable) system and the same shapes and dtypes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    spec = (system, treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves),
            jnp.shape(key), jnp.result_type(key))
    try:
        return _STEP_CHECKS[spec]
    except (KeyError, TypeError, ValueError):  # an unhashable system: checked every time
        pass
    has_done = _check_step_output(system, theta, key)
    try:
        if len(_STEP_CHECKS) >= _MAX_STEP_CHECKS:
            _STEP_CHECKS.clear()
        _STEP_CHECKS[spec] = has_done
    except (TypeError, ValueError):
        pass
    return has_done


def _check_step_output(system: Any, theta: PyTree, key: jax.Array) -> bool:
    name = type(system).__name__
    state = jax.eval_shape(system.init, key)
    out = jax.eval_shape(system.step, state, theta, jnp.zeros((), jnp.int32), key)
    if not (isinstance(out, tuple) and len(out) in (2, 3)):
        raise TypeError(
            f"{name}.step must return (next_state, loss) or (next_state, loss, done); got {out!r}"
        )
    next_state, loss = out[:2]
    if getattr(loss, "shape", None) != ():
        raise ValueError(
            f"{name}.step returned loss of shape {getattr(loss, 'shape', loss)}; "
            "the loss must be a scalar"
        )
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"{name}.step returned loss of dtype {loss.dtype}; it must be float")
    if len(out) == 3:
        done = out[2]
        dtype = getattr(done, "dtype", None)
        if getattr(done, "shape", None) != () or not (
                jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"{name}.step returned done={done!r}; done must be a bool (or int) scalar: "
                "True when the episode ended with this step"
            )
    _check_same_state(name, state, next_state)
    return len(out) == 3


def _check_same_state(name: str, state: PyTree, next_state: PyTree) -> None:
    """The state step returns must have init's structure, leaf shapes and dtypes."""
    s_in = jax.tree_util.tree_structure(state)
    s_out = jax.tree_util.tree_structure(next_state)
    if s_in != s_out:
        raise ValueError(f"{name}.step changed the state's structure from {s_in} to {s_out}")
    pairs = zip(jax.tree_util.tree_flatten_with_path(state)[0],
                jax.tree_util.tree_leaves(next_state), strict=True)
    for (path, a), b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{name}.step changed state{jax.tree_util.keystr(path)} from "
                f"{a.dtype}{list(a.shape)} (as init returns it) to {b.dtype}{list(b.shape)}; "
                "step must keep every leaf's shape and dtype"
            )


def tree_shapes_match(a: PyTree, b: PyTree) -> bool:
    """True when two pytrees have the same structure and leaf shapes."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(
        jnp.shape(x) == jnp.shape(y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def step_key(key: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a per-episode key into (step key, reset/init key) for step ``t``."""
    k = jax.random.fold_in(key, t)
    return tuple(jax.random.split(k))  # type: ignore[return-value]


def unroll(
    system: Any, theta: PyTree, key: jax.Array, num_steps: int, state: PyTree | None = None
) -> tuple[PyTree, jax.Array]:
    """Run one unperturbed episode of ``num_steps`` steps from a fresh (or given) state.

    Returns (final_state, losses[num_steps]). Differentiable in theta, so
    ``jax.grad(lambda th: unroll(system, th, key, T)[1].mean())`` is full backprop.
    When num_steps exceeds ``system.horizon``, ``t`` restarts at 0 after each episode with a
    fresh state, as in training; the final state is that of the last step taken.
    """
    k_init, k_steps = jax.random.split(key)
    s0 = system.init(k_init) if state is None else state
    horizon = system.horizon
    t0 = jnp.zeros((), jnp.int32)
    out = jax.eval_shape(system.step, s0, theta, t0, k_init)
    if len(out) == 3:
        return _unroll_terminating(system, theta, k_steps, num_steps, s0)

    # Resets only where a later step needs the fresh state: a single episode never resets
    # (so the final state is the trained one), and no init runs on every step under vmap.
    resets = horizon is not None and num_steps > horizon

    def body(carry, j):
        s, t = carry
        k_step, k_reset = step_key(k_steps, j)
        s, loss = system.step(s, theta, t, k_step)
        t = t + 1
        if resets:
            done = (t >= horizon) & (j < num_steps - 1)
            s = jax.lax.cond(done, lambda: system.init(k_reset), lambda: s)
            t = jnp.where(done, 0, t)
        return (s, t), loss

    (s, _), losses = jax.lax.scan(body, (s0, t0), jnp.arange(num_steps, dtype=jnp.int32))
    return s, losses


def _unroll_terminating(system, theta, k_steps, num_steps, s0):
    """unroll for a step returning (state, loss, done): after ``done`` the episode waits, its
    state kept and its losses 0, until t reaches the horizon (then a fresh state); without a
    horizon the next step starts a fresh episode at once. The final state is that of the last
    step taken."""
    horizon = system.horizon

    def body(carry, j):
        s, t, ended = carry
        k_step, k_reset = step_key(k_steps, j)
        new_s, loss, done = system.step(s, theta, t, k_step)
        s = jax.tree_util.tree_map(lambda a, b: jnp.where(ended, a, b), s, new_s)
        loss = jnp.where(ended, jnp.zeros_like(loss), loss)
        ended = ended | jnp.asarray(done).astype(bool)
        t = t + 1
        slot_end = ended if horizon is None else t >= horizon
        restart = slot_end & (j < num_steps - 1)
        s = jax.lax.cond(restart, lambda: system.init(k_reset), lambda: s)
        return (s, jnp.where(slot_end, 0, t), ended & ~slot_end), loss

    carry = (s0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    (s, _, _), losses = jax.lax.scan(body, carry, jnp.arange(num_steps, dtype=jnp.int32))
    return s, losses


_EVAL_CACHE: dict[tuple, tuple[Any, Callable]] = {}


def evaluate(
    system: Any,
    theta: PyTree,
    key: jax.Array,
    num_episodes: int = 1,
    eval_steps: int | None = None,
) -> jax.Array:
    """Meta-objective of fresh, unperturbed episodes: mean over episodes and steps of l_t.

    Args:
      system: a pes.System.
      theta: outer parameters (pytree of float arrays).
      key: PRNG key; episode i uses ``split(key, num_episodes)[i]``.
      num_episodes: number of independent episodes averaged.
      eval_steps: steps per episode; defaults to ``system.horizon`` and is required when the
        horizon is None.

    Returns a float scalar.

    Examples:
        A state that shrinks by theta each step, with loss s^2: at theta = 0.5 the losses are
        0.25, 0.25^2, ..., and their mean over T = 10 steps is about 1/30.

        >>> import jax, jax.numpy as jnp, pes
        >>> class Decay:
        ...     horizon = 10
        ...     def init(self, key):
        ...         return jnp.float32(1.0)
        ...     def step(self, s, theta, t, key):
        ...         s = theta * s
        ...         return s, s**2
        >>> round(float(pes.evaluate(Decay(), jnp.float32(0.5), jax.random.PRNGKey(0))), 4)
        0.0333
    """
    horizon = check_system(system)
    if eval_steps is None:
        if horizon is None:
            raise ValueError(
                "eval_steps is required to evaluate a system with horizon=None (it never ends)"
            )
        eval_steps = horizon
    check_positive_ints(eval_steps=eval_steps, num_episodes=num_episodes)
    theta = check_theta(theta)

    def build():
        def run(theta, key):
            keys = jax.random.split(key, num_episodes)
            losses = jax.vmap(lambda k: unroll(system, theta, k, eval_steps)[1])(keys)
            return losses.mean()
        return jax.jit(run)

    return cached_program(_EVAL_CACHE, system, (num_episodes, eval_steps), build)(theta, key)


def check_positive_ints(**values: Any) -> None:
    """Raise ValueError naming the first of ``values`` that is not a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


def cached_program(cache: dict, system: Any, settings: tuple, build: Callable) -> Callable:
    """``build()``'s compiled program for (system, settings), built once and kept in ``cache``.

    Keyed on ``id(system)``; the entry holds the system, so that id is not reused while the
    entry lives, and a different object with a recycled id is a miss.
    """
    key = (id(system), *settings)
    hit = cache.get(key)
    if hit is None or hit[0] is not system:
        if len(cache) > 64:
            cache.clear()
        hit = cache[key] = (system, build())
    return hit[1]


# ----------------------------------------------------------------------------- running statistics
#
# An optional System hook (ARS's observation normalisation): a System with a ``running_stats``
# attribute (not None) keeps statistics of a per-step quantity inside theta. The hook object has
#
# * ``observe(state) -> x``: the quantity (a pytree of float arrays) of the state a step starts
#   from; the ES estimators collect it over every member-step actually taken in a window and
#   report the window's Moments in ``EstimateInfo.observed``;
# * ``get(theta) -> Moments`` and ``put(theta, moments) -> theta``: where in theta the
#   statistics live. Those entries of theta are never perturbed by ES noise and never moved by
#   the optimizer: ``pes.train`` replaces them after every outer step by the merge of the
#   old statistics with the window's (:func:`merge_moments`).


class Moments(NamedTuple):
    """Running moments of a per-step quantity x (a pytree).

    count: float32 scalar, the samples seen.  mean: x's structure, their mean.
    m2: x's structure, the sum of squared deviations from the mean (variance = m2 / count).
    """

    count: jax.Array
    mean: PyTree
    m2: PyTree


def running_stats(system: Any) -> Any:
    """The System's running-statistics hook (see above), or None."""
    return getattr(system, "running_stats", None)


def zero_moments(like: PyTree) -> Moments:
    """Moments of no samples, with x's structure (``like``: arrays or ShapeDtypeStructs)."""
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like)
    return Moments(jnp.zeros((), jnp.float32), zeros, zeros)


def masked_moments(x: PyTree, mask: jax.Array) -> Moments:
    """Moments of the samples x[i] with mask[i] (x's leaves [*mask.shape, ...]): two passes
    (mean, then squared deviations), which keeps float32 exact enough where the mean is large
    against the spread."""
    n = jnp.sum(mask).astype(jnp.float32)
    safe = jnp.maximum(n, 1.0)
    axes = tuple(range(mask.ndim))

    def kept(v):  # a select, not a product: a NaN left out stays out
        return jnp.where(mask.reshape(mask.shape + (1,) * (v.ndim - mask.ndim)), v, 0.0)

    mean = jax.tree_util.tree_map(lambda v: jnp.sum(kept(v), axes) / safe, x)
    m2 = jax.tree_util.tree_map(lambda v, m: jnp.sum(kept(jnp.square(v - m)), axes), x, mean)
    return Moments(n, mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two sample sets (Chan, Golub and LeVeque's parallel update):
    n = n_a + n_b, mean = mean_a + d n_b / n, m2 = m2_a + m2_b + d^2 n_a n_b / n with
    d = mean_b - mean_a. With n_b = 0 the result is ``a``."""
    n = a.count + b.count
    safe = jnp.maximum(n, 1.0)
    frac = b.count / safe
    cross = a.count * frac

    def mean(ma, mb):
        return jnp.where(b.count > 0, ma + (mb - ma) * frac, ma)

    def m2(sa, sb, ma, mb):
        return jnp.where(b.count > 0, sa + sb + jnp.square(mb - ma) * cross, sa)

    return Moments(n, jax.tree_util.tree_map(mean, a.mean, b.mean),
                   jax.tree_util.tree_map(m2, a.m2, b.m2, a.mean, b.mean))
