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


# ------------------------------------------------------------------ steps_per_call (chunks)


def assert_trees_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def assert_histories_close(h1, h2):
    """Same steps, inner steps, drops and evaluated steps; losses and evaluations equal up to
    float rounding (the chunk's single program may fuse a multiply and an add differently)."""
    assert len(h1) == len(h2)
    for a, b in zip(h1, h2, strict=True):
        assert (a.step, a.inner_steps, a.nonfinite) == (b.step, b.inner_steps, b.nonfinite)
        assert (a.meta_objective is None) == (b.meta_objective is None)
    for name in ("loss", "meta_objective"):
        np.testing.assert_allclose(h1.column(name), h2.column(name), rtol=1e-5)


def test_steps_per_call_runs_the_same_steps_and_reports_each():
    system = LinearQuadratic(horizon=5)
    est = pes.PES(system, num_particles=8, sigma=0.1, truncation_length=2)
    key = jax.random.PRNGKey(3)
    runs = {}
    for m in (1, 3):
        seen, states = [], []
        result = pes.train(est, theta_dict(), optax.adam(0.05), num_steps=11, key=key,
                           eval_every=4, steps_per_call=m,
                           callback=lambda r, th, seen=seen: seen.append((r, th)),
                           on_state=states.append)
        runs[m] = result, seen, states
    (theta1, h1), seen1, states1 = runs[1]
    (theta3, h3), seen3, states3 = runs[3]
    assert_histories_close(h1, h3)
    assert [r.step for r in h3.evaluated()] == [0, 4, 8, 11]
    assert_trees_close(theta1, theta3)
    # The callback sees every step (the step-0 evaluation too) with that step's theta; states
    # come at chunk ends, which fall on evaluation steps and at num_steps.
    assert [r for r, _ in seen3] == list(h3)
    for (_, a), (_, b) in zip(seen1, seen3, strict=True):
        assert_trees_close(a, b)
    assert [s.step for s in states1] == list(range(1, 12))
    assert [s.step for s in states3] == [3, 4, 7, 8, 11]
    # A chunk-end state resumes into the same run.
    middle = states3[2]
    assert middle.inner_steps == h3[7].inner_steps
    theta_r, rest = pes.train(est, theta_dict(), optax.adam(0.05), num_steps=11, key=key,
                              eval_every=4, resume=middle)
    assert_histories_close(rest, pes.History(h1[8:]))
    assert_trees_close(theta_r, theta1)


def test_steps_per_call_raises_at_the_bad_step_without_applying_it():
    est = pes.PES(SqrtLoss(), num_particles=4, sigma=0.01, truncation_length=2)
    errors, goods = [], []
    for m in (1, 8):
        good = []
        with pytest.raises(pes.NonFiniteGradientError) as info:
            pes.train(est, jnp.array(0.2), optax.sgd(0.05), num_steps=100,
                      key=jax.random.PRNGKey(0), steps_per_call=m,
                      callback=lambda r, th, good=good: good.append((r.step, th)))
        errors.append(info.value)
        goods.append(good)
    plain, chunked = errors
    assert chunked.step % 8 != 1  # the bad step is inside a chunk, after good steps of it
    assert (chunked.step, chunked.particle, chunked.inner_step) == (
        plain.step, plain.particle, plain.inner_step)
    assert f"outer step {chunked.step}: particle {chunked.particle} at inner step " \
           f"{chunked.inner_step}" in str(chunked)
    assert [s for s, _ in goods[1]] == list(range(1, chunked.step))
    assert chunked.state.step == chunked.step - 1
    np.testing.assert_allclose(float(chunked.theta), float(plain.theta), rtol=1e-6)
    np.testing.assert_allclose(float(chunked.state.theta), float(goods[1][-1][1]), rtol=0)
    assert np.isfinite(float(chunked.theta))


def test_steps_per_call_drop_policy_and_early_stop_at_the_chunk_end():
    est = pes.PES(ShiftedSqrt(), num_particles=20, sigma=0.1, truncation_length=2)
    kwargs = dict(num_steps=7, key=jax.random.PRNGKey(0), nonfinite="drop")
    _, plain = pes.train(est, jnp.array(0.0), optax.sgd(0.0), **kwargs)
    seen = []
    _, chunked = pes.train(est, jnp.array(0.0), optax.sgd(0.0), steps_per_call=3,
                           callback=lambda r, th: seen.append(r.step) or r.step == 4, **kwargs)
    assert chunked.column("nonfinite").sum() > 0
    # The callback asked to stop after step 4; its chunk (steps 4-6) still ends.
    assert seen == [1, 2, 3, 4, 5, 6]
    assert_histories_close(chunked, pes.History(plain[:6]))
    with pytest.raises(ValueError, match="steps_per_call=0"):
        pes.train(est, jnp.array(0.0), optax.sgd(0.0), steps_per_call=0, **kwargs)
