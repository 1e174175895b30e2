"""Influence balancing (Tallec & Ollivier 2017; PES paper, experiment 1).

A linear system whose short-horizon gradient has the wrong sign::

    s_{t+1} = A s_t + theta * c,      l_t = 0.5 * (s_{t+1}[0] - 1)^2

with A = 0.5 I + 0.5 U (U: ones on the superdiagonal), c = (+1 x 10, -1 x 13), s_0 = ones,
scalar theta from 0.5, and no resets (horizon None). Unrolled from s_0, s_t[0] tends to
theta * S_inf with S_inf = sum_j (A^j c)_0 = 2 * sum_i c_i = -6, so theta* = -1/6 drives the
long-run loss to 0. The truncated sum S_K = sum_{j<K} (A^j c)_0 is +1 at K=1 and +10 at K=10:
a K-step method sees dl/dtheta ~ (s[0] - 1) * S_K, the wrong sign for short K.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pes.system import unroll
from pes.tasks.base import OptimizerSpec, TaskDefaults


@dataclass(frozen=True)
class InfluenceBalancing:
    """State: s, shape (n,) float32. theta: shape () float32. Loss on the new state.

    Evaluation (``evaluate``): ``meta_loss`` is the loss at the *final* step of an
    ``eval_steps``-step (500) unroll from s_0, as the paper's code logged it ("long unroll
    loss"); it goes to ~0 at theta*. ``mean_loss`` is the mean per-step loss of that unroll
    (what ``pes.evaluate(task, theta, key, eval_steps=500)`` returns): it includes the
    transient from s_0 = ones, so it is 0.131 at theta* and is smallest (0.102) near -0.129.
    """

    n: int = 23
    num_positive: int = 10
    eval_steps: int = 500
    horizon = None  # never resets; a class attribute, not a field

    def signs(self) -> jax.Array:
        """c: +1 on the first ``num_positive`` coordinates, -1 on the rest, shape (n,)."""
        return jnp.where(jnp.arange(self.n) < self.num_positive, 1.0, -1.0).astype(jnp.float32)

    def init(self, key: jax.Array) -> jax.Array:
        del key  # deterministic start
        return jnp.ones((self.n,), jnp.float32)

    def step(self, state, theta, t, key):
        del t, key
        # A s without building A: 0.5 s_i + 0.5 s_{i+1}, with s_n := 0.
        shifted = jnp.concatenate([state[1:], jnp.zeros((1,), state.dtype)])
        s = 0.5 * state + 0.5 * shifted + theta * self.signs()
        return s, 0.5 * (s[0] - 1.0) ** 2

    def truncated_sensitivity(self, K: int) -> float:
        """S_K = sum_{j<K} (A^j c)_0 in float64: ds_K[0]/dtheta for a K-step window from a
        theta-independent state."""
        a = 0.5 * np.eye(self.n) + 0.5 * np.eye(self.n, k=1)
        v = np.where(np.arange(self.n) < self.num_positive, 1.0, -1.0)
        total = 0.0
        for _ in range(K):
            total += v[0]
            v = a @ v
        return float(total)

    def optimal_theta(self) -> float:
        """theta* = 1 / S_inf, with S_inf = 2 * sum(c) (closed form of the Neumann series)."""
        return 1.0 / (2.0 * (2 * self.num_positive - self.n))

    def evaluate(self, theta, key: jax.Array) -> dict[str, jax.Array]:
        """{'meta_loss': final-step loss, 'mean_loss': mean per-step loss} of a fresh
        ``eval_steps`` unroll at theta. Jittable."""
        _, losses = unroll(self, theta, key, self.eval_steps)
        return {"meta_loss": losses[-1], "mean_loss": losses.mean()}

    def defaults(self) -> TaskDefaults:
        """PES paper code: N=1000, sigma=0.1, K=1, SGD 1e-4, 3000 outer steps.

        TBPTT was also run with K = 10 and 100 (pass truncation_length to override);
        the paper's code ran UORO with lr 1e-5. Full-episode methods (full-es, nres,
        full-bptt) need a finite horizon and are left out.
        """
        particles = {"num_particles": 1000, "sigma": 0.1, "truncation_length": 1}
        return TaskDefaults(
            theta0=0.5,
            num_steps=3000,
            optimizer=OptimizerSpec("sgd", 1e-4),
            estimators={
                "pes": dict(particles),
                "tes": dict(particles),
                "tbptt": {"truncation_length": 1},
                "rtrl": {"truncation_length": 1},
                "uoro": {"truncation_length": 1},
            },
            optimizer_overrides={"uoro": OptimizerSpec("sgd", 1e-5)},
        )
