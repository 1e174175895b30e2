"""Backpropagation through time: truncated (TBPTT) and over whole episodes (full BPTT).

TBPTT(k1, k2) in Williams & Peng's sense: every k1 = K inner steps, the losses of those K steps
are differentiated through the last k2 >= K steps of history (``backprop_depth``); anything
older, and anything before a reset, is treated as a constant:

    g = mean_particles grad_theta (1/K) sum_{j<K} l_j(s_j(theta; stop_grad(s_{-D})), theta),

with D = k2 - K and s_{-D} the state D steps before the window (window step j's loss thus
sees D + j + 1 steps of history, the last one k2). D = 0 (the default, k2 = K) is
the plain truncated gradient with the history cut at the window's start. For D > 0 each
particle keeps the state D steps back and the keys of the D steps since, and every window
replays those D steps (with gradient) before its own K. Full BPTT is TBPTT with K = T in
lockstep from fresh states: the exact gradient of the mean per-step loss of an episode, memory
linear in T.

Termination: a particle that returns ``done`` waits (frozen, loss 0) until its episode slot
ends at the horizon, as in every estimator. The gradient is then the pathwise one: it ignores
how the episode's length tau depends on theta, so with theta-dependent termination it is a
biased estimate of the gradient of L(theta) = E[sum_{t<tau} l_t] / T (unbiased when tau does
not depend on theta).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pes.estimators._particles import (
    IndependentParticles,
    WindowStats,
    check_positive_int,
    init_inner,
    particle_state,
    reset_text,
    shard_pairs,
    stagger_offsets,
    state_ended,
    taken_steps,
    window_info,
    window_scan,
)
from pes.estimators._window import (
    advance,
    check_reset,
    init_keys,
    live_members,
    mask_losses,
    reset_rows,
    step_keys_at,
    step_or_wait,
)
from pes.system import PyTree, check_step_output


class History(NamedTuple):
    """What a TBPTT particle with backprop depth k2 = K + D keeps to replay its last D steps.

    inner: [P, 1, ...] the states D steps before the current ones (the buffer's start).
    t: [P] their step indices in the episode.
    keys: [P, D, 2, ...] the (step, reset) keys of the D buffered steps, oldest first.
    valid: [P, D] bool; False for slots before the particle's first step (replayed as no-ops).
    (EpisodeHistory adds the buffer start's ``ended`` flags for systems with termination.)
    """

    inner: PyTree
    t: jax.Array
    keys: jax.Array
    valid: jax.Array


class EpisodeHistory(NamedTuple):
    """History of a system with termination; ended: [P, 1] the buffer's start was waiting."""

    inner: PyTree
    t: jax.Array
    keys: jax.Array
    valid: jax.Array
    ended: jax.Array


def history(inner, t, keys, valid, ended=None):
    return History(inner, t, keys, valid) if ended is None else EpisodeHistory(
        inner, t, keys, valid, ended)


def step_keys(pair_keys: jax.Array, steps: jax.Array) -> jax.Array:
    """[P, n, 2, ...] (step key, reset key) of pair p's step steps[p, i], derived exactly as
    window_scan derives them (_window.step_keys_at)."""
    return step_keys_at(pair_keys, steps)[:, :, :2]


def replay_scan(system: Any, theta: PyTree, inner: PyTree, t: jax.Array, keys: jax.Array,
                valid: jax.Array, counted: jax.Array, mesh=None, ended=None,
                pair_reset: bool = False):
    """Step every particle through n given steps, differentiably in theta.

    inner: [P, 1, ...]; t: [P]; keys: [P, n, 2, ...] (step, reset); valid: [P, n] (an invalid
    step leaves state and t unchanged); counted: [P, n], the steps whose losses enter the
    stats; ended: [P, 1] waiting flags (None: no termination); pair_reset: reset="pair". A
    step that ends an episode restarts from system.init(reset key), which does not depend on
    theta, so no gradient crosses a reset. Returns ((inner, t, ended), WindowStats of the
    counted steps; A and W are empty).
    """
    num = t.shape[0]
    member_step = jax.vmap(system.step, in_axes=(0, None, None, None))
    step_all = jax.vmap(member_step, in_axes=(0, None, 0, 0))
    inner, t, ended = shard_pairs((inner, t, ended), mesh)
    xs = shard_pairs((keys, valid, counted), mesh)
    xs = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 1, 0), xs)

    def body(carry, x):
        inner, t, ended, stats = carry
        k, act, count = x
        live = live_members(act, ended)
        new_inner, losses, term = step_or_wait(
            lambda: step_all(inner, theta, t, k[:, 0]), live, inner)  # losses [P, 1]
        loss = jnp.sum(mask_losses(losses, live), axis=1)
        adv = advance(system.horizon, inner, new_inner, t, act,
                      reset_rows(system.init, k[:, 1], 1, by_select=False), ended, term,
                      pair_reset)
        finite_now = ~count | jnp.isfinite(loss)
        stats = WindowStats(
            A=(), W=(),
            loss_sum=stats.loss_sum + jnp.where(count, loss, 0.0),
            steps=stats.steps + count,
            finite=stats.finite & finite_now,
            bad_t=jnp.where(stats.finite & ~finite_now, t, stats.bad_t),
            taken=None if live is None else stats.taken + (live[:, 0] & count))
        return shard_pairs((adv.state, adv.t, adv.ended, stats), mesh), None

    stats0 = WindowStats((), (), jnp.zeros((num,), jnp.float32), jnp.zeros((num,), jnp.int32),
                         jnp.ones((num,), bool), -jnp.ones((num,), jnp.int32),
                         taken=None if ended is None else jnp.zeros((num,), jnp.int32))
    (inner, t, ended, stats), _ = jax.lax.scan(body, (inner, t, ended, stats0), xs)
    return (inner, t, ended), stats


def _join(a: WindowStats, b: WindowStats) -> WindowStats:
    """Stats of two consecutive stretches of steps as one."""
    return WindowStats((), (), a.loss_sum + b.loss_sum, a.steps + b.steps, a.finite & b.finite,
                       jnp.where(a.finite, b.bad_t, a.bad_t),
                       taken=None if a.taken is None else a.taken + b.taken)


class TBPTT(IndependentParticles):
    """Truncated backprop with window length K over ``num_particles`` independent particles.

    Args:
      system: a pes.System whose step is differentiable in theta.
      num_particles: independent particles (each its own keys), averaged.
      truncation_length: K = k1, the inner steps (and losses) of each window.
      backprop_depth: k2 >= K, the steps of history the window's losses are differentiated
        through (Williams & Peng's TBPTT(k1, k2)); None: K, the history cut at the window's
        start. Steps before the particle's episode started never count (a reset cuts the
        history). Each window then costs k2 - K replayed steps on top of its K new ones; only
        the K new steps count as inner steps.
      stagger: burn particles in to uniform random steps of their episodes (at theta).
      mesh: optional jax.sharding.Mesh; particles are sharded over all its devices.
      reset: "slot" (default) or "pair": a particle whose episode ended early restarts when
        its clock reaches the horizon, or at once (docs/termination.md).
    """

    def __init__(self, system, *, num_particles=1, truncation_length, backprop_depth=None,
                 stagger=True, mesh=None, reset="slot"):
        super().__init__(system, num_particles=num_particles,
                         truncation_length=truncation_length, stagger=stagger, mesh=mesh,
                         reset=reset)
        K = self.truncation_length
        depth = K if backprop_depth is None else check_positive_int(
            "backprop_depth", backprop_depth)
        if depth < K:
            raise ValueError(
                f"backprop_depth={depth} must be >= truncation_length={K}: a window's losses "
                "are differentiated through at least the window itself")
        self.backprop_depth = depth

    def __repr__(self):
        depth = ("" if self.backprop_depth == self.truncation_length
                 else f", backprop_depth={self.backprop_depth}")
        return (f"{type(self).__name__}(num_particles={self.num_particles}, "
                f"truncation_length={self.truncation_length}{depth}, stagger={self.stagger}"
                f"{reset_text(self.reset)})")

    @property
    def _buffered(self) -> int:
        """D = k2 - K, the steps each particle replays before its window."""
        return self.backprop_depth - self.truncation_length

    def _init(self, key, theta):
        D = self._buffered
        if D == 0:
            return super()._init(key, theta)
        # The same keys as the plain init, so the particles' trajectories do not depend on D.
        keys0 = init_keys(key)
        P = self.num_particles
        inner = init_inner(self.system, keys0.inner, P, 1)
        t = jnp.zeros((P,), jnp.int32)
        ended = last_ended = None
        if check_step_output(self.system, theta, key):
            ended = jnp.zeros((P, 1), bool)
        offsets = stagger_offsets(keys0.offsets, P, self.horizon, self.stagger)
        if offsets is None:
            keys = jnp.broadcast_to(key, (P, D, 2) + key.shape)
            hist = history(inner, t, keys, jnp.zeros((P, D), bool), ended)
            return particle_state(inner, t, hist, jnp.zeros((), jnp.int32), ended)
        # Burn in to D steps before each particle's offset (never negative), then record the
        # keys of the rest of its burn-in and replay them.
        (start, t_start, _, ended), stats = window_scan(
            self.system, theta, inner, t, (), keys0.burn, signs=(0.0,),
            num_steps=self.horizon - 1, hooks=None, active=jnp.maximum(offsets - D, 0),
            mesh=self.mesh, ended=ended, reset=self.reset)
        idx = offsets[:, None] - D + jnp.arange(D, dtype=jnp.int32)[None]
        valid = idx >= 0
        keys = step_keys(jax.random.split(keys0.burn, P), jnp.maximum(idx, 0))
        # Without termination every burn-in step is taken; with it the replay counts its own.
        counted = jnp.zeros_like(valid) if ended is None else valid
        (inner, t, last_ended), replayed = replay_scan(
            self.system, theta, start, t_start, keys, valid, counted, self.mesh, ended,
            self.reset == "pair")
        pending = (jnp.sum(offsets) if ended is None
                   else taken_steps(stats, 1) + jnp.sum(replayed.taken))
        hist = history(start, t_start, keys, valid, ended)
        return particle_state(inner, t, hist, pending, last_ended)

    def _estimate(self, state, theta, key):
        K = self.truncation_length
        if self._buffered:
            return self._estimate_deep(state, theta, key)
        inner0 = jax.lax.stop_gradient(state.inner)

        def mean_loss(theta):
            (inner, t, _, ended), stats = window_scan(
                self.system, theta, inner0, state.t, (), key, signs=(0.0,), num_steps=K,
                hooks=None, mesh=self.mesh, ended=state_ended(state), reset=self.reset)
            return jnp.sum(stats.loss_sum) / (self.num_particles * K), (inner, t, ended, stats)

        (loss, (inner, t, ended, stats)), grad = jax.value_and_grad(
            mean_loss, has_aux=True)(theta)
        # A non-finite loss poisons the whole backward pass, so nothing is left out here: the
        # info names the particle and the outer loop refuses the gradient.
        info = window_info(stats, 1, K, state.pending_steps, 1)._replace(loss=loss)
        return grad, particle_state(inner, t, (), jnp.zeros((), jnp.int32), ended), info

    def _estimate_deep(self, state, theta, key):
        """TBPTT(K, K + D): replay the D buffered steps and the window's K new ones from the
        buffered state; only the K new losses are differentiated."""
        K, D, P = self.truncation_length, self._buffered, self.num_particles
        hist = state.noise
        # The window's own steps use window_scan's keys, so with any depth the particles
        # follow the same trajectories as plain TBPTT.
        new_keys = step_keys(jax.random.split(key, P),
                             jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (P, K)))
        keys = jnp.concatenate([hist.keys, new_keys], axis=1)
        valid = jnp.concatenate([hist.valid, jnp.ones((P, K), bool)], axis=1)
        counted = jnp.arange(D + K) >= D
        counted = jnp.broadcast_to(counted, (P, D + K))
        start = jax.lax.stop_gradient(hist.inner)

        def mean_loss(theta):
            # Split after K steps: that state is the start of the next window's buffer.
            (mid, t_mid, e_mid), first = replay_scan(
                self.system, theta, start, hist.t, keys[:, :K], valid[:, :K], counted[:, :K],
                self.mesh, state_ended(hist), self.reset == "pair")
            (inner, t, ended), rest = replay_scan(
                self.system, theta, mid, t_mid, keys[:, K:], valid[:, K:], counted[:, K:],
                self.mesh, e_mid, self.reset == "pair")
            stats = _join(first, rest)
            return jnp.sum(stats.loss_sum) / (P * K), (inner, t, ended, mid, t_mid, e_mid, stats)

        (loss, (inner, t, ended, mid, t_mid, e_mid, stats)), grad = jax.value_and_grad(
            mean_loss, has_aux=True)(theta)
        info = window_info(stats, 1, K, state.pending_steps, 1)._replace(loss=loss)
        new_hist = history(jax.lax.stop_gradient(mid), t_mid, keys[:, K:], valid[:, K:], e_mid)
        return grad, particle_state(inner, t, new_hist, jnp.zeros((), jnp.int32), ended), info


class FullBPTT(TBPTT):
    """Backprop through whole episodes from fresh states (the system needs a finite horizon).

    Args:
      system: a pes.System with a finite horizon, differentiable in theta.
      num_particles: independent episodes averaged per estimate.
    """

    def __init__(self, system, *, num_particles=1, mesh=None, reset="slot"):
        check_reset(reset)  # accepted; whole episodes from t = 0 are the same for both
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
