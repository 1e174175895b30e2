"""pes.ODE: an ODE simulator (diffrax) as a System; the Lorenz task rebuilt on it."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes

diffrax = pytest.importorskip("diffrax")

from pes.tasks.lorenz import Lorenz, lorenz_ode  # noqa: E402


def test_lorenz_as_an_ode_has_the_hand_written_landscape():
    """Euler, the same dt: the meta-losses of both Systems agree on a grid of theta around
    the truth (0 at the truth, tens elsewhere). The chaotic system amplifies rounding, so the
    horizon is kept at 400 steps (t = 2) and the tolerance is float32's."""
    task = Lorenz(horizon=400)
    ode = lorenz_ode(task)
    assert ode.horizon == 400
    hand = jax.jit(lambda th: pes.unroll(task, th, jax.random.PRNGKey(0), 400)[1].mean())
    mine = jax.jit(lambda th: pes.unroll(ode, th, jax.random.PRNGKey(0), 400)[1].mean())
    offsets = np.linspace(-0.3, 0.3, 5, dtype=np.float32)
    a, b = [], []
    for da in offsets:
        for dr in offsets:
            theta = task.true_theta() + jnp.array([da, dr])
            a.append(float(hand(theta)))
            b.append(float(mine(theta)))
    a, b = np.array(a), np.array(b)
    assert a[12] == 0 and b[12] == 0  # the truth, in the grid's centre
    assert a.max() > 10  # a landscape, not a constant
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def decay_ode(**kw):
    """y' = -k y, y(0) = 2, k = exp(theta); observed at 20 times in [0, 2] for k = 1.5."""
    ts = np.linspace(0.0, 2.0, 21)
    obs = 2.0 * np.exp(-1.5 * ts[1:])
    return pes.ODE(lambda y, t, theta: -jnp.exp(theta[0]) * y, jnp.array([2.0]), ts, obs[:, None],
                   **kw)


@pytest.mark.slow
def test_adaptive_solver_is_accurate_and_pes_recovers_the_rate():
    ode = decay_ode(solver=diffrax.Tsit5(),
                    stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8))
    truth = jnp.array([math.log(1.5)])
    np.testing.assert_allclose(ode.trajectory(truth)[:, 0], 2.0 * np.exp(-1.5 * np.asarray(
        ode.ts[1:])), rtol=1e-4)
    assert float(pes.evaluate(ode, truth, jax.random.PRNGKey(0))) < 1e-8
    est = pes.PES(ode, num_particles=8, sigma=0.05, truncation_length=5)
    theta, _ = pes.train(est, jnp.array([0.0]), optax.adam(0.05), num_steps=60,
                         key=jax.random.PRNGKey(0))
    assert abs(float(jnp.exp(theta[0])) - 1.5) < 0.05, theta


def test_divergence_is_capped_and_errors_are_clear(monkeypatch):
    blowup = pes.ODE(lambda y, t, theta: jnp.exp(theta[0]) * y ** 2, jnp.array([1.0]),
                     np.linspace(0, 2, 11), np.zeros((10, 1)), loss_cap=100.0,
                     solver=diffrax.Tsit5(), max_steps=64,
                     stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5))
    _, losses = pes.unroll(blowup, jnp.array([1.0]), jax.random.PRNGKey(0), 10)
    assert np.all(np.isfinite(losses)) and float(losses[-1]) == 100.0
    with pytest.raises(ValueError, match="leading axis must be len\\(ts\\) - 1 = 20"):
        pes.ODE(lambda y, t, th: y, jnp.ones(1), np.linspace(0, 1, 21), np.zeros((21, 1)))
    with pytest.raises(ValueError, match="increasing"):
        pes.ODE(lambda y, t, th: y, jnp.ones(1), [0.0, 1.0, 0.5], np.zeros((2, 1)))
    monkeypatch.setitem(sys.modules, "diffrax", None)
    with pytest.raises(ImportError, match=r"pip install 'pes\[ode\]'"):
        decay_ode()
