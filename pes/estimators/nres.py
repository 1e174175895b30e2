"""Noise-reuse ES (NRES; Li et al., NeurIPS 2023), and its generalisation GPES-K.

Each pair draws eps ~ N(0, sigma^2 I) once per episode and steps with theta +/- eps in every
window of that episode, crediting each step to eps:

    g = mean_pairs sum_j (l+_j - l-_j) eps / (2 sigma^2 K).

A pair whose episode restarts, even mid-window, draws a new eps for the new episode. With
``noise_period = P`` a fresh eps' is also drawn whenever the episode's step index is a multiple
of P, and steps are credited to the sum of the draws of the episode so far (GPES-P): P equal to
the window length behaves like PES, P >= T (or None) is NRES.

Termination: a member whose step returns ``done`` waits (frozen, loss 0) until its pair's
episode slot ends at the horizon; the pair's eps is redrawn then. E[g] is exactly the gradient
of the smoothed L(theta) = E[sum_{t<tau} l_t] / T with staggered pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pes.estimators._particles import (
    ESEstimator,
    batched_normal,
    check_positive_int,
    select,
    tmap,
    tree_normal,
)


class NRESNoise(NamedTuple):
    """eps: [P, ...] perturbation in use; xi: [P, ...] sum of the episode's draws (credit)."""

    eps: object
    xi: object


class NRES(ESEstimator):
    """NRES with window length K; see PES for the shared arguments.

    Args:
      noise_period: None (one draw per episode) or a positive int P (redraw every P steps of
        the episode, crediting the running sum).
    """

    def __init__(self, system, *, num_particles, sigma, truncation_length, antithetic=True,
                 stagger=True, noise_period=None, normalize_losses=False, centered_ranks=False,
                 top_b=None, mesh=None, reset="slot"):
        super().__init__(system, num_particles=num_particles, sigma=sigma,
                         truncation_length=truncation_length, antithetic=antithetic,
                         stagger=stagger, normalize_losses=normalize_losses,
                         centered_ranks=centered_ranks, top_b=top_b, mesh=mesh, reset=reset)
        self.noise_period = (None if noise_period is None
                             else check_positive_int("noise_period", noise_period))

    def init_noise(self, key, theta):
        eps = batched_normal(key, self.num_pairs, theta, self.sigma)
        return NRESNoise(eps, eps)

    def perturbation(self, noise):
        return noise.eps

    def theta_like(self, state):
        return state.noise.eps

    def weight(self, noise, done):
        return noise.xi

    def after_step(self, noise, done, t, key):
        chunk = ~done
        if self.noise_period is None:
            chunk = jnp.zeros_like(done)
        else:
            chunk = chunk & (t % self.noise_period == 0)
        refresh = done | chunk

        def redraw(noise):
            new = jax.vmap(lambda k, e: tree_normal(k, e, self.sigma))(key, noise.eps)
            eps = select(refresh, new, noise.eps)
            xi = select(done, new, select(chunk, tmap(jnp.add, noise.xi, new), noise.xi))
            return NRESNoise(eps, xi)

        # Drawing is the costly part; most steps of most windows have nothing to redraw.
        return jax.lax.cond(jnp.any(refresh), redraw, lambda n: n, noise)
