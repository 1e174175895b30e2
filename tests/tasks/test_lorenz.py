"""Lorenz: System contract, zero loss at the true parameters, evaluation metrics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pes.system import check_step_output, check_system, evaluate, unroll
from pes.tasks import Lorenz, LorenzState

KEY = jax.random.PRNGKey(0)
TASK = Lorenz()
START = TASK.defaults().initial_theta()


def test_system_contract():
    assert check_system(TASK) == 2000
    assert START.shape == (2,) and START.dtype == jnp.float32
    check_step_output(TASK, START, KEY)
    s0 = TASK.init(KEY)
    assert isinstance(s0, LorenzState)
    assert s0.p.shape == (3,) and s0.target.shape == (3,)
    np.testing.assert_allclose(s0.p, [1.2, 1.3, 1.6])
    s1, loss = jax.jit(TASK.step)(s0, START, jnp.int32(0), KEY)
    assert isinstance(s1, LorenzState) and s1.p.shape == (3,)
    assert loss.shape == () and loss.dtype == jnp.float32


def test_euler_step():
    a, r, b, dt = 7.0, 20.0, 8.0 / 3.0, 0.005
    x, y, z = 1.2, 1.3, 1.6
    s1, _ = TASK.step(TASK.init(KEY), jnp.log(jnp.array([a, r])), jnp.int32(0), KEY)
    expected = [x + dt * a * (y - x), y + dt * (x * (r - z) - y), z + dt * (x * y - b * z)]
    np.testing.assert_allclose(s1.p, expected, rtol=1e-5)


def test_zero_loss_at_true_theta():
    _, losses = jax.jit(lambda th: unroll(TASK, th, KEY, TASK.horizon))(TASK.true_theta())
    assert losses.shape == (2000,)
    assert float(jnp.max(losses)) == 0.0


def test_positive_loss_at_start():
    out = jax.jit(TASK.evaluate)(START, KEY)
    # Measured: mean per-step loss 353.6; a = e^3.116 = 22.56, r = e^3.7 = 40.45.
    assert 300.0 < float(out["meta_loss"]) < 400.0
    np.testing.assert_allclose(out["rel_error_a"], np.exp(3.116) / 10 - 1, rtol=1e-5)
    np.testing.assert_allclose(out["rel_error_r"], np.exp(3.7) / 28 - 1, rtol=1e-5)
    np.testing.assert_allclose(evaluate(TASK, START, KEY), out["meta_loss"], rtol=1e-5)
    truth = TASK.evaluate(TASK.true_theta(), KEY)
    assert float(truth["meta_loss"]) == 0.0 and float(truth["rel_error"]) < 1e-6


def test_init_noise_is_shared_by_both_trajectories():
    noisy = Lorenz(init_sigma=1.0)
    s_a, s_b = noisy.init(jax.random.PRNGKey(1)), noisy.init(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(s_a.p, s_a.target)
    assert not np.allclose(s_a.p, s_b.p)


def test_defaults():
    d = TASK.defaults()
    assert d.theta0 == (3.116, 3.7)
    assert d.estimator_settings("pes") == {
        "num_particles": 400,
        "sigma": 0.04,
        "truncation_length": 100,
    }
    assert d.optimizer_for("nres").learning_rate == 1e-5
    assert d.optimizer_for("tes").learning_rate == 3e-4
    assert d.num_steps_for("pes") == 10000 and d.num_steps_for("nres") == 5000
    json.dumps(d.to_dict())
    assert hash(TASK) == hash(Lorenz())
    with pytest.raises(ValueError, match="unknown estimator"):
        type(d)(theta0=0.0, num_steps=1, optimizer=d.optimizer, estimators={"pes2": {}})


def test_pes_learning_rate_follows_the_follow_up_schedule():
    import optax

    from pes.tasks import OptimizerSpec

    spec = TASK.defaults().optimizer_for("pes")
    assert spec == OptimizerSpec("sgd", 1e-5, schedule=((1000, 0.1),))
    assert spec.learning_rate_at(999) == 1e-5
    np.testing.assert_allclose(spec.learning_rate_at(1000), 1e-6)
    assert TASK.defaults().optimizer_for("nres").schedule == ()
    assert TASK.defaults().to_dict()["optimizer_overrides"]["pes"]["schedule"] == [[1000, 0.1]]
    sched = optax.piecewise_constant_schedule(spec.learning_rate, spec.boundaries_and_scales())
    for step in (0, 999, 1000, 5000):
        np.testing.assert_allclose(float(sched(step)), spec.learning_rate_at(step), rtol=1e-6)
    hash(spec)


def test_optimizer_schedule_is_checked_and_backward_compatible():
    from pes.tasks import OptimizerSpec

    plain = OptimizerSpec("sgd", 1e-4)
    assert plain.schedule == () and "schedule" not in plain.to_dict()
    assert plain.learning_rate_at(10**6) == 1e-4
    listed = OptimizerSpec("adam", 1e-2, schedule=[[2500, 0.1], (4000, 0.1)])
    assert listed.schedule == ((2500, 0.1), (4000, 0.1))
    np.testing.assert_allclose(listed.learning_rate_at(4000), 1e-4)
    for bad in ([(0, 0.1)], [(10, 0.0)], [(10, 0.1), (10, 0.1)], [(10,)], [(1.5, 0.1)], 3):
        with pytest.raises(ValueError, match="schedule"):
            OptimizerSpec("sgd", 1e-4, schedule=bad)


def test_landscape_minimum_is_the_truth_with_a_sloppy_valley():
    """The raw meta-objective on a grid around the truth (what the docstring reports)."""
    meta = jax.jit(jax.vmap(lambda th: TASK.evaluate(th, KEY)["meta_loss"]))
    truth = np.asarray(TASK.true_theta())
    da, dr = np.meshgrid(np.arange(-4, 7) * 0.025, np.arange(-5, 4) * 0.02, indexing="ij")
    grid = np.stack([da.ravel(), dr.ravel()], 1)
    losses = np.asarray(meta(jnp.asarray(truth + grid, jnp.float32)))
    # (vmapped, exp may round differently from the target's path: ~1e-5 instead of 0)
    assert np.argmin(losses) == np.flatnonzero((grid == 0).all(1))[0] and losses.min() < 1e-3
    # Along the valley toward larger a and smaller r the loss stays small; across it, it is not.
    valley, across = [(0.035, -0.007), (0.068, -0.021)], [(0.0, 0.01), (0.0, -0.01)]
    low, high = (np.asarray(meta(jnp.asarray(truth + np.array(p), jnp.float32)))
                 for p in (valley, across))
    assert low.max() < 4.0 and high.min() > 20.0
