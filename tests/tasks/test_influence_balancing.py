"""InfluenceBalancing: System contract, the truncated sensitivities, theta* and evaluation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pes.system import check_step_output, check_system, evaluate, unroll
from pes.tasks import InfluenceBalancing

KEY = jax.random.PRNGKey(0)
TASK = InfluenceBalancing()
THETA_STAR = jnp.float32(-1.0 / 6.0)


def test_system_contract():
    assert check_system(TASK) is None
    theta = TASK.defaults().initial_theta()
    assert theta.shape == () and theta.dtype == jnp.float32
    check_step_output(TASK, theta, KEY)
    s0 = TASK.init(KEY)
    assert s0.shape == (23,) and s0.dtype == jnp.float32
    np.testing.assert_array_equal(s0, np.ones(23))
    s1, loss = jax.jit(TASK.step)(s0, theta, jnp.int32(0), KEY)
    assert s1.shape == s0.shape and s1.dtype == s0.dtype
    assert loss.shape == () and loss.dtype == jnp.float32


def test_step_matches_matrix_form():
    a = 0.5 * np.eye(23) + 0.5 * np.eye(23, k=1)
    c = np.array([1.0] * 10 + [-1.0] * 13)
    s = np.random.default_rng(0).normal(size=23).astype(np.float32)
    s1, loss = TASK.step(jnp.asarray(s), jnp.float32(0.3), jnp.int32(5), KEY)
    expected = a @ s + 0.3 * c
    np.testing.assert_allclose(s1, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * (expected[0] - 1.0) ** 2, rtol=1e-5)


@pytest.mark.parametrize("K, expected, tol", [(1, 1.0, 0), (10, 10.0, 0), (100, -6.0, 1e-7)])
def test_truncated_sensitivity(K, expected, tol):
    # Measured in float64: S_1 = 1, S_10 = 10 exactly, S_100 = -5.99999997829336.
    assert abs(TASK.truncated_sensitivity(K) - expected) <= tol
    # The same number by autodiff: ds_K[0]/dtheta for a K-step window from a fixed state.
    ds = jax.grad(lambda th: unroll(TASK, th, KEY, K)[0][0])(jnp.float32(0.5))
    np.testing.assert_allclose(ds, expected, atol=1e-4)


def test_sensitivity_limit_and_optimum():
    assert TASK.truncated_sensitivity(300) == pytest.approx(-6.0, abs=1e-12)
    assert TASK.optimal_theta() == pytest.approx(-1.0 / 6.0)


def test_theta_star_drives_long_run_loss_to_zero():
    out = jax.jit(TASK.evaluate)(THETA_STAR, KEY)
    # Observed 5.8e-13 in float32 (6e-31 in float64).
    assert out["meta_loss"] < 1e-10
    # The mean over the 500 steps keeps the transient from s0 = ones: 0.13097 at theta*.
    np.testing.assert_allclose(out["mean_loss"], 0.13097, rtol=1e-3)
    for other in (-0.2, -0.1, 0.0, 0.5):
        assert TASK.evaluate(jnp.float32(other), KEY)["meta_loss"] > 1e-3
    # At the starting theta 0.5, s[0] settles at 0.5 * -6 = -3: final loss 0.5 * 16 = 8.
    np.testing.assert_allclose(TASK.evaluate(jnp.float32(0.5), KEY)["meta_loss"], 8.0, rtol=1e-5)


def test_pes_evaluate_gives_the_mean_loss():
    got = evaluate(TASK, THETA_STAR, KEY, eval_steps=500)
    np.testing.assert_allclose(got, TASK.evaluate(THETA_STAR, KEY)["mean_loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="eval_steps"):
        evaluate(TASK, THETA_STAR, KEY)


def test_defaults():
    d = TASK.defaults()
    assert d.theta0 == 0.5 and d.num_steps == 3000
    assert (d.optimizer.name, d.optimizer.learning_rate) == ("sgd", 1e-4)
    assert d.estimator_settings("pes") == {
        "num_particles": 1000,
        "sigma": 0.1,
        "truncation_length": 1,
    }
    assert d.estimator_settings("tbptt") == {"truncation_length": 1}
    assert d.optimizer_for("uoro").learning_rate == 1e-5
    assert d.optimizer_for("pes") == d.optimizer
    with pytest.raises(KeyError, match="full-es"):
        d.estimator_settings("full-es")
    json.dumps(d.to_dict())
    assert hash(TASK) == hash(InfluenceBalancing()) and hash(d) == hash(TASK.defaults())
