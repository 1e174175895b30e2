"""Real-time recurrent learning (Williams & Zipser 1989): exact forward-mode sensitivities.

Each particle carries, beside its inner state s_t, the sensitivity J_t = ds_t/dtheta and
updates both online, so the gradient of every step's loss includes the whole episode's history:

    J_{t+1} = df/ds J_t + df/dtheta,    dl_t/dtheta = dl/ds J_t + dl/dtheta,    J_0 = 0.

A window of K steps reports g = mean over particles and steps of dl_t/dtheta. J is never
truncated; it restarts at 0 with each episode (a fresh state does not depend on theta). Cost
per step: one forward pass with D = dim(theta) tangents, memory dim(s) x D: small problems.

``SensitivityEstimator`` is the window shared with UORO (a rank-one estimate of J).

Termination: a particle that returns ``done`` waits (frozen, loss 0) until its episode slot
ends at the horizon, then restarts with J = 0. The gradient is pathwise: it ignores how the
episode's length depends on theta (biased for theta-dependent termination).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from pes.estimators._particles import (
    IndependentParticles,
    WindowStats,
    expand_members,
    init_inner,
    particle_state,
    select,
    shard_pairs,
    stagger_offsets,
    state_ended,
    taken_steps,
    tmap,
    window_info,
)
from pes.estimators._window import (
    advance,
    fresh_ended,
    init_keys,
    live_members,
    split_step,
    step_keys,
)
from pes.system import check_step_output


def split_done(system, t, k_step, state, theta):
    """``(step, has_done)``: ``step(s, theta) -> (state, loss)`` for one particle's step t and
    whether the system also returns ``done``; then step returns ((state, loss), done), the form
    jax.linearize / jvp / vjp take with has_aux."""
    out = jax.eval_shape(lambda: system.step(state, theta, t, k_step))
    if len(out) == 2:
        return (lambda s, th: system.step(s, th, t, k_step)), False

    def step(s, th):
        new, loss, done = split_step(system.step(s, th, t, k_step))
        return (new, loss), done

    return step, True


class SensitivityEstimator(IndependentParticles):
    """Particles carrying (state, sensitivity), stepped online at theta itself.

    ``ParticleState.inner`` has leaves [P, 1, ...] (one member per particle) and ``noise`` is
    the sensitivity, leaves [P, ...]. Subclasses define, for one particle,
    ``zero_sensitivity(state, theta)`` and
    ``sensitivity_step(state, sens, theta, t, k_step, k_noise) -> (state, loss, grad, sens,
    done)`` where grad (theta's structure) is the estimate of dl_t/dtheta and done the step's
    termination (False for a system without it; see ``split_done``).
    """

    def __init__(self, system, *, num_particles=1, truncation_length=1, stagger=True, mesh=None,
                 reset="slot"):
        super().__init__(system, num_particles=num_particles,
                         truncation_length=truncation_length, stagger=stagger, mesh=mesh,
                         reset=reset)

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
        keys = init_keys(key)
        inner = tmap(lambda x: x[:, 0], init_inner(self.system, keys.inner, self.num_pairs, 1))
        sens = jax.vmap(self.zero_sensitivity, in_axes=(0, None))(inner, theta)
        t = jnp.zeros((self.num_pairs,), jnp.int32)
        ended = fresh_ended(self.num_pairs, 1, check_step_output(self.system, theta, key))
        pending = jnp.zeros((), jnp.int32)
        offsets = stagger_offsets(keys.offsets, self.num_pairs, self.horizon, self.stagger)
        if offsets is not None:
            # Burn-in builds up the sensitivity too: it is part of the particle's state.
            (inner, t, sens, ended), _, stats = self._window(
                theta, inner, t, sens, keys.burn, self.horizon - 1, offsets, ended)
            pending = taken_steps(stats, 1)
        return particle_state(expand_members(inner, 1), t, sens, pending, ended)

    def _estimate(self, state, theta, key):
        K = self.truncation_length
        inner = tmap(lambda x: x[:, 0], state.inner)
        (inner, t, sens, ended), grad_sum, stats = self._window(
            theta, inner, state.t, state.noise, key, K, None, state_ended(state))
        # Particles are independent, so one with a NaN/inf loss is left out of the mean (as
        # in the ES family); the info names it. No finite particle gives a NaN gradient.
        ok = stats.finite
        grad = tmap(lambda g: jnp.sum(select(ok, g, jnp.zeros_like(g)), 0) / (jnp.sum(ok) * K),
                    grad_sum)
        info = window_info(stats, 1, K, state.pending_steps, 1)
        return grad, particle_state(expand_members(inner, 1), t, sens,
                                   jnp.zeros((), jnp.int32), ended), info

    @staticmethod
    def _step_or_wait(step, live, inner, sens):
        """``step()`` (the batched sensitivity_step), unless no particle is live (all wait
        after ``done``, or are inactive): then nothing is stepped (no system call) and the
        states, sensitivities stay, with loss and gradient 0 and done False."""
        if live is None:
            return step()
        shapes = jax.eval_shape(step)

        def wait():
            zeros = lambda s: jnp.zeros(s.shape, s.dtype)
            return (inner, zeros(shapes[1]), tmap(zeros, shapes[2]), sens, zeros(shapes[4]))

        return jax.lax.cond(jnp.any(live), step, wait)

    def _window(self, theta, inner, t, sens, key, num_steps, active, ended=None):
        """``num_steps`` steps of every particle (one lax.scan); keys and resets by
        _window.step_keys and _window.advance. Returns (inner, t, sens, ended), the
        per-particle sums of the step gradients (leaves [P, ...]) and a WindowStats (without
        A, W)."""
        num = self.num_pairs
        pair_keys = shard_pairs(jax.random.split(key, num), self.mesh)
        inner, t, sens, active, ended = shard_pairs((inner, t, sens, active, ended), self.mesh)
        step_all = jax.vmap(self.sensitivity_step, in_axes=(0, 0, None, 0, 0, 0))
        # With termination, advance works on [P, M, ...] member states (a particle is a pair
        # of one member); without, on the particles' [P, ...] states as they are.
        lift = (lambda tree: tmap(lambda x: x[:, None], tree)) if ended is not None else (
            lambda tree: tree)
        unlift = (lambda tree: tmap(lambda x: x[:, 0], tree)) if ended is not None else (
            lambda tree: tree)

        def body(carry, j):
            inner, t, ended, sens, grad_sum, stats = carry
            keys = step_keys(pair_keys, j)
            k_step, k_reset, k_noise = keys[:, 0], keys[:, 1], keys[:, 2]
            act = None if active is None else j < active
            live = live_members(act, ended)
            new_inner, loss, grad, new_sens, term = self._step_or_wait(
                lambda: step_all(inner, sens, theta, t, k_step, k_noise), live, inner, sens)
            on = jnp.ones((num,), bool) if act is None else act  # the particle's clock moves
            took = on if live is None else live[:, 0]  # ... and it really stepped
            if live is not None:
                loss = jnp.where(took, loss, jnp.zeros_like(loss))

            def reset(mask, x):
                x_inner, x_sens = x
                put = lambda v: select(mask, lift(jax.vmap(self.system.init)(k_reset)), v)
                return (jax.lax.cond(jnp.any(mask), put, lambda v: v, x_inner),
                        select(mask, self.fresh_sensitivity(x_sens), x_sens))

            adv = advance(self.horizon, lift((inner, sens)), lift((new_inner, new_sens)), t, act,
                          reset, ended, None if ended is None else term[:, None],
                          self.reset == "pair")
            grad_sum = tmap(lambda a, g: a + select(took, g, jnp.zeros_like(g)), grad_sum, grad)
            finite_now = ~took | jnp.isfinite(loss)
            stats = WindowStats(
                A=(), W=(), loss_sum=stats.loss_sum + jnp.where(took, loss, 0.0),
                steps=stats.steps + on, finite=stats.finite & finite_now,
                bad_t=jnp.where(stats.finite & ~finite_now, t, stats.bad_t),
                taken=None if live is None else stats.taken + took)
            inner, sens = unlift(adv.state)
            return shard_pairs((inner, adv.t, adv.ended, sens, grad_sum, stats), self.mesh), None

        zeros = tmap(lambda x: jnp.zeros((num,) + jnp.shape(x), jnp.result_type(x)), theta)
        stats0 = WindowStats(A=(), W=(), loss_sum=jnp.zeros((num,), jnp.float32),
                             steps=jnp.zeros((num,), jnp.int32), finite=jnp.ones((num,), bool),
                             bad_t=-jnp.ones((num,), jnp.int32),
                             taken=None if ended is None else jnp.zeros((num,), jnp.int32))
        (inner, t, ended, sens, grad_sum, stats), _ = jax.lax.scan(
            body, (inner, t, ended, sens, zeros, stats0), jnp.arange(num_steps, dtype=jnp.int32))
        return (inner, t, sens, ended), grad_sum, stats


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
        step, has_done = split_done(self.system, t, k_step, state, theta)
        out = jax.linearize(lambda s, th: step(s, unravel(th)), state, flat, has_aux=has_done)
        (new_state, loss), step_lin = out[:2]
        done = out[2] if has_done else jnp.zeros((), bool)
        # Column d of J pushed forward together with e_d: (J' e_d, dl/dtheta_d) in one pass.
        new_sens, dloss = jax.vmap(step_lin, in_axes=(-1, 0), out_axes=-1)(
            sens, jnp.eye(flat.size, dtype=flat.dtype))
        return new_state, loss, unravel(dloss), new_sens, done
