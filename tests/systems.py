"""Systems with known gradients for the estimator tests."""

import jax
import jax.numpy as jnp
import numpy as np

import pes

# Eigenvalues 0.95 and 0.9: a perturbation of theta keeps acting for tens of steps.
A_LONG = jnp.array([[0.95, 0.1], [0.0, 0.9]])
TARGET = jnp.array([1.0, -2.0])
S0 = jnp.array([0.5, 1.0])


def theta_dict():
    """theta as a dict of leaves of different shapes: (), (3,), (2, 2)."""
    return {
        "b": jnp.array(0.3),
        "w": jnp.array([0.1, -0.2, 0.4]),
        "m": jnp.array([[0.2, -0.1], [0.05, 0.3]]),
    }


class LinearQuadratic:
    """s' = A s + b u + W w + m v + noise;  l = 0.5 |s' - target|^2 + 0.1 |w|^2.

    Linear dynamics and a quadratic loss: the Gaussian-smoothed gradient equals the exact one,
    and additive noise (init and step) does not change the gradient of the expected loss.
    """

    def __init__(self, horizon=5, noise=0.1, A=A_LONG):
        self.horizon = horizon
        self.noise = noise
        self.A = A

    def init(self, key):
        return S0 + self.noise * jax.random.normal(key, (2,))

    def step(self, s, theta, t, key):
        u = jnp.array([1.0, 0.5])
        W = jnp.array([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3]])
        v = jnp.array([1.0, -1.0])
        s = (self.A @ s + theta["b"] * u + W @ theta["w"] + theta["m"] @ v
             + self.noise * jax.random.normal(key, (2,)))
        loss = 0.5 * jnp.sum((s - TARGET) ** 2) + 0.1 * jnp.sum(theta["w"] ** 2)
        return s, loss


def exact_gradient(system, theta, num_steps=None):
    """jax.grad of the mean per-step loss of one noise-free episode (the exact gradient of the
    expected mean per-step loss for LinearQuadratic)."""
    clean = LinearQuadratic(system.horizon, noise=0.0, A=system.A)
    num_steps = num_steps or system.horizon
    f = lambda th: pes.unroll(clean, th, jax.random.PRNGKey(0), num_steps)[1].mean()
    return jax.grad(f)(theta)


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def replicate_estimates(estimator, theta, num_replicates, windows, seed=0):
    """[R, D] array: each row the mean of `windows` consecutive estimates after a fresh init."""
    rows = []
    for r in range(num_replicates):
        key = jax.random.PRNGKey(seed * 100_003 + r)
        k_init, k_run = jax.random.split(key)
        state = estimator.init(k_init, theta)
        total = 0.0
        for w in range(windows):
            g, state, _ = estimator.estimate(state, theta, jax.random.fold_in(k_run, w))
            total = total + flat(g)
        rows.append(total / windows)
    return np.stack(rows)


def z_scores(rows, exact):
    """Per-component (mean - exact) / standard error of the mean."""
    mean = rows.mean(0)
    se = rows.std(0, ddof=1) / np.sqrt(rows.shape[0])
    return (mean - flat(exact)) / se


UNBIASED_Z = 4.5
BIASED_Z = 6.0


def check_unbiased(rows, exact, shift=0.1):
    """Every component within 4.5 standard errors of exact, and an error of ``shift`` (10%)
    would be seen."""
    z = z_scores(rows, exact)
    assert np.abs(z).max() < UNBIASED_Z, f"estimates are biased: z = {np.round(z, 2)}"
    shifted = jax.tree_util.tree_map(lambda g: (1 + shift) * g, exact)
    assert np.abs(z_scores(rows, shifted)).max() > BIASED_Z


def check_biased(rows, exact):
    z = z_scores(rows, exact)
    assert np.abs(z).max() > BIASED_Z, f"a biased estimator passed: z = {np.round(z, 2)}"
