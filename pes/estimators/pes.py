"""Persistent Evolution Strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each pair keeps its own persistent inner states (one per member) and the accumulator xi, the
sum of every perturbation its current episode has been stepped with. A window draws
eps ~ N(0, sigma^2 I), steps the members at theta +/- eps and credits step j's loss difference
to xi + eps; steps of an episode that began inside the window are credited to eps alone:

    g = mean_pairs sum_j (l+_j - l-_j) w_j / (2 sigma^2 K),  w_j = xi + eps or eps.

The step that ends an episode belongs to the old episode and is weighted by the old
accumulator. E[g] is the gradient of the Gaussian-smoothed mean per-step loss.

The credit of a whole window is one function, :func:`pes_credit`; the per-step hooks
(``weight``, ``after_step``) are its step-by-step reference, run only by subclasses that set
``closed_form_credit = False``.

Termination (a step returning ``done``): a member whose episode ends waits, frozen with loss
0, until its pair's episode slot ends at the horizon T, so both members and xi stay in the
same slot. E[g] is then exactly the gradient of the smoothed L(theta) = E[sum_{t<tau} l_t] / T
(staggered, or averaged over the T/K windows of a lockstep cycle).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pes.estimators._particles import (
    ESEstimator,
    WindowSums,
    batched_normal,
    per_pair,
    select,
    tmap,
)


class PESNoise(NamedTuple):
    """xi: [P, ...] perturbations of the pair's episode before this window; eps: [P, ...] this
    window's perturbation; stepped: [P] bool, the current episode has stepped with eps."""

    xi: object
    eps: object
    stepped: jax.Array


def pes_credit(noise: PESNoise, sums: WindowSums, need_W: bool = True):
    """PES's credit of one window, per pair (PAPER.md, "The estimators"):

        A = sum_j (l+_j - l-_j) w_j,   w_j = xi + eps  for steps of the episode that was running
                                                        when the window began (its last step
                                                        included),
                                           = eps       for steps of an episode begun inside it;
        W = sum_j w_j over the active steps (the plain Monte Carlo baseline's weight);
        xi <- 0 if an episode ended in the window, else xi (end_window then adds eps).

    The estimate is g = mean_pairs A / (2 sigma^2 K) (es_gradient). In closed form:
    A = (sum_j d_j) eps + (sum_{j <= first end} d_j) xi, with d_j = l+_j - l-_j.

    noise: the pair's PESNoise at the window's start (xi, eps: leaves [P, ...]).
    sums: the window's WindowSums. Returns (noise after the window, A, W); W is zeros when not
    need_W.
    """
    col = lambda v, x: per_pair(v, x).astype(x.dtype)

    def credit(total, to_end):
        return tmap(lambda xi, e: col(total, e) * e + col(to_end, xi) * xi, noise.xi, noise.eps)

    A = credit(sums.diff, sums.diff_to_end)
    W = credit(sums.steps, sums.steps_to_end) if need_W else tmap(jnp.zeros_like, noise.xi)
    # After the window xi is empty if an episode ended in it, and the current episode has
    # stepped with eps unless the pair's last step ended it (or it took no step).
    xi = select(sums.ended, tmap(jnp.zeros_like, noise.xi), noise.xi)
    stepped = jnp.where(sums.steps > 0, ~sums.ends_last, noise.stepped)
    return PESNoise(xi, noise.eps, stepped), A, W


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
      normalize_losses: multiply the estimate by 2 sigma / s, s the standard deviation of the
        particles' window losses, which makes the step invariant to the scale of the loss (the
        reward normalisation of augmented random search, used by the PES paper's control
        runs). It is a data-dependent step size: the estimate's direction is the same, but its
        expectation is no longer exactly the gradient.
      reset: when a pair whose members ended early (a step returned ``done``) restarts:
        "slot" (default) when its clock reaches the horizon, which keeps PES, NRES and full
        ES exactly unbiased for L = E[sum_{t<tau} l_t] / T; "pair" as soon as all its members
        have ended, which wastes no steps on waiting but estimates another quantity
        (docs/termination.md). Without termination both are the same.
      centered_ranks: replace each particle's window loss by its centred rank among the 2N
        window losses (augmented random search's fitness shaping; pes.estimators._ars). The
        estimate is invariant to strictly monotone transforms of the window losses and biased
        for the smoothed loss's gradient. Antithetic only; excludes normalize_losses.
      top_b: keep only the b pairs with the best window return max(-L+, -L-) in the mean over
        pairs (ARS V2-t; with normalize_losses the spread is over the kept 2b losses). Biased
        for b < N pairs; b = N is the plain estimator exactly. Antithetic only.

    Examples:
        One estimate on a System whose loss is (theta - 3)^2 at every step; the gradient at
        theta = 0 is -6, and 1000 pairs estimate it to within about 0.2 (one standard error).

        >>> import jax, jax.numpy as jnp, pes
        >>> class Quadratic:
        ...     horizon = 5
        ...     def init(self, key):
        ...         return jnp.float32(0.0)
        ...     def step(self, s, theta, t, key):
        ...         return s, (theta - 3.0) ** 2
        >>> est = pes.PES(Quadratic(), num_particles=2000, sigma=0.1, truncation_length=5,
        ...               stagger=False)
        >>> theta = jnp.float32(0.0)
        >>> state = est.init(jax.random.PRNGKey(0), theta)
        >>> grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(1))
        >>> bool(abs(grad + 6.0) < 1.0), int(info.inner_steps)   # 2000 particles x K = 5
        (True, 10000)
    """

    def init_noise(self, key, theta):
        zeros = tmap(lambda x: jnp.zeros((self.num_pairs,) + x.shape, x.dtype), theta)
        return PESNoise(zeros, zeros, jnp.zeros((self.num_pairs,), bool))

    def start_window(self, noise, key, theta):
        eps = batched_normal(key, self.num_pairs, theta, self.sigma)
        return PESNoise(noise.xi, eps, jnp.zeros_like(noise.stepped))

    def perturbation(self, noise):
        return noise.eps

    # The per-step reference of pes_credit (run when closed_form_credit is False).

    def weight(self, noise, done):
        return tmap(jnp.add, noise.xi, noise.eps)

    def after_step(self, noise, done, t, key):
        # A new episode has seen no perturbation yet; it starts stepping with eps next step.
        xi = select(done, tmap(jnp.zeros_like, noise.xi), noise.xi)
        return PESNoise(xi, noise.eps, ~done)

    closed_form_credit = True

    def window_credit(self, noise, sums, need_W):
        return pes_credit(noise, sums, need_W)

    def theta_like(self, state):
        return state.noise.xi

    def end_window(self, noise):
        xi = select(noise.stepped, tmap(jnp.add, noise.xi, noise.eps), noise.xi)
        return PESNoise(xi, noise.eps, noise.stepped)
