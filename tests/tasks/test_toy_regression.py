"""ToyRegression: System contract, the paper's meta-objective values and the surface."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pes.system import check_step_output, check_system, evaluate
from pes.tasks import ToyRegression, inner_loss

KEY = jax.random.PRNGKey(0)
TASK = ToyRegression()
START = jnp.array([-4.0, -4.0])


def test_system_contract():
    assert check_system(TASK) == 100
    theta = TASK.defaults().initial_theta()
    assert theta.shape == (2,) and theta.dtype == jnp.float32
    check_step_output(TASK, theta, KEY)
    x0 = TASK.init(KEY)
    assert x0.shape == (2,) and x0.dtype == jnp.float32
    x1, loss = jax.jit(TASK.step)(x0, theta, jnp.int32(0), KEY)
    assert x1.shape == (2,) and x1.dtype == jnp.float32
    assert loss.shape == () and loss.dtype == jnp.float32


def test_step_is_sgd_with_loss_after_update():
    theta = jnp.array([np.log(0.3), np.log(0.1)], jnp.float32)
    x = jnp.array([0.5, 2.0])
    t = jnp.int32(25)
    lr = 0.3 * 0.75 + 0.1 * 0.25
    expected = x - lr * jax.grad(inner_loss)(x)
    x1, loss = TASK.step(x, theta, t, KEY)
    np.testing.assert_allclose(x1, expected, rtol=1e-6)
    np.testing.assert_allclose(loss, inner_loss(expected), rtol=1e-6)
    np.testing.assert_allclose(TASK.learning_rate(theta, jnp.int32(0)), 0.3, rtol=1e-6)
    np.testing.assert_allclose(TASK.learning_rate(theta, jnp.int32(100)), 0.1, rtol=1e-6)


def test_meta_objective_at_start_matches_paper():
    # Paper: ~2488. Measured: 2487.77 (float32).
    value = TASK.meta_objective(START)
    np.testing.assert_allclose(value, 2487.77, atol=0.5)
    out = jax.jit(TASK.evaluate)(START, KEY)
    np.testing.assert_allclose(out["meta_objective"], value, rtol=1e-6)
    np.testing.assert_allclose(100 * out["meta_loss"], value, rtol=1e-5)
    np.testing.assert_allclose(100 * evaluate(TASK, START, KEY), value, rtol=1e-5)


def test_good_region_on_coarse_grid():
    # Paper: ~553-570 around theta0 ~ 2.75. Measured best on this grid: 558.4 at (2.8, -3.0).
    surf = TASK.surface(jnp.linspace(2.0, 3.5, 16), jnp.linspace(-5.0, 5.0, 21))
    assert surf.shape == (16, 21)
    assert 540.0 <= float(surf.min()) <= 600.0


def test_surface_finite_everywhere_and_consistent():
    grid = jnp.linspace(-5.0, 5.0, 51)
    surf = TASK.surface(grid, grid)
    assert surf.shape == (51, 51)
    assert bool(jnp.all(jnp.isfinite(surf)))  # measured range 560.5 to 7671.1
    # Where the inner run is not chaotic (both learning rates <= 1) the batched surface equals
    # the one-theta meta-objective; in the chaotic region float32 rounding differs between the
    # two programs and chaos amplifies it (up to 12% apart), so only finiteness is checked there.
    for i, j in [(0, 0), (10, 20), (24, 3), (5, 24)]:
        np.testing.assert_allclose(
            surf[i, j], TASK.meta_objective(jnp.stack([grid[i], grid[j]])), rtol=1e-5
        )


def test_defaults():
    d = TASK.defaults()
    assert d.theta0 == (-4.0, -4.0)
    assert (d.optimizer.name, d.optimizer.learning_rate, d.optimizer.b1) == ("adam", 1e-2, 0.99)
    assert d.estimator_settings("pes") == {
        "num_particles": 100,
        "sigma": 0.3,
        "truncation_length": 10,
    }
    assert d.estimator_settings("tes")["sigma"] == 1.0
    assert "truncation_length" not in d.estimator_settings("full-es")
    json.dumps(d.to_dict())
    with pytest.raises(ValueError, match="name"):
        type(d.optimizer)("rmsprop", 1e-3)
