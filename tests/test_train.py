"""The outer loop and evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from systems import LinearQuadratic, theta_dict

import pes


def test_pes_with_adam_reduces_the_meta_objective():
    system = LinearQuadratic(horizon=10)
    est = pes.PES(system, num_particles=32, sigma=0.05, truncation_length=3)
    theta, history = pes.train(est, theta_dict(), optax.adam(0.05), num_steps=60,
                               key=jax.random.PRNGKey(0), eval_every=20, eval_episodes=8)
    evals = history.evaluated()
    assert [r.step for r in evals] == [0, 20, 40, 60]
    assert evals[-1].meta_objective < 0.5 * evals[0].meta_objective
    assert len(history) == 61
    inner = history.column("inner_steps")[1:]
    assert np.all(np.diff(inner) == 32 * 3)  # burn-in is counted in the first step only
    assert inner[0] > 32 * 3
    assert jax.tree_util.tree_structure(theta) == jax.tree_util.tree_structure(theta_dict())


def test_train_is_deterministic_and_callback_can_stop():
    system = LinearQuadratic(horizon=5)
    seen = []

    def stop_at_4(record, theta):
        seen.append(record.step)
        return record.step == 4

    runs = []
    for _ in range(2):
        est = pes.NRES(system, num_particles=8, sigma=0.1, truncation_length=2)
        runs.append(pes.train(est, theta_dict(), optax.sgd(0.01), num_steps=10,
                              key=jax.random.PRNGKey(7), callback=stop_at_4))
    assert seen == [1, 2, 3, 4] * 2
    (th1, h1), (th2, h2) = runs
    assert len(h1) == 4 and h1 == h2
    for a, b in zip(jax.tree_util.tree_leaves(th1), jax.tree_util.tree_leaves(th2), strict=True):
        np.testing.assert_array_equal(a, b)


class SqrtLoss:
    """loss = sqrt(theta): NaN once SGD pushes theta (or a perturbation of it) below zero."""

    horizon = 4

    def init(self, key):
        return jnp.zeros(())

    def step(self, s, theta, t, key):
        return s, jnp.sqrt(theta)


def test_non_finite_gradient_stops_with_the_outer_step():
    est = pes.PES(SqrtLoss(), num_particles=4, sigma=0.01, truncation_length=2)
    good = []
    with pytest.raises(pes.NonFiniteGradientError, match=r"outer step \d+") as info:
        pes.train(est, jnp.array(0.2), optax.sgd(0.05), num_steps=100,
                  key=jax.random.PRNGKey(0), callback=lambda r, th: good.append((r.step, th)))
    assert info.value.step == good[-1][0] + 1 > 1
    assert f"outer step {info.value.step}:" in str(info.value)
    assert float(info.value.theta) == float(good[-1][1])  # the last good theta, finite
    assert info.value.particle is not None and 0 <= info.value.inner_step < 4
    assert f"particle {info.value.particle} at inner step {info.value.inner_step}" in str(
        info.value)
    assert info.value.state.step == info.value.step - 1


class ShiftedSqrt(SqrtLoss):
    def step(self, s, theta, t, key):
        return s, jnp.sqrt(theta + 0.05)


def test_drop_policy_leaves_out_nonfinite_particles():
    est = pes.PES(ShiftedSqrt(), num_particles=20, sigma=0.1, truncation_length=2)
    theta, history = pes.train(est, jnp.array(0.0), optax.sgd(0.0), num_steps=5,
                               key=jax.random.PRNGKey(0), nonfinite="drop")
    dropped = history.column("nonfinite")
    assert dropped.sum() > 0 and np.all(dropped < 10)
    assert np.all(np.isfinite(history.column("loss")))
    with pytest.raises(pes.NonFiniteGradientError, match="outer step 1: particle"):
        pes.train(est, jnp.array(0.0), optax.sgd(0.0), num_steps=5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        pes.train(est, jnp.array(0.0), optax.sgd(0.0), num_steps=5, key=jax.random.PRNGKey(0),
                  nonfinite="skip")


@pytest.mark.parametrize("make", [
    lambda s: pes.PES(s, num_particles=8, sigma=0.1, truncation_length=2),
    lambda s: pes.TBPTT(s, num_particles=2, truncation_length=3),
])
def test_resume_from_a_train_state_continues_exactly(make):
    system = LinearQuadratic(horizon=5)
    key = jax.random.PRNGKey(3)
    full_theta, full = pes.train(make(system), theta_dict(), optax.adam(0.01), num_steps=9,
                                 key=key, eval_every=3)
    states = []
    pes.train(make(system), theta_dict(), optax.adam(0.01), num_steps=4, key=key,
              eval_every=3, on_state=states.append)
    theta, rest = pes.train(make(system), theta_dict(), optax.adam(0.01), num_steps=9, key=key,
                            eval_every=3, resume=states[-1])
    assert [r.step for r in rest] == list(range(5, 10))
    assert list(rest) == [r for r in full if r.step >= 5]
    for a, b in zip(jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(full_theta),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_train_arguments():
    est = pes.PES(LinearQuadratic(5), num_particles=4, sigma=0.1, truncation_length=2)
    with pytest.raises(ValueError, match="num_steps=0"):
        pes.train(est, theta_dict(), optax.sgd(0.1), num_steps=0, key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        pes.train(est, theta_dict(), "adam", num_steps=1, key=jax.random.PRNGKey(0))
    with pytest.raises(KeyError, match="fields are"):
        pes.History().column("nope")


def test_evaluate_matches_an_unroll_and_averages_episodes():
    system = LinearQuadratic(horizon=5, noise=0.0)
    theta = theta_dict()
    value = pes.evaluate(system, theta, jax.random.PRNGKey(0), num_episodes=3)
    direct = pes.unroll(system, theta, jax.random.PRNGKey(1), 5)[1].mean()
    np.testing.assert_allclose(value, direct, rtol=1e-6)
    noisy = LinearQuadratic(horizon=5, noise=0.5)
    a = pes.evaluate(noisy, theta, jax.random.PRNGKey(0), num_episodes=1)
    b = pes.evaluate(noisy, theta, jax.random.PRNGKey(0), num_episodes=64)
    assert a != b and np.isfinite(float(b))
    longer = pes.evaluate(system, theta, jax.random.PRNGKey(0), eval_steps=10)
    np.testing.assert_allclose(longer, pes.unroll(system, theta, jax.random.PRNGKey(0), 10)[1]
                               .mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="num_episodes=0"):
        pes.evaluate(system, theta, jax.random.PRNGKey(0), num_episodes=0)


def test_system_protocol_is_runtime_checkable():
    assert isinstance(LinearQuadratic(5), pes.System)
    assert not isinstance(object(), pes.System)
