"""Toy 2D regression with a chaotic meta-loss (PES paper, experiment 2).

Inner problem: plain SGD on
``f(x) = sqrt(x0^2 + 5) - sqrt(5) + sin(x1)^2 exp(-5 x0^2) + 0.25 |x1 - 100|`` from x = (1, 1)
for T = 100 steps, with the linear schedule ``lr_t = e^theta0 (T-t)/T + e^theta1 t/T``::

    x_{t+1} = x_t - lr_t * grad f(x_t),      l_t = f(x_{t+1})

The loss is taken *after* the update, as in the paper's code; that reproduces its numbers
(sum of l_t: 2487.8 at theta = (-4, -4), about 557 in the good region theta0 ~ 2.85) whereas
f before the update gives 2487.9 and 581. pes optimises the mean per-step loss; the paper
reports the sum, ``meta_objective = T * mean``.

grad f is bounded (|df/dx0| <= 1 + sqrt(10/e) ~ 2.92, |df/dx1| <= 1.25), so even lr = e^5
moves x a bounded distance per step and nothing overflows: the meta-objective is finite on
all of [-5, 5]^2 (checked on a 51 x 51 grid: 560 to 7671).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from pes.system import unroll
from pes.tasks.base import OptimizerSpec, TaskDefaults


def inner_loss(x: jax.Array) -> jax.Array:
    """f(x) for x of shape (2,); a float scalar."""
    return (
        jnp.sqrt(x[0] ** 2 + 5.0)
        - jnp.sqrt(5.0)
        + jnp.sin(x[1]) ** 2 * jnp.exp(-5.0 * x[0] ** 2)
        + 0.25 * jnp.abs(x[1] - 100.0)
    )


@dataclass(frozen=True)
class ToyRegression:
    """State: x, shape (2,) float32. theta: (log initial lr, log final lr), shape (2,)."""

    horizon: int = 100
    x0: tuple[float, float] = (1.0, 1.0)

    def init(self, key: jax.Array) -> jax.Array:
        del key  # deterministic start
        return jnp.asarray(self.x0, jnp.float32)

    def learning_rate(self, theta: jax.Array, t: jax.Array) -> jax.Array:
        frac = t / self.horizon
        return jnp.exp(theta[0]) * (1.0 - frac) + jnp.exp(theta[1]) * frac

    def step(self, state, theta, t, key):
        del key
        x = state - self.learning_rate(theta, t) * jax.grad(inner_loss)(state)
        return x, inner_loss(x)

    def meta_objective(self, theta: jax.Array) -> jax.Array:
        """The paper's meta-objective: sum of f over one episode (= horizon * mean loss)."""
        return _meta_objective(self, jnp.asarray(theta, jnp.float32))

    def surface(self, theta0_grid: jax.Array, theta1_grid: jax.Array) -> jax.Array:
        """meta_objective on a grid: out[i, j] at theta = (theta0_grid[i], theta1_grid[j]).

        Shape (len(theta0_grid), len(theta1_grid)); one jitted vmap over both axes. Where the
        inner run is chaotic (theta0 or theta1 >~ 1) values are float32-rounding sensitive: the
        same theta evaluated unbatched can differ by up to ~12%; the landscape is what counts.
        """
        g0 = jnp.asarray(theta0_grid, jnp.float32)
        g1 = jnp.asarray(theta1_grid, jnp.float32)
        return _surface(self, g0, g1)

    def evaluate(self, theta, key: jax.Array) -> dict[str, jax.Array]:
        """{'meta_loss': mean per-step loss of one episode, 'meta_objective': its sum (the
        paper's scale)}. The episode is deterministic; ``key`` is accepted for the API."""
        _, losses = unroll(self, theta, key, self.horizon)
        return {"meta_loss": losses.mean(), "meta_objective": losses.sum()}

    def defaults(self) -> TaskDefaults:
        """PES paper: K=10, N=100, sigma=0.3 (TES 1.0), Adam lr 1e-2 with b1=0.99, from
        theta=(-4, -4). NRES and full ES reuse PES's N and sigma (not in the paper). 5000 outer
        steps: our own choice; a lockstep PES reaches the good region in 1000-2000 steps."""
        es = {"num_particles": 100, "sigma": 0.3}
        return TaskDefaults(
            theta0=(-4.0, -4.0),
            num_steps=5000,
            optimizer=OptimizerSpec("adam", 1e-2, b1=0.99),
            estimators={
                "pes": {**es, "truncation_length": 10},
                "tes": {"num_particles": 100, "sigma": 1.0, "truncation_length": 10},
                "nres": {**es, "truncation_length": 10},
                "full-es": dict(es),
                "tbptt": {"truncation_length": 10},
                "rtrl": {"truncation_length": 10},
                "uoro": {"truncation_length": 10},
                "full-bptt": {},
            },
        )


@partial(jax.jit, static_argnums=0)
def _meta_objective(task: ToyRegression, theta: jax.Array) -> jax.Array:
    return unroll(task, theta, jax.random.PRNGKey(0), task.horizon)[1].sum()


@partial(jax.jit, static_argnums=0)
def _surface(task: ToyRegression, g0: jax.Array, g1: jax.Array) -> jax.Array:
    one = lambda a, b: unroll(task, jnp.stack([a, b]), jax.random.PRNGKey(0), task.horizon)[1].sum()
    return jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))(g0, g1)
