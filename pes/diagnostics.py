"""Bias, variance and cost of a gradient estimator against a reference gradient.

For an estimator E, a System and a theta, :func:`diagnose` draws R independent estimates
g_1 .. g_R (replicate r starts from ``E.init`` with its own key, then averages ``windows``
consecutive ``E.estimate`` calls) and compares them with a reference gradient g_ref:

    bias                  b   = mean_r g_r - g_ref                     (per component)
    its standard error    se_i = sqrt(var_r(g_r,i) / R + se_ref,i^2)
    normalised variance   V   = mean_r |g_r - g_ref|^2 / |g_ref|^2     (the PES paper's measure)
    its standard error    se_V = std_r(|g_r - g_ref|^2 / |g_ref|^2) / sqrt(R)
    normalised spread     S   = sum_i var_r(g_r,i) / |g_ref|^2          (variance about E's mean)

so that V ~ S + |b|^2 / |g_ref|^2: V counts bias as error, as the paper's measure does. The norm
of the bias has the delta-method standard error se_|b| = sqrt(sum_i b_i^2 se_i^2) / |b|; since
|b| is itself biased upwards by noise, the result also reports the noise floor sqrt(sum_i se_i^2)
(about the |b| an unbiased estimator shows), the largest per-component |b_i| / se_i, the mean
of (b_i / se_i)^2 over the D components (about 1 for an unbiased estimator) and that mean
standardised, ``bias_chi2_z`` (about N(0, 1) without bias; see :func:`chi2_z`).

The reference (:func:`reference_gradient`) is the gradient of the Gaussian-smoothed
*full-episode* objective

    J_sigma(theta) = E_eps[ L(theta + eps) ],  eps ~ N(0, sigma^2 I),  L = mean_{t<T} l_t

with one eps for the whole episode, computed either

* ``'autodiff'``: grad J_sigma = E_eps[grad L(theta + eps)], estimated by full backprop through
  whole episodes (``num_steps`` steps from ``system.init``; T for a finite horizon) at
  antithetic perturbations: g_i = (grad L(theta + eps_i) + grad L(theta - eps_i)) / 2, the
  two sharing the episode's keys; mean and standard error over i. sigma = 0 is the plain
  expected gradient E[grad L(theta)] over the system's own randomness. Needs a differentiable
  system; or
* ``'es'``: full-episode antithetic ES with many pairs, g_i = (L(theta + eps_i) -
  L(theta - eps_i)) eps_i / (2 sigma^2), for systems that cannot be differentiated.

Why full-episode smoothing. FullES and NRES (one eps per episode) are unbiased for exactly
grad J_sigma. PES draws a fresh eps_w for every window w, so it is unbiased for the gradient of
a different smoothing, J_sigma^K(theta) = E[L(theta + eps_1 on window 1, ..., theta + eps_n on
window n)], which depends on K. Expanding L in the per-window copies theta_w of theta, the two
gradients differ by (sigma^2 / 2) grad sum_{w != v} tr(d^2 L / d theta_w d theta_v) + O(sigma^4):
third derivatives, zero for losses quadratic in theta. The full-episode one is
the right common reference: it is one fixed target for every estimator and every K (so
differences between K values are variance, not moving goalposts), it is the objective the
caller means by "the smoothed meta-loss", and it is what the PES paper's reference (ES with
5000 particles on the full sequence) estimates. With a small sigma the O(sigma^2) gap is far
below the estimators' noise; the diagnostic would report it as a (tiny) bias of PES.

Replicates run as one ``jax.vmap`` over replicate keys (``batch_size`` at a time) of the
estimator's own ``init`` and ``estimate`` (compiled once per estimator and reused by later
calls); ``windows`` consecutive estimates are a Python loop of jitted calls. ``vmap=False`` runs
a plain Python loop per replicate instead.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from pes.system import PyTree, check_system, check_theta, tree_shapes_match, unroll

REFERENCE_METHODS = ("autodiff", "es")


# ----------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Reference:
    """A reference gradient and its Monte Carlo standard error.

    grad: theta-shaped reference gradient. se: theta-shaped standard error of each component
    (None for an exact reference the caller supplied). method: 'autodiff', 'es' or 'given'.
    sigma: smoothing scale. num_samples: perturbation samples (antithetic pairs) averaged.
    num_steps: steps per episode. inner_steps: inner steps it cost.
    """

    grad: PyTree
    se: PyTree | None = None
    method: str = "given"
    sigma: float = 0.0
    num_samples: int = 0
    num_steps: int | None = None
    inner_steps: int = 0

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(grad, se) as float64 vectors in ``ravel_pytree`` order (se zeros when exact)."""
        g = _flat(self.grad)
        se = np.zeros_like(g) if self.se is None else _flat(self.se)
        return g, se

    def to_dict(self) -> dict[str, Any]:
        g, se = self.flat()
        return {
            "method": self.method, "sigma": self.sigma, "num_samples": self.num_samples,
            "num_steps": self.num_steps, "inner_steps": self.inner_steps,
            "norm": float(np.linalg.norm(g)),
            "relative_se": float(np.linalg.norm(se) / max(np.linalg.norm(g), 1e-300)),
        }


def _flat(tree: PyTree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def _episode_steps(system: Any, num_steps: int | None) -> int:
    horizon = check_system(system)
    if num_steps is None:
        if horizon is None:
            raise ValueError(
                "num_steps is required for a system with horizon=None (it never resets): "
                "the reference smooths the mean loss of that many steps from system.init"
            )
        return horizon
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive int")
    return int(num_steps)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


def reference_gradient(
    system: Any,
    theta: PyTree,
    key: jax.Array,
    *,
    method: str = "autodiff",
    sigma: float = 0.0,
    num_samples: int = 256,
    num_steps: int | None = None,
    batch_size: int = 64,
) -> Reference:
    """The gradient of the smoothed full-episode objective J_sigma (see the module docstring).

    Args:
      system: a pes.System (differentiable for 'autodiff').
      theta: the point, a pytree of float arrays.
      key: PRNG key; sample i uses fold_in(key, i) for its noise and episode keys.
      method: 'autodiff' (full backprop at antithetic perturbations) or 'es' (full-episode
        antithetic ES; needs sigma > 0).
      sigma: smoothing scale, that of the estimators compared (0: no smoothing, autodiff only).
      num_samples: antithetic pairs averaged (an ES reference with 2 x num_samples particles).
      num_steps: episode length; the horizon by default, required when it is None.
      batch_size: pairs evaluated together (one vmap lane each).

    Returns a :class:`Reference` with the per-component standard error of the mean.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"reference method={method!r} must be one of {REFERENCE_METHODS}")
    num_steps = _episode_steps(system, num_steps)
    theta = check_theta(theta)
    num_samples = _check_count("num_samples", num_samples, 2)
    batch_size = min(_check_count("batch_size", batch_size, 1), num_samples)
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0 or (method == "es" and sigma == 0):
        raise ValueError(
            f"sigma={sigma!r} must be a finite float >= 0 (> 0 for the 'es' reference)"
        )
    flat_theta, unravel = ravel_pytree(theta)

    def mean_loss(flat, k_episode):
        return unroll(system, unravel(flat), k_episode, num_steps)[1].mean()

    def sample(k):
        k_eps, k_episode = jax.random.split(k)
        eps = sigma * jax.random.normal(k_eps, flat_theta.shape, flat_theta.dtype)
        if method == "autodiff":
            grad = jax.grad(mean_loss)
            return 0.5 * (grad(flat_theta + eps, k_episode) + grad(flat_theta - eps, k_episode))
        diff = mean_loss(flat_theta + eps, k_episode) - mean_loss(flat_theta - eps, k_episode)
        return diff * eps / (2 * sigma**2)

    @jax.jit
    def run(keys):
        samples = jax.lax.map(sample, keys, batch_size=batch_size)
        return samples.mean(0), samples.var(0, ddof=1)

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
    mean, var = run(keys)
    mean = np.asarray(mean, np.float64)
    se = np.sqrt(np.asarray(var, np.float64) / num_samples)
    return Reference(
        grad=unravel(jnp.asarray(mean, flat_theta.dtype)),
        se=unravel(jnp.asarray(se, flat_theta.dtype)),
        method=method, sigma=sigma, num_samples=num_samples, num_steps=num_steps,
        inner_steps=2 * num_samples * num_steps,
    )


# ----------------------------------------------------------------------------- the replicates


def replicate_estimates(
    estimator: Any,
    theta: PyTree,
    key: jax.Array,
    num_replicates: int,
    *,
    windows: int = 1,
    batch_size: int | None = None,
    vmap: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """R independent estimates, each the mean of ``windows`` consecutive estimates.

    Replicate r uses key_r = fold_in(key, r): its particles start from
    ``estimator.init(split(key_r)[0], theta)`` and window w uses
    ``fold_in(split(key_r)[1], w)``; replicates share nothing.

    Returns (estimates [R, D] float64 in ``ravel_pytree(theta)`` order, inner_steps [R]: inner
    steps each replicate cost, burn-in included).
    """
    num_replicates = _check_count("num_replicates", num_replicates, 1)
    windows = _check_count("windows", windows, 1)
    batch_size = num_replicates if batch_size is None else _check_count(
        "batch_size", batch_size, 1)
    theta = check_theta(theta)
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(num_replicates))
    if not vmap:
        rows, costs = [], []
        for r in range(num_replicates):
            g, cost = _one_replicate(estimator, theta, keys[r], windows)
            rows.append(g)
            costs.append(cost)
        return np.stack(rows), np.asarray(costs, np.float64)

    fns = _batched(estimator)
    rows, costs = [], []
    for start in range(0, num_replicates, batch_size):
        k = keys[start:start + batch_size]
        if windows == 1:  # one compiled program instead of two
            total, _, cost = fns.once(k, theta)
        else:
            state = fns.init(k, theta)
            total, cost = 0.0, 0
            for w in range(windows):
                g, state, steps = fns.estimate(state, theta, k, jnp.int32(w))
                total = total + g
                cost = cost + steps
        rows.append(np.asarray(total, np.float64) / windows)
        costs.append(np.asarray(cost, np.float64))
    return np.concatenate(rows), np.concatenate(costs)


class _BatchedFns(NamedTuple):
    """jit(vmap(.)) over replicate keys: init; estimate of window w; init + window 0."""

    init: Callable
    estimate: Callable
    once: Callable


_BATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batched(estimator: Any) -> _BatchedFns:
    """The batched functions of one estimator, cached per estimator (so that diagnosing it
    again reuses the compiled code)."""
    cacheable = _weakrefable(estimator)
    if cacheable and estimator in _BATCHED:
        return _BATCHED[estimator]
    # A weak reference in the closures, so that the cache does not keep the estimator alive.
    ref = weakref.ref(estimator) if cacheable else (lambda: estimator)

    def init(k, theta):
        k_init, _ = jax.random.split(k)
        return ref().init(k_init, theta)  # validates the system and theta while traced

    def estimate(state, theta, k, w):
        _, k_run = jax.random.split(k)
        g, state, info = ref().estimate(state, theta, jax.random.fold_in(k_run, w))
        return ravel_pytree(g)[0], state, info.inner_steps

    def once(k, theta):
        return estimate(init(k, theta), theta, k, 0)

    fns = _BatchedFns(
        init=jax.jit(jax.vmap(init, in_axes=(0, None))),
        estimate=jax.jit(jax.vmap(estimate, in_axes=(0, None, 0, None))),
        once=jax.jit(jax.vmap(once, in_axes=(0, None))),
    )
    if cacheable:
        _BATCHED[estimator] = fns
    return fns


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _one_replicate(estimator, theta, key, windows):
    k_init, k_run = jax.random.split(key)
    state = estimator.init(k_init, theta)
    total, cost = 0.0, 0
    for w in range(windows):
        g, state, info = estimator.estimate(state, theta, jax.random.fold_in(k_run, w))
        total = total + _flat(g)
        cost += int(info.inner_steps)
    return total / windows, cost


# ----------------------------------------------------------------------------- the diagnosis


@dataclass(frozen=True)
class Diagnosis:
    """Bias, variance and cost of one estimator at one theta (module docstring for the math).

    estimator: its name; truncation_length: K (None if it has none); num_particles, sigma:
    its settings (None if it has none); num_replicates: R; windows: estimates averaged per
    replicate; inner_steps: mean inner steps one replicate's estimate cost.
    bias_norm |b|, bias_norm_se (delta method), bias_noise_floor sqrt(sum se_i^2),
    relative_bias |b| / |g_ref|, bias_z_max max_i |b_i| / se_i, bias_chi2_dof
    mean_i (b_i / se_i)^2, bias_chi2_z: that mean standardised, about N(0, 1) for an unbiased
    estimator (see :func:`chi2_z`), num_components D; normalized_variance V and its SE;
    normalized_spread S = tr Cov(g) / |g_ref|^2; reference_norm |g_ref|; reference_noise
    |se_ref|^2 / |g_ref|^2 (what the reference's own error adds to V); reference_method.
    bias, bias_se: per-component arrays (float64, ``ravel_pytree`` order).
    """

    estimator: str
    truncation_length: int | None
    num_particles: int | None
    sigma: float | None
    num_replicates: int
    windows: int
    inner_steps: float
    bias_norm: float
    bias_norm_se: float
    bias_noise_floor: float
    relative_bias: float
    bias_z_max: float
    bias_chi2_dof: float
    bias_chi2_z: float
    num_components: int
    normalized_variance: float
    normalized_variance_se: float
    normalized_spread: float
    reference_norm: float
    reference_noise: float
    reference_method: str
    bias: np.ndarray = field(repr=False, compare=False)
    bias_se: np.ndarray = field(repr=False, compare=False)

    def to_dict(self, components: bool = False) -> dict[str, Any]:
        """JSON-ready dict (nan as None); ``components=True`` adds the per-component bias and
        its SE."""
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in asdict(self).items()}
        bias, bias_se = out.pop("bias"), out.pop("bias_se")
        if components:
            out["bias"] = [float(x) for x in bias]
            out["bias_se"] = [float(x) for x in bias_se]
        return out


def _as_reference(reference, estimator, system, theta, key, sigma, reference_samples,
                  num_steps) -> Reference:
    if isinstance(reference, Reference):
        ref = reference
    elif isinstance(reference, str):
        if sigma is None:
            sigma = float(getattr(estimator, "sigma", 0.0) or 0.0)
        ref = reference_gradient(system, theta, key, method=reference, sigma=sigma,
                                 num_samples=reference_samples, num_steps=num_steps)
    else:
        ref = Reference(grad=reference)
    if not tree_shapes_match(ref.grad, theta):
        raise ValueError(
            "the reference gradient's structure or shapes differ from theta's: "
            f"{jax.tree_util.tree_map(jnp.shape, ref.grad)} vs "
            f"{jax.tree_util.tree_map(jnp.shape, theta)}"
        )
    return ref


def chi2_z(chi2_dof: float, num_components: int, num_replicates: int) -> float:
    """Standardise mean_i z_i^2 over D components for an unbiased estimator.

    With se_i estimated from R replicates, each z_i is Student-t with nu = R - 1 degrees of
    freedom: E[z^2] = nu / (nu - 2), Var[z^2] = 2 nu^2 (nu - 1) / ((nu - 2)^2 (nu - 4)). Treating
    the components as independent (approximate: they are correlated in general), the result
    (mean z^2 - E) / sqrt(Var / D) is about N(0, 1) when there is no bias; a few units and more
    mean a bias. Needs R >= 6; returns nan otherwise.
    """
    nu = num_replicates - 1
    if nu <= 4:
        return math.nan
    mean = nu / (nu - 2)
    var = 2 * nu**2 * (nu - 1) / ((nu - 2) ** 2 * (nu - 4))
    return (chi2_dof - mean) / math.sqrt(var / num_components)


def summarize(estimates: np.ndarray, reference: Reference, *, inner_steps: np.ndarray,
              name: str, truncation_length=None, num_particles=None, sigma=None,
              windows: int = 1) -> Diagnosis:
    """The :class:`Diagnosis` of replicate estimates [R, D] against a reference."""
    G = np.asarray(estimates, np.float64)
    R = G.shape[0]
    if R < 2:
        raise ValueError(f"need at least 2 replicates for standard errors; got {R}")
    ref, ref_se = reference.flat()
    ref_norm2 = float(ref @ ref)
    if not ref_norm2 > 0:
        raise ValueError("the reference gradient is zero: the normalised variance is undefined")
    var = G.var(0, ddof=1)
    bias = G.mean(0) - ref
    se = np.sqrt(var / R + ref_se**2)
    bias_norm = float(np.linalg.norm(bias))
    floor = float(np.sqrt(np.sum(se**2)))
    norm_se = float(np.sqrt(np.sum(bias**2 * se**2)) / bias_norm) if bias_norm > 0 else floor
    # A bias with no noise at all (an exact estimator against an exact reference) is
    # infinitely significant; no bias and no noise is z = 0.
    z = np.where(se > 0, np.abs(bias) / np.where(se > 0, se, 1.0),
                 np.where(bias != 0, np.inf, 0.0))
    d = np.sum((G - ref) ** 2, axis=1) / ref_norm2
    return Diagnosis(
        estimator=name,
        truncation_length=truncation_length,
        num_particles=num_particles,
        sigma=sigma,
        num_replicates=R,
        windows=windows,
        inner_steps=float(np.mean(inner_steps)),
        bias_norm=bias_norm,
        bias_norm_se=norm_se,
        bias_noise_floor=floor,
        relative_bias=bias_norm / math.sqrt(ref_norm2),
        bias_z_max=float(z.max()),
        bias_chi2_dof=float(np.mean(z**2)),
        bias_chi2_z=chi2_z(float(np.mean(z**2)), G.shape[1], R),
        num_components=int(G.shape[1]),
        normalized_variance=float(d.mean()),
        normalized_variance_se=float(d.std(ddof=1) / math.sqrt(R)),
        normalized_spread=float(var.sum() / ref_norm2),
        reference_norm=math.sqrt(ref_norm2),
        reference_noise=float(np.sum(ref_se**2) / ref_norm2),
        reference_method=reference.method,
        bias=bias,
        bias_se=se,
    )


def diagnose(
    estimator: Any,
    theta: PyTree,
    key: jax.Array,
    *,
    reference: str | Reference | PyTree = "autodiff",
    num_replicates: int = 100,
    windows: int = 1,
    sigma: float | None = None,
    reference_samples: int = 256,
    num_steps: int | None = None,
    name: str | None = None,
    batch_size: int | None = None,
    vmap: bool = True,
) -> Diagnosis:
    """Bias and normalised variance of ``estimator``'s estimates at ``theta``.

    Args:
      estimator: any pes estimator (``init(key, theta)``, ``estimate(state, theta, key)``
        returning info.inner_steps) with a ``system`` attribute.
      theta: the point, a pytree of float arrays.
      key: PRNG key; split into the reference's key and the replicates' keys.
      reference: 'autodiff' | 'es' (computed by :func:`reference_gradient` at the estimator's
        sigma, or ``sigma``), a :class:`Reference` (reuse one across estimators), or an
        explicit theta-shaped pytree (taken as exact).
      num_replicates: R independent estimates (each from a fresh ``init``).
      windows: consecutive estimates averaged into one replicate estimate; with a non-staggered
        estimator and K * windows = T this is a full-episode estimate made of T/K windows.
      sigma: smoothing scale of a computed reference; default the estimator's (0 if none).
      reference_samples: antithetic pairs of a computed reference.
      num_steps: episode length of a computed reference (required for horizon None).
      name: label in the result; default the estimator's class name.
      batch_size: replicates per vmapped call (default all).
      vmap: False runs replicates one by one (for an estimator that cannot be vmapped).
    """
    system = estimator.system
    theta = check_theta(theta)
    k_ref, k_rep = jax.random.split(key)
    ref = _as_reference(reference, estimator, system, theta, k_ref, sigma, reference_samples,
                        num_steps)
    estimates, costs = replicate_estimates(estimator, theta, k_rep, num_replicates,
                                           windows=windows, batch_size=batch_size, vmap=vmap)
    est_sigma = getattr(estimator, "sigma", None)
    return summarize(
        estimates, ref, inner_steps=costs,
        name=name or type(estimator).__name__,
        truncation_length=getattr(estimator, "truncation_length", None),
        num_particles=getattr(estimator, "num_particles", None),
        sigma=None if est_sigma is None else float(est_sigma),
        windows=windows,
    )
