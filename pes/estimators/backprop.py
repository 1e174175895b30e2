"""Backpropagation through time: truncated (TBPTT) and over whole episodes (full BPTT).

TBPTT differentiates the window's mean loss through its K steps, treating the state at the
window's start as a constant (its history is cut, hence biased for K < T):

    g = mean_particles grad_theta (1/K) sum_{j<K} l_j(s_j(theta; stop_grad(s_0)), theta).

Full BPTT is TBPTT with K = T in lockstep from fresh states: the exact gradient of the mean
per-step loss of an episode, memory linear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pes.estimators._particles import (
    IndependentParticles,
    ParticleState,
    window_info,
    window_scan,
)


class TBPTT(IndependentParticles):
    """Truncated backprop with window length K over ``num_particles`` independent particles.

    Args:
      system: a pes.System whose step is differentiable in theta.
      num_particles: independent particles (each its own keys), averaged.
      truncation_length: K.
      stagger: burn particles in to uniform random steps of their episodes (at theta).
      mesh: optional jax.sharding.Mesh; particles are sharded over all its devices.
    """

    def _estimate(self, state, theta, key):
        K = self.truncation_length
        inner0 = jax.lax.stop_gradient(state.inner)

        def mean_loss(theta):
            (inner, t, _), stats = window_scan(
                self.system, theta, inner0, state.t, (), key, signs=(0.0,), num_steps=K,
                hooks=None, mesh=self.mesh)
            return jnp.sum(stats.loss_sum) / (self.num_particles * K), (inner, t, stats)

        (loss, (inner, t, stats)), grad = jax.value_and_grad(mean_loss, has_aux=True)(theta)
        # A non-finite loss poisons the whole backward pass, so nothing is left out here: the
        # info names the particle and the outer loop refuses the gradient.
        info = window_info(stats, 1, K, state.pending_steps, 1)._replace(loss=loss)
        return grad, ParticleState(inner, t, (), jnp.zeros((), jnp.int32)), info


class FullBPTT(TBPTT):
    """Backprop through whole episodes from fresh states (the system needs a finite horizon).

    Args:
      system: a pes.System with a finite horizon, differentiable in theta.
      num_particles: independent episodes averaged per estimate.
    """

    def __init__(self, system, *, num_particles=1, mesh=None):
        horizon = getattr(system, "horizon", None)
        if hasattr(system, "horizon") and horizon is None:
            raise ValueError(
                "FullBPTT needs a system with a finite horizon; this system never resets "
                "(horizon=None): use TBPTT with a truncation_length"
            )
        super().__init__(system, num_particles=num_particles,
                         truncation_length=horizon if isinstance(horizon, int) else 1,
                         stagger=False, mesh=mesh)

    def __repr__(self):
        return f"FullBPTT(num_particles={self.num_particles})"
