"""Unbiased Online Recurrent Optimization (Tallec & Ollivier, ICLR 2018).

UORO replaces RTRL's sensitivity J_t = ds_t/dtheta by a rank-one estimate with E[.] = J_t:

    J_t ~ s~_t theta~_t^T,    s~_0 = 0, theta~_0 = 0 (and again at every episode reset).

With random signs nu (independent +/-1 per state entry, E[nu nu^T] = I), each step sets

    s~'     = rho0 (df/ds s~) + rho1 nu,
    theta~' = theta~ / rho0 + (nu^T df/dtheta) / rho1,
    rho0 = sqrt((|theta~| + eps) / (|df/ds s~| + eps)),  rho1 = sqrt((|nu^T df/dtheta| + eps)
                                                                     / (|nu| + eps)),

and the estimate of dl_t/dtheta is (dl/ds . s~_t) theta~_t + dl/dtheta. The rho's rescale the
two factors to minimise the variance; they are even in nu, so the cross terms keep mean zero
and the estimate stays unbiased. Cost per step: one jvp and two vjps (nu, then the loss).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pes.estimators._particles import tmap
from pes.estimators.rtrl import SensitivityEstimator, split_done


class UOROSensitivity(NamedTuple):
    """s_tilde: state-shaped (leaves [P, ...] when batched); theta_tilde: theta-shaped."""

    s_tilde: object
    theta_tilde: object


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


class UORO(SensitivityEstimator):
    """Online, unbiased, rank-one forward-mode gradients, updating every K steps.

    Args:
      system: a pes.System whose step is differentiable in state and theta (float states).
      num_particles: independent particles (each its own keys and signs), averaged.
      truncation_length: K, online steps per estimate (the sensitivity is never truncated).
      stagger: burn particles in to uniform random steps of their episodes, carrying s~, theta~.

    ``state.noise`` is a UOROSensitivity with leaves [P, ...].
    """

    epsilon = 1e-7  # keeps rho0, rho1 finite while s~ or theta~ is (near) zero

    def zero_sensitivity(self, state, theta):
        return UOROSensitivity(tmap(jnp.zeros_like, state), tmap(jnp.zeros_like, theta))

    def random_signs(self, key, like):
        """Independent +/-1 entries shaped like the state ``like``."""
        leaves, treedef = jax.tree_util.tree_flatten(like)
        keys = jax.random.split(key, len(leaves))
        signs = [jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x))
                 for k, x in zip(keys, leaves, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, signs)

    def sensitivity_step(self, state, sens, theta, t, k_step, k_noise):
        s_tilde, theta_tilde = sens
        step, has_done = split_done(self.system, t, k_step, state, theta)
        out = jax.jvp(lambda s: step(s, theta), (state,), (s_tilde,), has_aux=has_done)
        (new_state, loss), (fs_s_tilde, dl_s_tilde) = out[:2]
        done = out[2] if has_done else jnp.zeros((), bool)
        pullback = jax.vjp(lambda th: step(state, th), theta, has_aux=has_done)[1]
        nu = self.random_signs(k_noise, new_state)
        (nu_f_theta,) = pullback((nu, jnp.zeros_like(loss)))
        (dl_theta,) = pullback((tmap(jnp.zeros_like, new_state), jnp.ones_like(loss)))
        grad = tmap(lambda a, b: a + dl_s_tilde * b, dl_theta, theta_tilde)

        eps = self.epsilon
        rho0 = jnp.sqrt((_norm(theta_tilde) + eps) / (_norm(fs_s_tilde) + eps))
        rho1 = jnp.sqrt((_norm(nu_f_theta) + eps) / (_norm(nu) + eps))
        s_tilde = tmap(lambda a, n: rho0 * a + rho1 * n, fs_s_tilde, nu)
        theta_tilde = tmap(lambda a, b: a / rho0 + b / rho1, theta_tilde, nu_f_theta)
        return new_state, loss, grad, UOROSensitivity(s_tilde, theta_tilde), done

    def theta_like(self, state):
        return state.noise.theta_tilde
