"""Persistent Evolution Strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each pair keeps its own persistent inner states (one per member) and the accumulator xi, the
sum of every perturbation its current episode has been stepped with. A window draws
eps ~ N(0, sigma^2 I), steps the members at theta +/- eps and credits step j's loss difference
to xi + eps; steps of an episode that began inside the window are credited to eps alone:

    g = mean_pairs sum_j (l+_j - l-_j) w_j / (2 sigma^2 K),  w_j = xi + eps or eps.

The step that ends an episode belongs to the old episode and is weighted by the old
accumulator. E[g] is the gradient of the Gaussian-smoothed mean per-step loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pes.estimators._particles import ESEstimator, batched_normal, select, tmap


class PESNoise(NamedTuple):
    """xi: [P, ...] perturbations of the pair's episode before this window; eps: [P, ...] this
    window's perturbation; stepped: [P] bool, the current episode has stepped with eps."""

    xi: object
    eps: object
    stepped: jax.Array


class PES(ESEstimator):
    """PES with ``num_particles`` (= 2 x pairs when antithetic) particles and window length K.

    Args:
      system: a pes.System.
      num_particles: number of particles N (even when antithetic).
      sigma: standard deviation of the Gaussian perturbation.
      truncation_length: K, inner steps per window (per estimate).
      antithetic: +/- pairs sharing keys; otherwise plain Monte Carlo with a leave-one-out
        mean-loss baseline.
      mesh: optional jax.sharding.Mesh; the pairs are sharded over all its devices.
      stagger: burn each pair in to a uniform random step of its episode, stepping with a
        perturbation that is kept in xi, so that the first estimate is already unbiased.
    """

    def init_noise(self, key, theta):
        zeros = tmap(lambda x: jnp.zeros((self.num_pairs,) + x.shape, x.dtype), theta)
        return PESNoise(zeros, zeros, jnp.zeros((self.num_pairs,), bool))

    def start_window(self, noise, key, theta):
        eps = batched_normal(key, self.num_pairs, theta, self.sigma)
        return PESNoise(noise.xi, eps, jnp.zeros_like(noise.stepped))

    def perturbation(self, noise):
        return noise.eps

    def weight(self, noise, done):
        return tmap(jnp.add, noise.xi, noise.eps)

    def after_step(self, noise, done, t, key):
        # A new episode has seen no perturbation yet; it starts stepping with eps next step.
        xi = select(done, tmap(jnp.zeros_like, noise.xi), noise.xi)
        return PESNoise(xi, noise.eps, ~done)

    def end_window(self, noise):
        xi = select(noise.stepped, tmap(jnp.add, noise.xi, noise.eps), noise.xi)
        return PESNoise(xi, noise.eps, noise.stepped)
