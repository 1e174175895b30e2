"""The one step-and-reset rule and the one key schedule that every estimator's window uses.

Layout. Particles come in *pairs* whose members share every key; member states carry leaves
``[P, M, ...]`` (pairs, members) and per-pair quantities (the step index t) ``[P]``.

Keys. An estimator's ``init`` splits its key five ways (:func:`init_keys`). A window's key is
split into one key per pair; pair p's step j uses ``split(fold_in(pair_key, j), 3)``: (step key,
reset key, noise key) (:func:`step_keys`), the same for every member of the pair.

Episodes (:func:`advance`). A step takes a pair from t to t + 1; when t + 1 reaches the horizon
T the pair's members restart from ``system.init(reset key)`` and t <- 0. A system whose ``step``
returns ``(state, loss, done)`` ends a member's episode early: that member then *waits*, its
state frozen and its losses 0, until its pair's episode slot ends at T, so every episode
occupies exactly T steps of its pair's clock (see docs/termination.md for why this keeps the
ES family unbiased). Waiting steps call no simulator when the whole batch waits, and are
never counted as inner steps. With ``reset="pair"`` (:data:`RESETS`) a pair's slot also ends as
soon as all its members have ended: the pair restarts at once (a faster mode with another
expectation; docs/termination.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pes.system import PyTree

tmap = jax.tree_util.tree_map

# When a pair whose members end early restarts: "slot", when its clock reaches the horizon
# (the default; PES, NRES and full ES unbiased for L); "pair", as soon as all its members have
# ended (or at the horizon).
RESETS = ("slot", "pair")


def check_reset(reset: str) -> str:
    if reset not in RESETS:
        raise ValueError(f"reset={reset!r} must be one of {', '.join(map(repr, RESETS))}")
    return reset


# ----------------------------------------------------------------------------- keys


class InitKeys(NamedTuple):
    """The five keys of an estimator's ``init``: fresh states, noise, stagger offsets, the
    burn-in window, the burn-in's noise."""

    inner: jax.Array
    noise: jax.Array
    offsets: jax.Array
    burn: jax.Array
    burn_noise: jax.Array


def init_keys(key: jax.Array) -> InitKeys:
    return InitKeys(*jax.random.split(key, 5))


def one_step_keys(pair_key: jax.Array, j: jax.Array) -> jax.Array:
    """[3, ...]: (step key, reset key, noise key) of one pair's window step j."""
    return jax.random.split(jax.random.fold_in(pair_key, j), 3)


def step_keys(pair_keys: jax.Array, j: jax.Array) -> jax.Array:
    """[P, 3, ...]: the keys of window step j for every pair (pair_keys: [P, ...])."""
    return jax.vmap(lambda k: one_step_keys(k, j))(pair_keys)


def step_keys_at(pair_keys: jax.Array, steps: jax.Array) -> jax.Array:
    """[P, n, 3, ...]: the keys of steps[p, i] of pair p (steps: [P, n] window step indices)."""
    return jax.vmap(jax.vmap(one_step_keys, in_axes=(None, 0)))(pair_keys, steps)


# ----------------------------------------------------------------------------- selection


def select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """Per-row ``where``: rows of ``a`` where pred[i] else rows of ``b`` (pred is [P] or [P, M])."""

    def sel(x, y):
        p = jnp.reshape(pred, pred.shape + (1,) * (x.ndim - pred.ndim))
        return jnp.where(p, x, y)

    return tmap(sel, a, b)


def expand_members(tree: PyTree, num_members: int) -> PyTree:
    """[P, ...] -> [P, M, ...] by repeating each pair's state for its members."""
    return tmap(lambda x: jnp.repeat(x[:, None], num_members, axis=1), tree)


# ----------------------------------------------------------------------------- one step


def split_step(out: tuple) -> tuple[PyTree, jax.Array, jax.Array | None]:
    """(state, loss, done) of a step's output; done is None for a two-tuple system."""
    if len(out) == 3:
        state, loss, done = out
        return state, loss, jnp.asarray(done).astype(bool)
    state, loss = out
    return state, loss, None


class Advanced(NamedTuple):
    """The outcome of one step of a batch of pairs.

    state: member states after the step (leaves [P, M, ...]): inactive pairs and waiting
      members unchanged, pairs whose episode slot ended restarted.
    t: [P] step index of each pair's next step.
    ended: [P, M] members whose episode has ended and who wait for their pair's slot to end
      (None for a system without termination).
    done: [P] the pair's episode slot ended with this step (it restarts from init).
    live: [P, M] members that took this step (None: every member of an active pair).
    """

    state: PyTree
    t: jax.Array
    ended: jax.Array | None
    done: jax.Array
    live: jax.Array | None


def live_members(act: jax.Array | None, ended: jax.Array | None) -> jax.Array | None:
    """[P, M] members that take the coming step: not waiting, in an active pair (None when
    there is no termination: every member of an active pair)."""
    if ended is None:
        return None
    return ~ended if act is None else ~ended & act[:, None]


def advance(horizon: int | None, old: PyTree, new: PyTree, t: jax.Array,
            act: jax.Array | None, reset: Callable[[jax.Array, PyTree], PyTree],
            ended: jax.Array | None = None, terminated: jax.Array | None = None,
            pair_reset: bool = False) -> Advanced:
    """Apply the step-and-reset rule after ``new = step(old)`` for every member.

    horizon: T or None.  old, new: member states before and after the step (leaves [P, M, ...]).
    t: [P].  act: [P] bool, pairs taking this step (None: all).  reset(mask, x) -> x with the
    rows mask[p] replaced by fresh states (it draws or selects them).  ended: [P, M] members
    already waiting (None: the system has no termination).  terminated: [P, M] the ``done`` each
    member's step returned.  pair_reset: reset="pair".

    A pair's slot ends when t + 1 reaches T; without a horizon (or with pair_reset), a
    terminating pair's slot also ends when all its members have ended.
    """
    t_next = t + 1
    if ended is None:
        done = (jnp.zeros(t.shape, bool) if horizon is None
                else (t_next >= horizon) if act is None else (t_next >= horizon) & act)
        live = None
        state = new if act is None else select(act, new, old)
    else:
        live = live_members(act, ended)
        state = select(live, new, old)
        ended = ended | (terminated & live)
        if horizon is None:
            done = jnp.all(ended, axis=1)
        elif pair_reset:
            done = (t_next >= horizon) | jnp.all(ended, axis=1)
        else:
            done = t_next >= horizon
        if act is not None:
            done = done & act
    if horizon is not None or ended is not None:
        state = reset(done, state)
        t_next = jnp.where(done, 0, t_next)
        if ended is not None:
            ended = ended & ~done[:, None]
    t_new = t_next if act is None else jnp.where(act, t_next, t)
    return Advanced(state, t_new, ended, done, live)


def reset_rows(init: Callable, k_reset: jax.Array, num_members: int, *, by_select: bool,
               fresh: PyTree | None = None) -> Callable[[jax.Array, PyTree], PyTree]:
    """A ``reset`` for :func:`advance`: rows restart from ``init(k_reset[p])`` (shared by the
    pair's members). by_select: compute fresh states every step and select (cheap for small
    states; ``fresh`` may hold them precomputed); else a lax.cond initialises only on steps
    where some pair resets."""

    def reset(mask, x):
        def put(x):
            f = jax.vmap(init)(k_reset) if fresh is None else fresh
            return select(mask, expand_members(f, num_members), x)

        if by_select:
            return put(x)
        return jax.lax.cond(jnp.any(mask), put, lambda x: x, x)

    return reset


def mask_losses(losses: jax.Array, live: jax.Array | None) -> jax.Array:
    """Losses of waiting members are 0 (they took no step): losses [P, M] or [P]."""
    if live is None:
        return losses
    return jnp.where(live, losses, jnp.zeros_like(losses))


def fresh_ended(num_pairs: int, num_members: int, terminates: bool) -> jax.Array | None:
    """The ``ended`` flags of fresh particles: none ended ([P, M] False), None without
    termination."""
    return jnp.zeros((num_pairs, num_members), bool) if terminates else None


def step_or_wait(step: Callable[[], tuple], live: jax.Array | None, state: PyTree) -> tuple:
    """(new state, losses, done) of ``step()``, unless no member is live (all wait or are
    inactive): then the states stay, losses are 0, done False, and no simulator is called.
    ``step`` returns the (state, loss[, done]) of a batched ``system.step``."""
    if live is None:
        return split_step(step())
    shapes = jax.eval_shape(lambda: split_step(step()))

    def wait():
        return (state, jnp.zeros(shapes[1].shape, shapes[1].dtype),
                jnp.zeros(shapes[2].shape, bool))

    return jax.lax.cond(jnp.any(live), lambda: split_step(step()), wait)
