"""Truncated ES: ES over one window from an unperturbed state (biased).

Each pair keeps a single unperturbed state s. A window copies s into the +/- members, steps
them K steps at theta +/- eps (eps fresh each window) and credits every step to eps alone:

    g = mean_pairs sum_j (l+_j - l-_j) eps / (2 sigma^2 K).

An extra member advances s itself at the unperturbed theta (K more inner steps per pair), so
the dependence of s on theta before the window is ignored: short-horizon bias.

Termination: the stored state waits after ``done`` (frozen, loss 0) until its slot ends at the
horizon, and the window's copies wait with it; the estimate stays the truncated (biased) one.
"""

from __future__ import annotations

import jax.numpy as jnp

from pes.estimators._particles import ESEstimator, batched_normal, per_pair, tmap


class TruncatedES(ESEstimator):
    """Truncated ES with window length K; arguments as for PES.

    Cost: with the same num_particles and truncation_length, each pair also advances its
    unperturbed state at theta, so a window costs 3 member-windows per pair instead of PES's
    2: 1.5x PES's inner steps per window (``info.inner_steps``), a little less over a run
    (about 1.47x measured), as a staggered burn-in advances one state per pair for TES and
    two for PES. Compare the two at equal inner steps (``Record.inner_steps``), not equal
    outer steps.
    """

    unperturbed_member = True

    def init_noise(self, key, theta):
        return tmap(lambda x: jnp.zeros((self.num_pairs,) + x.shape, x.dtype), theta)

    def start_window(self, noise, key, theta):
        return batched_normal(key, self.num_pairs, theta, self.sigma)

    def perturbation(self, noise):
        return noise

    def weight(self, noise, done):
        return noise

    closed_form_credit = True  # window_credit below is weight() summed over the window

    def theta_like(self, state):
        return state.noise

    def window_credit(self, noise, sums, need_W):
        """Every step is credited to eps: A = (sum_j d_j) eps, W = (active steps) eps."""
        col = lambda v, x: per_pair(v, x).astype(x.dtype)
        A = tmap(lambda e: col(sums.diff, e) * e, noise)
        W = tmap(lambda e: col(sums.steps, e) * e, noise)
        return noise, A, W
