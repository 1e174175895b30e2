"""Machinery shared by the truncated estimators: particles, keys, noise and the window scan.

Layout. Particles are grouped in *pairs*: the members of a pair share every key (data, resets)
and step with theta + sign * eps for the signs of the estimator (``(+1, -1)`` antithetic,
``(+1,)`` plain Monte Carlo, ``(0,)`` unperturbed). Arrays of the inner state carry two leading
axes ``[P, M]`` (pairs, members); per-pair quantities (step index t, noise) carry ``[P]``.

One window is one ``lax.scan`` over its steps, with every pair and member a ``vmap`` lane.
Keys, resets and early termination follow the one rule of ``_window.py``: when a pair's t
reaches the horizon its members restart from a fresh ``system.init`` (shared key) and t <- 0; a
member whose step returned ``done`` waits (frozen, loss 0, not counted) until then.

Estimators are immutable: every attribute is set in the constructor, an instance compares and
hashes by its settings (and its system), and ``init``/``estimate`` are module-level jitted
functions taking the estimator as a static argument, so equal estimators share compilations.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pes.estimators import _ars
from pes.estimators._window import advance as advance_pairs
from pes.estimators._window import (
    check_reset,
    expand_members,
    fresh_ended,
    init_keys,
    live_members,
    select,
    step_keys,
    step_or_wait,
)
from pes.estimators._window import mask_losses as mask_waiting
from pes.estimators._window import reset_rows as make_reset
from pes.system import (
    PyTree,
    check_step_output,
    check_system,
    check_theta,
    masked_moments,
    merge_moments,
    running_stats,
    zero_moments,
)

tmap = jax.tree_util.tree_map


class EstimateInfo(NamedTuple):
    """What one ``estimate`` call reports besides the gradient.

    loss: mean per-step loss over the window's perturbed particles, a float scalar (particles
      whose loss was non-finite are left out).
    inner_steps: inner ``system.step`` calls this estimate consumed (burn-in included), int;
      steps of members waiting for their episode slot to end (after ``done``) do not count.
    num_nonfinite: particles (pairs count as one) with a NaN or inf loss in this window; the ES
      family leaves them out of the gradient.
    nonfinite_particle: index of the first such particle, -1 if none.
    nonfinite_step: the step of its episode (t) at which its loss first was non-finite, or -1.
    observed: for a System with running statistics (``pes.system.running_stats``), the
      Moments of ``observe(state)`` over every member-step the window took (pairs with a
      NaN/inf loss left out); else None.
    """

    loss: jax.Array
    inner_steps: jax.Array
    # numpy defaults: jnp ones would start JAX's backend at import, before a multi-process
    # run can call jax.distributed.initialize.
    num_nonfinite: jax.Array = np.zeros((), np.int32)
    nonfinite_particle: jax.Array = -np.ones((), np.int32)
    nonfinite_step: jax.Array = -np.ones((), np.int32)
    observed: Any = None


class ParticleState(NamedTuple):
    """State of a truncated estimator between windows.

    inner: the systems' states, leaves of shape [P, M, ...] (pairs, members).
    t: [P] int32 step index inside each pair's episode.
    noise: estimator-specific per-pair noise carry (leaves [P, ...]).
    pending_steps: int32 inner steps spent in burn-in, reported by the next estimate (a
      Pending, with the burn-in's observations, for a System with running statistics).

    Systems whose step returns ``done`` get an EpisodeParticleState instead (one more field);
    this one keeps its four fields, so that checkpoints written before termination existed
    restore unchanged.
    """

    inner: PyTree
    t: jax.Array
    noise: PyTree
    pending_steps: jax.Array


class EpisodeParticleState(NamedTuple):
    """ParticleState of a system with early termination; ``ended``: [P, M] bool, members whose
    episode ended (``done``) and who wait for their pair's episode slot to end."""

    inner: PyTree
    t: jax.Array
    noise: PyTree
    pending_steps: jax.Array
    ended: jax.Array


class Pending(NamedTuple):
    """``pending_steps`` of a System with running statistics: the burn-in's inner steps and
    the Moments of its observations, both reported by the next estimate."""

    steps: jax.Array
    observed: Any


def split_pending(pending) -> tuple[jax.Array, Any]:
    """(burn-in steps, the Moments of its observations or None) of ``pending_steps``."""
    return (pending.steps, pending.observed) if isinstance(pending, Pending) else (pending, None)


def particle_state(inner, t, noise, pending, ended=None):
    """ParticleState, or EpisodeParticleState when there are ``ended`` flags."""
    if ended is None:
        return ParticleState(inner, t, noise, pending)
    return EpisodeParticleState(inner, t, noise, pending, ended)


def state_ended(state) -> jax.Array | None:
    """The ``ended`` flags of a particle state (None without termination)."""
    return getattr(state, "ended", None)


class WindowStats(NamedTuple):
    """Per-pair sums over one window (leaves [P, ...]).

    A: sum_j (sum_m sign_m l_mj) * w_j, theta-shaped.  W: sum_j w_j, theta-shaped.
    loss_sum: sum_j of the members' losses (perturbed members only, unless all are unperturbed).
    steps: number of steps each pair took.  finite: whether all its losses, and their sum
      over the window, were finite.
    bad_t: the episode step t of its first non-finite loss, -1 if none.
    member_loss: [P, M] each member's loss summed over the window (None where not kept).
    taken: [P] member steps actually taken (None: steps times the number of members).
    observed: Moments of the system's ``observe`` over the member-steps taken by finite pairs
      (None without running statistics).
    """

    A: PyTree
    W: PyTree
    loss_sum: jax.Array
    steps: jax.Array
    finite: jax.Array
    bad_t: jax.Array
    member_loss: jax.Array | None = None
    taken: jax.Array | None = None
    observed: Any = None


# ----------------------------------------------------------------------------- validation


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}={value!r} must be an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


def check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, int | float | np.floating | np.integer):
        raise TypeError(f"sigma={sigma!r} must be a positive float")
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma={sigma} must be a finite float > 0")
    return float(sigma)


def check_particles(num_particles: Any, antithetic: bool) -> int:
    n = check_positive_int("num_particles", num_particles, 2)
    if antithetic and n % 2:
        raise ValueError(
            f"num_particles={n} must be even with antithetic=True (particles come in +/- pairs)"
        )
    return n


def check_mesh(mesh: Any, num_pairs: int) -> jax.sharding.Mesh | None:
    """A mesh whose devices shard the pair axis; explicit axes are turned into auto ones so
    that sharding constraints propagate through the window's scan."""
    if mesh is None:
        return None
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh={mesh!r} must be a jax.sharding.Mesh or None")
    if num_pairs % mesh.size:
        raise ValueError(
            f"mesh has {mesh.size} devices, which do not divide the {num_pairs} particle pairs "
            "(or particles, for estimators without pairs) evenly"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def shard_pairs(tree: PyTree, mesh: jax.sharding.Mesh | None, axis: int = 0) -> PyTree:
    """Constrain the pair axis (``axis``, by default the leading one) of every array leaf to be
    split over all mesh axes."""
    if mesh is None:
        return tree
    spec = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*(None,) * axis, mesh.axis_names))
    return tmap(lambda x: jax.lax.with_sharding_constraint(x, spec) if jnp.ndim(x) else x, tree)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name}={value!r} must be True or False")
    return bool(value)


def theta_spec(theta: PyTree) -> tuple:
    """(structure, leaf shapes and dtypes); a Python scalar leaf has no dtype and never matches
    the spec of a checked theta."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    return treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", None)) for x in leaves)


# ----------------------------------------------------------------------------- noise helpers


def tree_normal(key: jax.Array, like: PyTree, scale: float) -> PyTree:
    """Gaussian noise N(0, scale^2 I) with the structure, shapes and dtypes of ``like``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    noise = [scale * jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in
             zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, noise)


def batched_normal(key: jax.Array, num: int, like: PyTree, scale: float) -> PyTree:
    """[num, ...]-leading Gaussian noise, one independent draw per row."""
    return jax.vmap(lambda k: tree_normal(k, like, scale))(jax.random.split(key, num))


def init_inner(system: Any, key: jax.Array, num_pairs: int, num_members: int) -> PyTree:
    """Fresh inner states, one per pair (shared by its members): leaves [P, M, ...]."""
    fresh = jax.vmap(system.init)(jax.random.split(key, num_pairs))
    return expand_members(fresh, num_members)


def validate_start(system: Any, theta: PyTree, key: jax.Array) -> tuple[PyTree, bool]:
    """Checks common to every estimator's ``init``: a System, float theta, scalar loss.
    Returns (theta as arrays, whether the system's step returns ``done``)."""
    check_system(system)
    theta = check_theta(theta)
    return theta, check_step_output(system, theta, key)


# ----------------------------------------------------------------------------- the window


# Below this many elements in one inner state, a reset is a select against a fresh state
# computed every step; above it, a lax.cond runs init only on steps where some pair resets.
# The cond's predicate (a reduction) and branch dispatch cost more than initialising a small
# state (toy regression: 2 floats), but far less than re-initialising an MLP every step.
RESET_SELECT_MAX = 1024
# Up to this many elements, a window's per-step keys (and small fresh states) are drawn for
# all its steps before the scan: one vectorised threefry instead of three small loops per
# step (~8% of a swimmer window at 10 pairs); the values are the same either way.
PREDRAW_MAX = 1 << 22


def state_size(inner: PyTree) -> int:
    """Elements of one member's inner state (leaves [P, M, ...])."""
    return sum(int(np.prod(x.shape[2:])) for x in jax.tree_util.tree_leaves(inner))


class WindowSums(NamedTuple):
    """Per-pair sums of a window's loss differences d_j = sum_m sign_m l_mj, for hooks that
    credit a whole window at once (leaves [P]).

    diff: sum of d_j over the pair's active steps; steps: their number.
    diff_to_end, steps_to_end: the same up to and including the step that first ends an
      episode in this window (equal to diff, steps when none does).
    ended: an episode ended in this window.  ends_last: the pair's last active step ended one.
    """

    diff: jax.Array
    steps: jax.Array
    diff_to_end: jax.Array
    steps_to_end: jax.Array
    ended: jax.Array
    ends_last: jax.Array


class NoiseHooks:
    """How a noise carry (leaves [P, ...]) drives the perturbation and the credit of each step.

    All methods act on a whole batch of pairs.
    perturbation(noise) -> eps [P]: the step is taken at theta + sign * eps.
    weight(noise, done) -> w [P]: the step's loss difference is credited to w
        (``done``: [P] bool, this step ends the pair's episode).
    after_step(noise, done, t, key) -> noise: update after the step
        (``t``: [P] step index of the next step, ``key``: [P] keys).

    Hooks whose noise changes only when an episode ends, in a way fixed by the window's first
    noise, may also define ``window_credit`` (the same credit in closed form) and set
    ``closed_form_credit = True``: the scan then carries neither noise updates nor
    accumulators. A subclass that changes ``weight`` or ``after_step`` (the tests' broken
    estimators) sets it back to False, so that the per-step reference path runs.
    """

    closed_form_credit = False

    def perturbation(self, noise):
        raise NotImplementedError

    def weight(self, noise, done):
        raise NotImplementedError

    def after_step(self, noise, done, t, key):
        return noise

    def window_credit(self, noise, sums: WindowSums, need_W: bool):
        """noise: the carry at the window's start; sums: WindowSums. Returns (noise after the
        window, A, W) as the per-step hooks would have left them (W may be zeros when not
        need_W)."""
        raise NotImplementedError


def per_pair(v: jax.Array, like: jax.Array) -> jax.Array:
    """v: [P], reshaped to [P, 1, ...] to broadcast against ``like`` ([P, ...])."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _column_sums(x: jax.Array) -> jax.Array:
    """Sum over the leading axis of [K, ...] as one matrix-vector product: XLA's CPU reduction
    over a major axis runs several times slower than the dot."""
    k = x.shape[0]
    flat = jnp.reshape(x, (k, -1))
    out = jnp.dot(jnp.ones((k,), flat.dtype), flat, precision=jax.lax.Precision.HIGHEST)
    return jnp.reshape(out, x.shape[1:])


def _member_thetas(theta, hooks, noise, sign_arr, num_pairs, num_members, frozen=None):
    """[P, M]-leading theta of every member: theta + sign_m * eps_p (theta itself without
    hooks); entries marked in ``frozen`` (running statistics) stay theta's, unperturbed."""
    if hooks is None:
        return tmap(lambda th: jnp.broadcast_to(th, (num_pairs, num_members) + th.shape), theta)
    eps = hooks.perturbation(noise)

    def perturb(th, e):
        return th + sign_arr.reshape((1, -1) + (1,) * th.ndim) * e[:, None]

    if frozen is None:
        return tmap(perturb, theta, eps)
    return tmap(lambda th, e, f: jnp.where(f, th, perturb(th, e)), theta, eps, frozen)


def frozen_mask(system: Any, theta: PyTree) -> PyTree | None:
    """theta-shaped bools: the entries holding the system's running statistics (None without
    them). ES never perturbs them and the gradient there is 0."""
    hook = running_stats(system)
    if hook is None:
        return None
    ones = tmap(jnp.ones_like, hook.get(theta))
    return tmap(lambda x: x != 0, hook.put(tmap(jnp.zeros_like, theta), ones))


def observations(system: Any, inner: PyTree, live: jax.Array | None,
                 act: jax.Array | None, num_members: int) -> tuple[PyTree, jax.Array]:
    """(observe(state) of every member [P, M, ...], [P, M] the members taking this step)."""
    x = jax.vmap(jax.vmap(running_stats(system).observe))(inner)
    if live is not None:
        return x, live
    num_pairs = jax.tree_util.tree_leaves(inner)[0].shape[0]
    taking = jnp.ones((num_pairs, num_members), bool)
    return x, taking if act is None else taking & act[:, None]


def window_scan(
    system: Any,
    theta: PyTree,
    inner: PyTree,
    t: jax.Array,
    noise: PyTree,
    key: jax.Array,
    *,
    signs: tuple[float, ...],
    num_steps: int,
    hooks: NoiseHooks | None,
    active: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
    need_W: bool = True,
    ended: jax.Array | None = None,
    reset: str = "slot",
) -> tuple[tuple[PyTree, jax.Array, PyTree, jax.Array | None], WindowStats]:
    """Advance every pair by ``num_steps`` inner steps (one ``lax.scan``).

    Args:
      inner: [P, M] inner states; t: [P] step indices; noise: hooks' carry (ignored if hooks
        is None, in which case every member steps at theta itself and A, W are zeros).
      key: the window's key; pair p's step j uses _window.step_keys (the same for every member).
      signs: one per member; member m steps at theta + signs[m] * eps.
      active: optional [P] int; pair p only takes its first active[p] steps (burn-in).
      mesh: optional device mesh over which the pair axis is sharded.
      need_W: whether WindowStats.W is wanted (only the non-antithetic gradient uses it);
        without it W may be zeros.
      ended: [P, M] members waiting after an early ``done`` (None: no termination).
      reset: "slot" or "pair", when a pair whose members ended restarts (_window.RESETS).

    Returns the new (inner, t, noise, ended) and the window's per-pair WindowStats.

    The scan carries only what the next step depends on (states, t, and for per-step hooks
    their noise and accumulators); the losses leave it as [K, P, M] and the window's
    statistics are reduced from them once, instead of a dozen small operations per step.
    """
    num_pairs = t.shape[0]
    pair_keys = shard_pairs(jax.random.split(key, num_pairs), mesh)
    inner, t, noise, active, ended = shard_pairs((inner, t, noise, active, ended), mesh)
    t0 = t
    per_step_credit = hooks is not None and not hooks.closed_form_credit
    zeros_theta = tmap(lambda x: jnp.zeros((num_pairs,) + jnp.shape(x), jnp.result_type(x)), theta)
    xs = _window_inputs(system, inner, pair_keys, num_steps, mesh)
    body = _window_body(system, theta, pair_keys, signs, hooks, active, mesh, need_W,
                        per_step_credit, state_size(inner) <= RESET_SELECT_MAX,
                        reset == "pair")
    acc = (zeros_theta, zeros_theta) if per_step_credit else ((), ())
    (inner, t, ended, noise, A, W), ys = jax.lax.scan(
        body, (inner, t, ended, noise) + acc, xs)
    if hooks is None:
        A = W = zeros_theta
    seen = None
    if running_stats(system) is not None:
        ys, seen = ys
    stats, sums = _window_stats(ys, t0, active, num_steps, signs, system.horizon)
    if seen is not None:
        # Over [K, P, M]; pairs left out of the estimate for a NaN/inf loss are left out here.
        obs, taken = seen
        stats = stats._replace(observed=masked_moments(obs, taken & stats.finite[:, None]))
    if hooks is not None and not per_step_credit:
        noise, A, W = hooks.window_credit(noise, sums, need_W)
    return (inner, t, noise, ended), stats._replace(A=A, W=W)


def _window_inputs(system, inner, pair_keys, num_steps, mesh):
    """The scan's xs: step indices and, when small enough, every step's keys (and fresh states
    for resets by select) drawn up front; None where drawn per step."""
    num_pairs = pair_keys.shape[0]
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    predraw = num_steps * num_pairs * 6 <= PREDRAW_MAX
    all_keys = (shard_pairs(jax.vmap(lambda j: step_keys(pair_keys, j))(steps), mesh, axis=1)
                if predraw else None)
    fresh_all = None
    if predraw and state_size(inner) <= RESET_SELECT_MAX and system.horizon is not None and (
            num_steps * num_pairs * state_size(inner) <= PREDRAW_MAX):
        fresh_all = shard_pairs(jax.vmap(jax.vmap(system.init))(all_keys[:, :, 1]), mesh, axis=1)
    return steps, all_keys, fresh_all


def _window_body(system, theta, pair_keys, signs, hooks, active, mesh, need_W, per_step_credit,
                 reset_by_select, pair_reset=False):
    """The scan body of window_scan: one step of every member, then _window.advance."""
    num_pairs, num_members = pair_keys.shape[0], len(signs)
    sign_arr = jnp.asarray(signs, jnp.float32)
    # Members of a pair share t and every key: vmap over members broadcasts them.
    member_step = jax.vmap(system.step, in_axes=(0, 0, None, None))
    step_all = jax.vmap(member_step, in_axes=(0, 0, 0, 0))
    frozen = frozen_mask(system, theta)
    observing = running_stats(system) is not None

    def body(carry, xs):
        j, keys, fresh_j = xs
        inner, t, ended, noise, A, W = carry
        if keys is None:
            keys = step_keys(pair_keys, j)
        k_step, k_reset, k_noise = keys[:, 0], keys[:, 1], keys[:, 2]
        thetas = _member_thetas(theta, hooks, noise, sign_arr, num_pairs, num_members, frozen)
        act = None if active is None else j < active
        live = live_members(act, ended)
        seen = observations(system, inner, live, act, num_members) if observing else None
        new_inner, losses, term = step_or_wait(
            lambda: step_all(inner, thetas, t, k_step), live, inner)  # losses [P, M]
        losses = mask_waiting(losses, live)
        reset = make_reset(system.init, k_reset, num_members, by_select=reset_by_select,
                           fresh=fresh_j)
        adv = advance_pairs(system.horizon, inner, new_inner, t, act, reset, ended, term,
                            pair_reset)
        if per_step_credit:
            w = hooks.weight(noise, adv.done)
            diff = jnp.sum(losses * sign_arr, axis=1)
            diff = diff if act is None else jnp.where(act, diff, 0.0)
            A = tmap(lambda a, wi: a + per_pair(diff, wi) * wi, A, w)
            if need_W:
                W = tmap(lambda a, wi: a + (wi if act is None else jnp.where(
                    per_pair(act, wi), wi, 0.0)), W, w)
            new_noise = hooks.after_step(noise, adv.done, adv.t, k_noise)
            noise = new_noise if act is None else select(act, new_noise, noise)
        ys = losses if ended is None else (losses, adv.done, adv.live, t)
        ys = ys if seen is None else (ys, seen)
        return shard_pairs((adv.state, adv.t, adv.ended, noise, A, W), mesh), ys

    return body


def _window_stats(ys, t0, active, num_steps, signs, horizon):
    """Per-pair WindowStats (A, W left empty) and WindowSums of a window's scan outputs.

    ys: losses [K, P, M], or with termination (losses, done [K, P], live [K, P, M], t [K, P]).
    Per-step facts are rebuilt for the whole window: a pair takes steps j < n (its active
    count); without termination its step index then is (t0 + j) mod T, and its first episode
    end in the window is at j = T - 1 - t0.
    """
    terminating = isinstance(ys, tuple)
    losses, done_steps, live_steps, t_steps = ys if terminating else (ys, None, None, None)
    num_pairs = t0.shape[0]
    sign_arr = jnp.asarray(signs, jnp.float32)
    loss_mask = (sign_arr != 0) if bool(np.any(np.asarray(signs) != 0)) else jnp.ones(
        (len(signs),), bool)
    js = jnp.arange(num_steps, dtype=jnp.int32)[:, None]
    n = (jnp.full((num_pairs,), num_steps, jnp.int32) if active is None
         else jnp.minimum(active, num_steps).astype(jnp.int32))
    act = None if active is None else js < n[None, :]
    kept = losses if act is None else jnp.where(act[:, :, None], losses, 0.0)
    member_sums = _column_sums(kept)  # [P, M]
    loss_sum = jnp.sum(member_sums * loss_mask, axis=1)
    # A NaN or inf loss makes its pair's window sum non-finite (so does an overflowing sum,
    # whose gradient would be useless too); the step of the first bad loss is searched for
    # only in the rare window that has one.
    finite = jnp.isfinite(jnp.sum(member_sums, axis=1))

    def first_bad_step(_):
        finite_now = jnp.all(jnp.isfinite(kept), axis=2)  # [K, P]
        first = jnp.argmin(finite_now, axis=0)
        if terminating:
            t_bad = jnp.take_along_axis(t_steps, first[None], axis=0)[0]
        else:
            t_bad = t0 + first.astype(jnp.int32)
            if horizon is not None:
                t_bad = t_bad % horizon
        return jnp.where(jnp.all(finite_now, axis=0), -1, t_bad).astype(jnp.int32)

    bad_t = jax.lax.cond(jnp.all(finite), lambda _: -jnp.ones((num_pairs,), jnp.int32),
                         first_bad_step, None)
    taken = None
    if terminating:
        live_act = live_steps if act is None else live_steps & act[:, :, None]
        taken = jnp.sum(live_act, axis=(0, 2)).astype(jnp.int32)
    stats = WindowStats((), (), loss_sum.astype(jnp.float32), n, finite, bad_t,
                        member_sums.astype(jnp.float32), taken)

    diff = jnp.sum(member_sums * sign_arr, axis=1)
    if terminating:
        any_end = jnp.any(done_steps, axis=0)
        first_end = jnp.where(any_end, jnp.argmax(done_steps, axis=0), num_steps)
        ends_last = (n > 0) & jnp.take_along_axis(
            done_steps, jnp.maximum(n - 1, 0)[None], axis=0)[0]
    elif horizon is None:
        no = jnp.zeros((num_pairs,), bool)
        return stats, WindowSums(diff, n, diff, n, no, no)
    else:
        first_end = horizon - 1 - t0
        ends_last = (n > 0) & ((t0 + n) % horizon == 0)
    ended = first_end < n
    to_end = js <= first_end[None, :]
    if act is not None:
        to_end = to_end & act
    sums_to_end = _column_sums(jnp.where(to_end[:, :, None], kept, 0.0))
    diff_to_end = jnp.where(ended, jnp.sum(sums_to_end * sign_arr, axis=1), diff)
    return stats, WindowSums(diff, n, diff_to_end, jnp.minimum(n, first_end + 1), ended,
                             ends_last)


def reset_text(reset: str) -> str:
    """The ``reset`` part of an estimator's repr: empty for the default."""
    return "" if reset == "slot" else f", reset={reset!r}"


def stagger_offsets(key: jax.Array, num_pairs: int, horizon: int | None, stagger: bool):
    """Per-pair burn-in lengths: uniform on {0, ..., T-1} when staggering a finite horizon."""
    if not stagger or horizon is None or horizon == 1:
        return None
    return jax.random.randint(key, (num_pairs,), 0, horizon, dtype=jnp.int32)


def es_gradient(stats: WindowStats, sigma: float, antithetic: bool, num_steps: int,
                normalize_losses: bool = False, perturbed: tuple[bool, ...] | None = None,
                keep: jax.Array | None = None) -> PyTree:
    """Reduce per-pair window sums to the gradient of the mean per-step loss.

    antithetic: g = mean_p A_p / (2 sigma^2 K), A_p = sum_j (l+_pj - l-_pj) w_pj.
    plain: g = mean_p (A_p - b_p W_p) / (sigma^2 K) with the leave-one-out baseline
    b_p = mean_{q != p} of the other pairs' mean window losses, independent of pair p's noise
    and therefore unbiased.
    normalize_losses: g * 2 sigma / s, s the standard deviation of the perturbed particles'
    window losses (per step, finite pairs; ``perturbed`` marks which members count), so
    antithetic pairs give Mania et al.'s ARS step sum_p (f+_p - f-_p) z_p / (N s).
    Pairs with a non-finite loss are left out (the means run over the finite pairs); with no
    finite pair the gradient is NaN. keep: [P] bool, only these pairs count (top-b selection:
    the means, and the spread of normalize_losses, run over the kept finite pairs).
    """
    ok = stats.finite if keep is None else stats.finite & keep
    count = jnp.sum(ok)

    def mean_ok(x):
        return jnp.sum(jnp.where(per_pair(ok, x), x, 0.0), 0) / count

    if antithetic:
        grad = tmap(lambda a: mean_ok(a) / (2 * sigma**2 * num_steps), stats.A)
    else:
        mean_loss = jnp.where(ok, stats.loss_sum / num_steps, 0.0)
        baseline = (jnp.sum(mean_loss) - mean_loss) / jnp.maximum(count - 1, 1)

        def reduce(a, w):
            b = per_pair(baseline, a)
            return mean_ok(a - b * w) / (sigma**2 * num_steps)

        grad = tmap(reduce, stats.A, stats.W)
    if not normalize_losses:
        return grad
    members = stats.member_loss
    if perturbed is not None:
        members = members[:, np.flatnonzero(perturbed)]
    per_step = members / jnp.maximum(stats.steps, 1)[:, None]
    counted = jnp.broadcast_to(ok[:, None], per_step.shape)
    n = jnp.sum(counted)
    mean = jnp.sum(jnp.where(counted, per_step, 0.0)) / n
    spread = jnp.sqrt(jnp.sum(jnp.where(counted, (per_step - mean) ** 2, 0.0)) / n)
    # Identical losses (spread 0) carry no signal: a zero step rather than 0/0.
    scale = jnp.where(spread > 0, 2 * sigma / jnp.where(spread > 0, spread, 1.0), 0.0)
    return tmap(lambda g: g * scale.astype(g.dtype), grad)


def taken_steps(stats: WindowStats, members: int) -> jax.Array:
    """Inner steps the window's members actually took: active steps times members, less the
    steps of members waiting after an early ``done``."""
    return jnp.sum(stats.steps) * members if stats.taken is None else jnp.sum(stats.taken)


def window_info(stats: WindowStats, members: int, num_steps: int, pending: jax.Array,
                particles_per_pair: int) -> EstimateInfo:
    """EstimateInfo of a window: mean loss over finite pairs, steps, the first bad particle."""
    ok = stats.finite
    loss = jnp.sum(jnp.where(ok, stats.loss_sum, 0.0)) / (
        jnp.sum(ok) * particles_per_pair * num_steps)
    first = jnp.argmin(ok)  # first False, or 0 when all are finite
    any_bad = ~jnp.all(ok)
    return EstimateInfo(
        loss=loss,
        inner_steps=taken_steps(stats, members) + pending,
        num_nonfinite=jnp.sum(~ok).astype(jnp.int32),
        nonfinite_particle=jnp.where(any_bad, first * particles_per_pair, -1).astype(jnp.int32),
        nonfinite_step=jnp.where(any_bad, stats.bad_t[first], -1).astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- base classes


class _ById:
    """Stands for an unhashable value (a System holding arrays, say) in an estimator's key:
    equal only to itself."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _ById) and other.value is self.value

    def __hash__(self):
        return id(self.value)


def _key_part(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return _ById(value)
    return value


class _Frozen(type):
    """Metaclass of the estimators: once the outermost ``__init__`` returns, the instance is
    frozen and its settings become its identity for ``==``, ``hash`` and jit."""

    def __call__(cls, *args, **kwargs):
        est = super().__call__(*args, **kwargs)
        key = (type(est), tuple((k, _key_part(v)) for k, v in sorted(vars(est).items())))
        object.__setattr__(est, "_key", key)
        object.__setattr__(est, "_hash", hash(key))
        return est


class Estimator(metaclass=_Frozen):
    """Immutable configuration: attributes are set in ``__init__`` only. Two estimators are
    equal when they have the same class, settings and system (systems compare with ``==`` when
    hashable, else by identity), so they share jitted code."""

    def __setattr__(self, name, value):
        if "_key" in vars(self):
            raise AttributeError(
                f"{type(self).__name__} is immutable: construct a new one instead of setting "
                f"{name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and other._key == self._key

    def __hash__(self):
        return self._hash


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(estimator, key, theta):
    return estimator._init(key, theta)


@functools.partial(jax.jit, static_argnums=0)
def _estimate_jit(estimator, state, theta, key):
    """``estimator.estimate`` without its argument checks (``_estimate_jit.lower(estimator,
    state, theta, key)`` lowers it); jit keys its cache on the estimator's value."""
    return estimator._estimate(state, theta, key)


def _float_spec(spec: tuple) -> bool:
    return all(d is not None and jnp.issubdtype(d, jnp.floating) for _, d in spec[1])


class TruncatedEstimator(Estimator):
    """Public ``init`` / ``estimate`` and the stagger burn-in shared by windowed estimators.

    Subclasses set ``num_pairs`` and define ``_stored_members`` (signs of the members whose
    states persist), ``init_noise``, ``start_burn_in``/``end_window``, ``_estimate`` and, where
    the state holds theta-shaped noise, ``theta_like(state)`` (leaves [P, ...]) so that
    ``estimate`` can check theta against the ``init``'s.
    """

    def _setup(self, system, num_particles, truncation_length, stagger, mesh=None,
               reset="slot"):
        self.horizon = check_system(system)
        self.reset = check_reset(reset)
        self.system = system
        self.num_particles = num_particles
        self.mesh = check_mesh(mesh, self.num_pairs)
        self.truncation_length = check_positive_int("truncation_length", truncation_length)
        self.stagger = check_bool("stagger", stagger)

    num_pairs: int

    def _stored_members(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _burn_in_hooks(self) -> NoiseHooks | None:
        return None

    def init_noise(self, key, theta):
        return ()

    def start_burn_in(self, noise, key, theta):
        return noise

    def end_window(self, noise):
        return noise

    def theta_like(self, state: ParticleState) -> PyTree | None:
        """A theta-structured part of the state (leaves [P, *theta leaf]), or None."""
        return None

    def init(self, key: jax.Array, theta: PyTree) -> ParticleState:
        """Fresh particles; with ``stagger`` each pair is burned in to a uniform random step
        of its episode (those steps are reported in the first estimate's inner_steps).

        theta: pytree of float arrays (the same structure must be passed to ``estimate``).
        """
        theta, _ = validate_start(self.system, theta, key)
        return _init_jit(self, key, theta)

    def estimate(self, state: ParticleState, theta: PyTree, key: jax.Array):
        """One window of K steps for every particle.

        Returns (grad, new_state, info): grad has theta's structure and estimates the
        gradient of the mean per-step loss; info is an EstimateInfo.
        """
        spec = theta_spec(theta)
        like = self.theta_like(state)
        init_spec = None
        if like is not None:
            leaves, treedef = jax.tree_util.tree_flatten(like)
            init_spec = (treedef, tuple((x.shape[1:], x.dtype) for x in leaves))
        # Fast path, taken on every outer step: theta already float arrays of the init's spec.
        if _float_spec(spec) and (init_spec is None or spec == init_spec):
            return _estimate_jit(self, state, theta, key)
        theta = check_theta(theta)
        if init_spec is not None and theta_spec(theta) != init_spec:
            raise ValueError(
                "theta passed to estimate has a different structure, shape or dtype than at "
                f"init: {jax.tree_util.tree_map(jnp.shape, theta)}"
            )
        return _estimate_jit(self, state, theta, key)

    def _init(self, key, theta):
        keys = init_keys(key)
        members = self._stored_members()
        inner = init_inner(self.system, keys.inner, self.num_pairs, len(members))
        t = jnp.zeros((self.num_pairs,), jnp.int32)
        ended = fresh_ended(self.num_pairs, len(members),
                            check_step_output(self.system, theta, key))
        noise = self.init_noise(keys.noise, theta)
        pending = jnp.zeros((), jnp.int32)
        observed = None
        if running_stats(self.system) is not None:
            one = tmap(lambda x: x[0, 0], inner)
            observed = zero_moments(jax.eval_shape(running_stats(self.system).observe, one))
        offsets = stagger_offsets(keys.offsets, self.num_pairs, self.horizon, self.stagger)
        if offsets is not None:
            hooks = self._burn_in_hooks()
            if hooks is not None:
                noise = self.start_burn_in(noise, keys.burn_noise, theta)
            (inner, t, noise, ended), stats = window_scan(
                self.system, theta, inner, t, noise, keys.burn, signs=members,
                num_steps=self.horizon - 1, hooks=hooks, active=offsets, mesh=self.mesh,
                need_W=False, ended=ended, reset=self.reset)
            if hooks is not None:
                noise = self.end_window(noise)
            pending = taken_steps(stats, len(members))
            observed = stats.observed
        if observed is not None:  # the burn-in's observations count with the first window's
            pending = Pending(pending, observed)
        return particle_state(inner, t, noise, pending, ended)

    def _estimate(self, state, theta, key):
        raise NotImplementedError


def refuse_running_stats(name: str, system: Any) -> None:
    """The one error of the differentiating estimators on a System with running statistics."""
    if running_stats(system) is not None:
        raise ValueError(
            f"{name} differentiates the loss and does not keep running statistics (observation "
            "normalisation, obs_norm); use an ES estimator: PES, FullES, NRES or TruncatedES")


class IndependentParticles(TruncatedEstimator):
    """Estimators whose particles are independent and unperturbed (backprop, RTRL, UORO):
    one member per particle, each with its own keys."""

    def __init__(self, system, *, num_particles=1, truncation_length, stagger=True, mesh=None,
                 reset="slot"):
        refuse_running_stats(type(self).__name__, system)
        self._setup(system, check_positive_int("num_particles", num_particles),
                    truncation_length, stagger, mesh, reset)

    def __repr__(self):
        return (f"{type(self).__name__}(num_particles={self.num_particles}, "
                f"truncation_length={self.truncation_length}, stagger={self.stagger}"
                f"{reset_text(self.reset)})")

    @property
    def num_pairs(self) -> int:
        return self.num_particles

    def _stored_members(self):
        return (0.0,)


class ESEstimator(TruncatedEstimator, NoiseHooks):
    """Common shape of the ES family: pairs of perturbed particles, one window per estimate.

    Subclasses define the noise carry through ``init_noise``, ``start_window``,
    ``end_window`` and the NoiseHooks methods. ``unperturbed_member`` adds a member stepping at
    theta itself whose final state becomes the pair's stored state (truncated ES).
    """

    unperturbed_member = False

    def __init__(self, system, *, num_particles, sigma, truncation_length, antithetic=True,
                 stagger=True, normalize_losses=False, centered_ranks=False, top_b=None,
                 mesh=None, reset="slot"):
        self.antithetic = check_bool("antithetic", antithetic)
        self.normalize_losses = check_bool("normalize_losses", normalize_losses)
        self.sigma = check_sigma(sigma)
        self._setup(system, check_particles(num_particles, self.antithetic), truncation_length,
                    stagger, mesh, reset)
        self._setup_ars(centered_ranks, top_b)

    def _setup_ars(self, centered_ranks, top_b):
        """ARS's options (pes.estimators._ars): centred-rank fitness shaping, top-b pairs."""
        self.centered_ranks = check_bool("centered_ranks", centered_ranks)
        self.top_b = None if top_b is None else check_positive_int("top_b", top_b)
        if (self.centered_ranks or self.top_b is not None) and not self.antithetic:
            raise ValueError("centered_ranks and top_b act on antithetic pairs; they need "
                             "antithetic=True")
        if self.top_b is not None and self.top_b > self.num_pairs:
            raise ValueError(f"top_b={self.top_b} must be at most the number of antithetic "
                             f"pairs ({self.num_pairs} = num_particles / 2)")
        if self.centered_ranks and self.normalize_losses:
            raise ValueError("centered_ranks and normalize_losses exclude each other: ranks "
                             "already fix the losses' scale")

    def _ars_repr(self) -> str:
        return ((", normalize_losses=True" if self.normalize_losses else "")
                + (", centered_ranks=True" if self.centered_ranks else "")
                + (f", top_b={self.top_b}" if self.top_b is not None else ""))

    def __repr__(self):
        return (f"{type(self).__name__}(num_particles={self.num_particles}, sigma={self.sigma}, "
                f"truncation_length={self.truncation_length}, antithetic={self.antithetic}, "
                f"stagger={self.stagger}" + self._ars_repr() + reset_text(self.reset) + ")")

    @property
    def num_pairs(self) -> int:
        return self.num_particles // 2 if self.antithetic else self.num_particles

    @property
    def signs(self) -> tuple[float, ...]:
        return (1.0, -1.0) if self.antithetic else (1.0,)

    def start_window(self, noise, key, theta):
        return noise

    def start_burn_in(self, noise, key, theta):
        """Noise for the stagger burn-in; by default the burn-in is an ordinary window, whose
        perturbation and credit the particle keeps."""
        return self.start_window(noise, key, theta)

    def _stored_members(self):
        return (0.0,) if self.unperturbed_member else self.signs

    def _burn_in_hooks(self):
        # Truncated ES stores only the unperturbed state, which needs no noise.
        return None if self.unperturbed_member else self

    def _estimate(self, state, theta, key):
        k_noise, k_window = jax.random.split(key)
        noise = self.start_window(state.noise, k_noise, theta)
        signs = self.signs + ((0.0,) if self.unperturbed_member else ())
        inner, ended = state.inner, state_ended(state)
        if self.unperturbed_member:
            # Every member starts from the stored state (and its waiting flag).
            inner, ended = expand_members(tmap(lambda x: x[:, 0], (inner, ended)), len(signs))
        K = self.truncation_length
        (inner, t, noise, ended), stats = window_scan(
            self.system, theta, inner, state.t, noise, k_window, signs=signs, num_steps=K,
            hooks=self, mesh=self.mesh, need_W=not self.antithetic or self.centered_ranks,
            ended=ended, reset=self.reset)
        noise = self.end_window(noise)
        if self.unperturbed_member:
            inner, ended = tmap(lambda x: x[:, -1:], (inner, ended))
        perturbed = tuple(m != 0 for m in signs)
        keep = None if self.top_b is None else _ars.top_b_pairs(stats, perturbed, self.top_b)
        shaped = (_ars.rank_credit(stats, perturbed, signs, K) if self.centered_ranks
                  else stats)
        grad = es_gradient(shaped, self.sigma, self.antithetic, K, self.normalize_losses,
                           perturbed, keep)
        frozen = frozen_mask(self.system, theta)
        if frozen is not None:  # the running statistics are set by pes.train, not a gradient
            grad = tmap(lambda g, f: jnp.where(f, jnp.zeros_like(g), g), grad, frozen)
        steps, earlier = split_pending(state.pending_steps)
        info = window_info(stats, len(signs), K, steps, len(self.signs))
        pending = jnp.zeros((), jnp.int32)
        if earlier is not None:
            info = info._replace(observed=merge_moments(earlier, stats.observed))
            pending = Pending(pending, tmap(jnp.zeros_like, earlier))
        return grad, particle_state(inner, t, noise, pending, ended), info
