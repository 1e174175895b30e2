"""TBPTT(k1, k2): truncated backprop whose K = k1 window losses are differentiated through the
last k2 = backprop_depth steps of history (replayed from a per-particle buffer)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from systems import (
    LinearQuadratic,
    check_unbiased,
    exact_gradient,
    flat,
    replicate_estimates,
    theta_dict,
)
from typer.testing import CliRunner

import pes
from pes.cli import app
from pes.tasks import InfluenceBalancing


def windows(est, theta, n, seed=0):
    """[(grad, state, info)] of n consecutive estimates at a fixed theta."""
    state = est.init(jax.random.PRNGKey(seed), theta)
    out = []
    for i in range(n):
        g, state, info = est.estimate(state, theta, jax.random.PRNGKey(1000 + i))
        out.append((g, state, info))
    return out


def test_depth_equal_to_k_is_plain_tbptt_exactly():
    system = LinearQuadratic(horizon=5)
    theta = theta_dict()
    plain = windows(pes.TBPTT(system, num_particles=3, truncation_length=2), theta, 4)
    same = windows(pes.TBPTT(system, num_particles=3, truncation_length=2, backprop_depth=2),
                   theta, 4)
    for (g0, s0, i0), (g1, s1, i1) in zip(plain, same, strict=True):
        np.testing.assert_array_equal(flat(g0), flat(g1))
        np.testing.assert_array_equal(np.asarray(s0.inner), np.asarray(s1.inner))
        np.testing.assert_array_equal(np.asarray(i0.loss), np.asarray(i1.loss))


def test_deeper_history_replays_the_same_trajectory():
    # Stochastic steps, staggered particles and resets (T = 5, K = 2, depth 7): the replay
    # must use the keys the steps were first taken with, so states, step indices and losses
    # match plain TBPTT's.
    system = LinearQuadratic(horizon=5)
    theta = theta_dict()
    kw = dict(num_particles=4, truncation_length=2)
    plain = windows(pes.TBPTT(system, **kw), theta, 7)
    deep = windows(pes.TBPTT(system, backprop_depth=7, **kw), theta, 7)
    for (_, s0, i0), (_, s1, i1) in zip(plain, deep, strict=True):
        np.testing.assert_allclose(np.asarray(s1.inner), np.asarray(s0.inner), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(s1.t), np.asarray(s0.t))
        np.testing.assert_allclose(float(i1.loss), float(i0.loss), rtol=1e-5)
        assert int(i1.inner_steps) == int(i0.inner_steps)


@pytest.mark.parametrize("depth", [1, 10, 100])
def test_influence_balancing_gradient_is_truncated_sensitivity(depth):
    # k1 = 1: the window's loss 0.5 (s[0] - 1)^2 on the new state, differentiated through the
    # last min(depth, steps so far) steps, is (s[0] - 1) * S_min(depth, n) (float64 S).
    task = InfluenceBalancing()
    theta = jnp.asarray(0.5, jnp.float32)
    est = pes.TBPTT(task, num_particles=1, truncation_length=1, backprop_depth=depth)
    for n, (g, state, _) in enumerate(windows(est, theta, 130), start=1):
        s0 = float(state.inner[0, 0, 0])
        want = (s0 - 1.0) * task.truncated_sensitivity(min(depth, n))
        assert float(g) == pytest.approx(want, rel=1e-4, abs=1e-4), (n, float(g), want)


class Geometric:
    """s' = a s + theta, loss s', s_0 = 0, horizon 3: after j + 1 steps of an episode
    ds/dtheta = 1 + a + ... + a^j, and a reset starts again from a theta-free 0."""

    horizon = 3
    a = 0.5

    def init(self, key):
        return jnp.zeros(())

    def step(self, s, theta, t, key):
        s = self.a * s + theta
        return s, s


def sens(steps):
    """sum_{i < steps} a^i: the gradient of a loss that sees `steps` steps of history."""
    return sum(Geometric.a**i for i in range(steps))


@pytest.mark.parametrize("depth, expected", [
    # Windows of K = 2 over episodes of 3 steps (t = 0 1 | 2 0' | 1' 2' | ...); each window's
    # gradient is the mean over its two losses of sens(history seen by that loss).
    (2, [(sens(1) + sens(2)) / 2, (sens(1) + sens(1)) / 2, (sens(1) + sens(2)) / 2]),
    (3, [(sens(1) + sens(2)) / 2, (sens(2) + sens(1)) / 2, (sens(2) + sens(3)) / 2]),
    (5, [(sens(1) + sens(2)) / 2, (sens(3) + sens(1)) / 2, (sens(2) + sens(3)) / 2]),
    (50, [(sens(1) + sens(2)) / 2, (sens(3) + sens(1)) / 2, (sens(2) + sens(3)) / 2]),
])
def test_reset_inside_the_buffer_cuts_the_history(depth, expected):
    est = pes.TBPTT(Geometric(), num_particles=1, truncation_length=2, backprop_depth=depth,
                    stagger=False)
    got = [float(g) for g, _, _ in windows(est, jnp.asarray(0.7), 9)]
    np.testing.assert_allclose(got, expected * 3, rtol=1e-6)


def test_stagger_fills_the_buffer_from_the_burn_in():
    # K = 1, depth 3 >= T: a particle burned in to episode step t0 sees all t0 + 1 steps.
    est = pes.TBPTT(Geometric(), num_particles=16, truncation_length=1, backprop_depth=3)
    theta = jnp.asarray(0.7)
    state = est.init(jax.random.PRNGKey(3), theta)
    t0 = np.asarray(state.t)
    assert len(set(t0.tolist())) == 3
    g, _, _ = est.estimate(state, theta, jax.random.PRNGKey(4))
    assert float(g) == pytest.approx(np.mean([sens(t + 1) for t in t0]), rel=1e-6)


R = 200


@pytest.mark.parametrize("K, depth", [(1, 5), (3, 7)])
def test_depth_covering_the_episode_is_unbiased(K, depth):
    # Staggered particles and depth >= T + K - 1: every loss is differentiated through its
    # whole episode, so the mean estimate is the exact gradient of the mean per-step loss.
    system = LinearQuadratic(horizon=5)
    theta = theta_dict()
    est = pes.TBPTT(system, num_particles=4, truncation_length=K, backprop_depth=depth)
    check_unbiased(replicate_estimates(est, theta, R, windows=1), exact_gradient(system, theta))


def test_bad_depth_is_refused():
    system = LinearQuadratic(horizon=5)
    with pytest.raises(ValueError, match="backprop_depth=1 must be >= truncation_length=2"):
        pes.TBPTT(system, truncation_length=2, backprop_depth=1)
    with pytest.raises(TypeError, match="backprop_depth"):
        pes.TBPTT(system, truncation_length=2, backprop_depth=2.5)


RUNNER = CliRunner()


def test_cli_backprop_depth(tmp_path):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["run", "influence-balancing", "--estimator", "tbptt",
                                 "--backprop-depth", "10", "--num-steps", "20", "--out",
                                 str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["backprop_depth"] == 10 and config["truncation_length"] == 1
    for args, message in [
        (["--estimator", "pes", "--backprop-depth", "3"], "pes takes no backprop_depth"),
        (["--estimator", "tbptt", "-K", "10", "--backprop-depth", "3"],
         "backprop_depth=3 is shorter than truncation_length=10"),
        (["--estimator", "tbptt", "--backprop-depth", "0"], "backprop_depth=0 must be"),
    ]:
        result = RUNNER.invoke(app, ["run", "influence-balancing", *args, "--out",
                                     str(tmp_path / "bad"), "--no-progress"])
        assert result.exit_code == 2, result.output
        assert message in result.output
