"""A simulator on the host (here NumPy, in float64) wrapped as a pes System and trained by PES.

The system: a damped oscillator x'' = -x - 0.1 x' + u, integrated on the host with 10
semi-implicit Euler substeps of 0.01 s per step; the policy u = clip(theta . (x, x'), -1, 1)
runs in JAX; the loss is x^2 + 0.1 u^2. What it shows (docs/environments.md):

* the simulator's state travels through JAX as the bits of its float64 numbers
  (``host.to_bits`` / ``host.from_bits``), exact whatever JAX's precision;
* the observation the policy needs is carried beside it in float32;
* ``init`` is cheap pure JAX (the reset distribution drawn in JAX, ``host.float32_to_bits64``);
* ``host.batch_callback`` calls the simulator once per step for every particle together.

Run: PYTHONPATH=. python examples/host_simulator.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes
from pes.envs import host


def simulate(sim: np.ndarray, u: np.ndarray):
    """The host side, for a whole batch: sim uint32 [B, 4] (x, v as float64 bits), u float32
    [B] -> (new sim [B, 4], observation float32 [B, 2], loss float32 [B])."""
    x, v = host.from_bits(sim).T.copy()
    u = u.astype(np.float64)
    for _ in range(10):
        v += 0.01 * (-x - 0.1 * v + u)
        x += 0.01 * v
    state = np.stack([x, v], axis=1)
    loss = x**2 + 0.1 * u**2
    return host.to_bits(state), state.astype(np.float32), loss.astype(np.float32)


class Oscillator:
    """theta: float32 [2], the feedback gains. State: {'sim': uint32 [4], 'obs': float32 [2]}."""

    horizon = 100

    def init(self, key):
        start = jax.random.uniform(key, (2,), jnp.float32, -1.0, 1.0)
        return {"sim": host.float32_to_bits64(start), "obs": start}

    def step(self, state, theta, t, key):
        u = jnp.clip(jnp.dot(theta, state["obs"]), -1.0, 1.0)   # the policy, in JAX
        sim, obs, loss = host.batch_callback(
            simulate,
            (jax.ShapeDtypeStruct((4,), jnp.uint32), jax.ShapeDtypeStruct((2,), jnp.float32),
             jax.ShapeDtypeStruct((), jnp.float32)),
            state["sim"], u)
        return {"sim": sim, "obs": obs}, loss


def main(steps: int = 60) -> None:
    system = Oscillator()
    theta = jnp.zeros(2)
    estimator = pes.PES(system, num_particles=20, sigma=0.1, truncation_length=20)
    key = jax.random.PRNGKey(0)
    before = float(pes.evaluate(system, theta, key, num_episodes=20))
    result = pes.train(estimator, theta, optax.adam(0.05), num_steps=steps, key=key)
    after = float(pes.evaluate(system, result.theta, key, num_episodes=20))
    print(f"mean loss {before:.4f} -> {after:.4f}; theta {np.round(np.asarray(result.theta), 2)}")


if __name__ == "__main__":
    main()
