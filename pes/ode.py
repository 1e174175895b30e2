"""Fitting the parameters of an ODE simulator (solved with diffrax) as a pes.System.

The simulator is ``dy/dt = f(y, t, theta)`` from ``y(ts[0]) = y0``, observed at the save times
``ts[1], ..., ts[T]``. One inner step integrates one interval and scores it::

    y_{t+1} = solve(f, from y_t over [ts[t], ts[t+1]])     (diffrax, with the given solver)
    l_t     = loss(y_{t+1}, observations[t], t)             (default: sum of squared errors)

so the horizon is T = len(ts) - 1 and the meta-objective is the mean per-interval loss. By
default each interval is one step of the solver (``dt0=None`` with a constant step size);
pass ``dt0`` for several constant steps per interval, or a ``stepsize_controller`` (e.g.
``diffrax.PIDController``) for adaptive steps. Each interval is integrated in its own time
frame, from 0 to ``ts[t+1] - ts[t]`` (computed in float64, then rounded once), with ``f``
seen at time ``ts[t] + s``: a uniform grid then gives every step the same dt, exactly as a
hand-written ``y + dt * f(y)`` loop does.

A diverging simulation (a solver failure, ``max_steps`` reached, inf/nan) is not raised
inside the estimator's vmap: the state turns to nan and, with ``loss_cap=c``, the loss is c
from then on (and never above c), which keeps ES estimates finite.

diffrax is an optional dependency (``pip install 'pes[ode]'``), imported when an ODE is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _diffrax():
    try:
        import diffrax
    except ImportError:
        raise ImportError("pes.ODE needs diffrax: pip install 'pes[ode]'") from None
    return diffrax


def squared_error(y: PyTree, observation: PyTree, t: Any = None) -> jax.Array:
    """sum over all leaves of (y - observation)^2: the default per-step loss."""
    del t
    parts = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), y, observation)
    return sum(jax.tree_util.tree_leaves(parts))


class ODE:
    """A pes.System: theta are the parameters of ``f``; the state is the solution y_t.

    Args:
      vector_field: ``f(y, t, theta) -> dy/dt`` (a pytree like y).
      y0: the initial state (a pytree of float arrays), or ``y0(key)`` returning one.
      ts: the save times, shape [T + 1], increasing; ts[0] is the time of y0.
      observations: a pytree whose leaves have a leading axis T: observation t is at ts[t+1].
      loss: ``loss(y, observation, t) -> scalar``; default :func:`squared_error`.
      solver: a diffrax solver (default ``diffrax.Tsit5()``).
      dt0: the solver's initial step inside an interval; None: the whole interval (one step
        with the default constant step size).
      stepsize_controller: a diffrax step-size controller (default constant).
      max_steps: solver steps allowed per interval.
      loss_cap: None, or c: a per-step loss above c or not finite counts as c.
      adjoint: a diffrax adjoint for gradient-based estimators (default diffrax's).
    """

    def __init__(self, vector_field: Callable, y0: Any, ts: Any, observations: PyTree, *,
                 loss: Callable | None = None, solver: Any = None, dt0: float | None = None,
                 stepsize_controller: Any = None, max_steps: int = 4096,
                 loss_cap: float | None = None, adjoint: Any = None):
        dfx = _diffrax()
        if not callable(vector_field):
            raise TypeError(f"ODE vector_field={vector_field!r} must be callable f(y, t, theta)")
        ts64 = np.asarray(ts, np.float64)
        if ts64.ndim != 1 or ts64.shape[0] < 2 or not np.all(np.diff(ts64) > 0):
            raise ValueError(f"ODE ts must be a 1-d increasing array of at least 2 times; got "
                             f"shape {ts64.shape}")
        self.horizon = int(ts64.shape[0] - 1)
        for path, leaf in jax.tree_util.tree_flatten_with_path(observations)[0]:
            if np.shape(leaf)[:1] != (self.horizon,):
                raise ValueError(f"ODE observations{jax.tree_util.keystr(path)} has shape "
                                 f"{np.shape(leaf)}; its leading axis must be len(ts) - 1 = "
                                 f"{self.horizon} (observation t is at ts[t + 1])")
        if loss_cap is not None and not (isinstance(loss_cap, int | float)
                                         and math.isfinite(loss_cap)):
            raise ValueError(f"ODE loss_cap={loss_cap!r} must be a finite number or None")
        self.vector_field = vector_field
        self._y0 = y0
        self.ts = jnp.asarray(ts64, jnp.float32)
        self.intervals = jnp.asarray(np.diff(ts64), jnp.float32)
        self.observations = jax.tree_util.tree_map(jnp.asarray, observations)
        self.loss = loss or squared_error
        self.solver = dfx.Tsit5() if solver is None else solver
        self.dt0 = dt0
        self.stepsize_controller = (dfx.ConstantStepSize() if stepsize_controller is None
                                    else stepsize_controller)
        self.max_steps = int(max_steps)
        self.loss_cap = loss_cap
        self.adjoint = dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
        self._term = dfx.ODETerm(lambda s, y, args: vector_field(y, args[1] + s, args[0]))

    def init(self, key: jax.Array) -> PyTree:
        y0 = self._y0(key) if callable(self._y0) else self._y0
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), y0)

    def solve(self, y: PyTree, theta: PyTree, t: jax.Array) -> PyTree:
        """y at ts[t + 1] from y at ts[t]; nan where the solver failed."""
        dfx = _diffrax()
        h = self.intervals[t]
        sol = dfx.diffeqsolve(
            self._term, self.solver, t0=jnp.zeros((), h.dtype), t1=h,
            dt0=h if self.dt0 is None else self.dt0, y0=y, args=(theta, self.ts[t]),
            saveat=dfx.SaveAt(t1=True), stepsize_controller=self.stepsize_controller,
            max_steps=self.max_steps, adjoint=self.adjoint, throw=False)
        ok = sol.result == dfx.RESULTS.successful
        return jax.tree_util.tree_map(lambda a: jnp.where(ok, a[-1], jnp.nan), sol.ys)

    def step(self, y: PyTree, theta: PyTree, t: jax.Array, key: jax.Array):
        del key
        y = self.solve(y, theta, t)
        obs = jax.tree_util.tree_map(lambda o: o[t], self.observations)
        loss = jnp.asarray(self.loss(y, obs, t))
        if loss.shape != ():
            raise ValueError(f"ODE loss(y, observation, t) must return a scalar; got shape "
                             f"{loss.shape}")
        if self.loss_cap is not None:
            cap = jnp.asarray(self.loss_cap, loss.dtype)
            loss = jnp.where(jnp.isfinite(loss), jnp.minimum(loss, cap), cap)
        return y, loss

    def trajectory(self, theta: PyTree, key: jax.Array | None = None) -> PyTree:
        """The solution at ts[1:], leaves with a leading axis T (from init(key))."""
        y0 = self.init(jax.random.PRNGKey(0) if key is None else key)

        def body(y, t):
            y = self.solve(y, theta, t)
            return y, y

        return jax.lax.scan(body, y0, jnp.arange(self.horizon, dtype=jnp.int32))[1]

    def __repr__(self) -> str:
        return (f"ODE(horizon={self.horizon}, solver={type(self.solver).__name__}, "
                f"dt0={self.dt0}, loss_cap={self.loss_cap})")
