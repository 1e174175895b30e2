"""Augmented random search's (Mania, Guy, Recht 2018) reshaping of an ES window's credit.

Both act on a window's per-pair statistics (``WindowStats``) after the scan, so they apply alike
to PES, full ES, NRES and truncated ES (antithetic pairs only):

* centred ranks: each perturbed particle's window loss L (sum of its K per-step losses) is
  replaced by its centred rank among the 2N window losses of the finite pairs,
  r = rank / (2N - 1) - 0.5 in [-1/2, 1/2] (ties share their mean rank). The pair's credit
  A_p = sum_j d_j w_j becomes (r+ - r-) K * W_p / n_p, W_p = sum_j w_j over its n_p steps:
  the rank difference times the mean weight of the window's steps. That is
  (r+ - r-) (xi + eps) for PES and (r+ - r-) eps for the others whenever no episode ends
  inside the window; a window that holds an episode's end spreads the rank over the steps'
  weights as the steps fall. The factor K undoes es_gradient's division by K, so the estimate
  is mean_p (r+ - r-) w_p / (2 sigma^2) (ranks stand for per-step mean losses).
* top-b: only the b pairs whose best window return max(-L+, -L-) is highest enter the mean
  over pairs (ARS V2-t); the others are dropped as a non-finite pair is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pes.estimators._window import tmap


def perturbed_losses(member_loss: jax.Array, perturbed: tuple[bool, ...]) -> jax.Array:
    """[P, 2]: the window losses of a pair's +/- members (member_loss [P, M])."""
    return member_loss[:, np.flatnonzero(perturbed)]


def centred_ranks(losses: jax.Array, ok: jax.Array) -> jax.Array:
    """losses [P, M] -> [P, M] centred ranks rank / (n - 1) - 0.5 over the n = M * sum(ok)
    losses of the pairs with ok [P] (the others' entries are 0). Equal losses share the mean of
    their ranks, so a pair with L+ = L- gets r+ - r- = 0 as the plain estimate would."""
    flat = losses.reshape(-1)
    valid = jnp.repeat(ok, losses.shape[1])
    less = jnp.sum(valid[None, :] & (flat[None, :] < flat[:, None]), axis=1)
    equal = jnp.sum(valid[None, :] & (flat[None, :] == flat[:, None]), axis=1)
    rank = less + 0.5 * (equal - 1)
    n = jnp.sum(valid)
    centred = rank / jnp.maximum(n - 1, 1) - 0.5
    return jnp.where(valid, centred, 0.0).reshape(losses.shape).astype(jnp.float32)


def rank_credit(stats, perturbed: tuple[bool, ...], signs: tuple[float, ...],
                num_steps: int):
    """stats with A replaced by the centred-rank credit (module docstring); needs stats.W."""
    losses = perturbed_losses(stats.member_loss, perturbed)
    ranks = centred_ranks(losses, stats.finite)
    sign_arr = jnp.asarray([s for s, p in zip(signs, perturbed, strict=True) if p], jnp.float32)
    diff = jnp.sum(ranks * sign_arr, axis=1) * num_steps
    scale = diff / jnp.maximum(stats.steps, 1).astype(jnp.float32)

    def credit(w):
        return scale.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype) * w

    return stats._replace(A=tmap(credit, stats.W))


def top_b_pairs(stats, perturbed: tuple[bool, ...], b: int) -> jax.Array:
    """[P] bool: the b pairs whose best window return max(-L+, -L-) is highest (non-finite
    pairs last; ties go to the lower index)."""
    losses = perturbed_losses(stats.member_loss, perturbed)
    best = -jnp.min(losses, axis=1)
    best = jnp.where(stats.finite & jnp.isfinite(best), best, -jnp.inf)
    _, idx = jax.lax.top_k(best, b)
    return jnp.zeros(best.shape, bool).at[idx].set(True)
