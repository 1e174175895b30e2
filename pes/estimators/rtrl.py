"""Real-time recurrent learning (Williams & Zipser 1989): exact forward-mode sensitivities.

Each particle carries, beside its inner state s_t, the sensitivity J_t = ds_t/dtheta and
updates both online, so the gradient of every step's loss includes the whole episode's history:

    J_{t+1} = df/ds J_t + df/dtheta,    dl_t/dtheta = dl/ds J_t + dl/dtheta,    J_0 = 0.

A window of K steps reports g = mean over particles and steps of dl_t/dtheta. J is never
truncated; it restarts at 0 with each episode (a fresh state does not depend on theta). Cost
per step: one forward pass with D = dim(theta) tangents, memory dim(s) x D: small problems.

``SensitivityEstimator`` is the window shared with UORO (a rank-one estimate of J).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from pes.estimators._particles import (
    IndependentParticles,
    ParticleState,
    WindowStats,
    expand_members,
    init_inner,
    select,
    shard_pairs,
    stagger_offsets,
    tmap,
    window_info,
)


class SensitivityEstimator(IndependentParticles):
    """Particles carrying (state, sensitivity), stepped online at theta itself.

    ``ParticleState.inner`` has leaves [P, 1, ...] (one member per particle) and ``noise`` is
    the sensitivity, leaves [P, ...]. Subclasses define, for one particle,
    ``zero_sensitivity(state, theta)`` and
    ``sensitivity_step(state, sens, theta, t, k_step, k_noise) -> (state, loss, grad, sens)``
    where grad (theta's structure) is the estimate of dl_t/dtheta.
    """

    def __init__(self, system, *, num_particles=1, truncation_length=1, stagger=True, mesh=None):
        super().__init__(system, num_particles=num_particles,
                         truncation_length=truncation_length, stagger=stagger, mesh=mesh)

    def fresh_sensitivity(self, sens):
        """Sensitivity of a fresh episode's state: zero."""
        return tmap(jnp.zeros_like, sens)

    def init(self, key, theta):
        """Fresh particles with zero sensitivity (burned in with it when staggering); the
        inner state must be float, since its tangents carry the sensitivity."""
        state = jax.eval_shape(self.system.init, key)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(
                    f"{type(self).__name__} needs a float inner state: system.init() returned "
                    f"state{jax.tree_util.keystr(path)} of dtype {leaf.dtype}")
        return super().init(key, theta)

    def _init(self, key, theta):
        # The same key split as TruncatedEstimator._init, so lockstep runs share trajectories.
        k_inner, _, k_off, k_burn, _ = jax.random.split(key, 5)
        inner = tmap(lambda x: x[:, 0], init_inner(self.system, k_inner, self.num_pairs, 1))
        sens = jax.vmap(self.zero_sensitivity, in_axes=(0, None))(inner, theta)
        t = jnp.zeros((self.num_pairs,), jnp.int32)
        pending = jnp.zeros((), jnp.int32)
        offsets = stagger_offsets(k_off, self.num_pairs, self.horizon, self.stagger)
        if offsets is not None:
            # Burn-in builds up the sensitivity too: it is part of the particle's state.
            (inner, t, sens), _, stats = self._window(
                theta, inner, t, sens, k_burn, self.horizon - 1, offsets)
            pending = jnp.sum(stats.steps)
        return ParticleState(expand_members(inner, 1), t, sens, pending)

    def _estimate(self, state, theta, key):
        K = self.truncation_length
        inner = tmap(lambda x: x[:, 0], state.inner)
        (inner, t, sens), grad_sum, stats = self._window(
            theta, inner, state.t, state.noise, key, K, None)
        # Particles are independent, so one with a NaN/inf loss is left out of the mean (as
        # in the ES family); the info names it. No finite particle gives a NaN gradient.
        ok = stats.finite
        grad = tmap(lambda g: jnp.sum(select(ok, g, jnp.zeros_like(g)), 0) / (jnp.sum(ok) * K),
                    grad_sum)
        info = window_info(stats, 1, K, state.pending_steps, 1)
        return grad, ParticleState(expand_members(inner, 1), t, sens,
                                   jnp.zeros((), jnp.int32)), info

    def _window(self, theta, inner, t, sens, key, num_steps, active):
        """``num_steps`` steps of every particle (one lax.scan); keys and resets as in
        window_scan. Returns (inner, t, sens), the per-particle sums of the step gradients
        (leaves [P, ...]) and a WindowStats (without A, W)."""
        horizon, num = self.horizon, self.num_pairs
        pair_keys = shard_pairs(jax.random.split(key, num), self.mesh)
        inner, t, sens, active = shard_pairs((inner, t, sens, active), self.mesh)
        step_all = jax.vmap(self.sensitivity_step, in_axes=(0, 0, None, 0, 0, 0))

        def body(carry, j):
            inner, t, sens, grad_sum, stats = carry
            keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, j), 3))(pair_keys)
            k_step, k_reset, k_noise = keys[:, 0], keys[:, 1], keys[:, 2]
            new_inner, loss, grad, new_sens = step_all(inner, sens, theta, t, k_step, k_noise)
            act = jnp.ones((num,), bool) if active is None else j < active
            t_next = t + 1
            done = jnp.zeros_like(act) if horizon is None else (t_next >= horizon) & act
            grad_sum = tmap(lambda a, g: a + select(act, g, jnp.zeros_like(g)), grad_sum, grad)
            finite_now = ~act | jnp.isfinite(loss)
            stats = WindowStats(
                A=(), W=(), loss_sum=stats.loss_sum + jnp.where(act, loss, 0.0),
                steps=stats.steps + act, finite=stats.finite & finite_now,
                bad_t=jnp.where(stats.finite & ~finite_now, t, stats.bad_t))
            if active is not None:
                new_inner = select(act, new_inner, inner)
                new_sens = select(act, new_sens, sens)
            if horizon is not None:
                new_inner = jax.lax.cond(
                    jnp.any(done),
                    lambda x: select(done, jax.vmap(self.system.init)(k_reset), x),
                    lambda x: x, new_inner)
                new_sens = select(done, self.fresh_sensitivity(new_sens), new_sens)
                t_next = jnp.where(done, 0, t_next)
            t = jnp.where(act, t_next, t)
            return shard_pairs((new_inner, t, new_sens, grad_sum, stats), self.mesh), None

        zeros = tmap(lambda x: jnp.zeros((num,) + jnp.shape(x), jnp.result_type(x)), theta)
        stats0 = WindowStats(A=(), W=(), loss_sum=jnp.zeros((num,), jnp.float32),
                             steps=jnp.zeros((num,), jnp.int32), finite=jnp.ones((num,), bool),
                             bad_t=-jnp.ones((num,), jnp.int32))
        (inner, t, sens, grad_sum, stats), _ = jax.lax.scan(
            body, (inner, t, sens, zeros, stats0), jnp.arange(num_steps, dtype=jnp.int32))
        return (inner, t, sens), grad_sum, stats


class RTRL(SensitivityEstimator):
    """Exact online gradients through the whole episode, updating every K steps.

    Args:
      system: a pes.System whose step is differentiable in state and theta (float states).
      num_particles: independent particles (each its own keys), averaged.
      truncation_length: K, online steps per estimate (the sensitivity is never truncated).
      stagger: burn particles in to uniform random steps of their episodes, carrying J.
      mesh: optional jax.sharding.Mesh; particles are sharded over all its devices.

    The sensitivity (``state.noise``) has, for each state leaf of shape S, a leaf of shape
    [P, *S, D] with D = dim(theta), columns in ``jax.flatten_util.ravel_pytree(theta)`` order.
    """

    def zero_sensitivity(self, state, theta):
        dim = ravel_pytree(theta)[0].size
        return tmap(lambda x: jnp.zeros(jnp.shape(x) + (dim,), jnp.result_type(x)), state)

    def sensitivity_step(self, state, sens, theta, t, k_step, k_noise):
        flat, unravel = ravel_pytree(theta)
        step = lambda s, th: self.system.step(s, unravel(th), t, k_step)
        (new_state, loss), step_lin = jax.linearize(step, state, flat)
        # Column d of J pushed forward together with e_d: (J' e_d, dl/dtheta_d) in one pass.
        new_sens, dloss = jax.vmap(step_lin, in_axes=(-1, 0), out_axes=-1)(
            sens, jnp.eye(flat.size, dtype=flat.dtype))
        return new_state, loss, unravel(dloss), new_sens
