"""Augmented random search's options: centred ranks, top-b pairs, survival-bonus shift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from systems import LinearQuadratic, exact_gradient, flat, theta_dict
from typer.testing import CliRunner

import pes
from pes.cli import app
from pes.estimators import _ars
from pes.runs import ConfigError, RunConfig

# Unstaggered (an init without a burn-in window compiles in half the time); K = 4,
# so the second window holds an episode's end (T = 6).
ES = {
    "pes": lambda s, **kw: pes.PES(s, truncation_length=4, stagger=False, **kw),
    "full-es": lambda s, **kw: pes.FullES(s, **kw),
    "nres": lambda s, **kw: pes.NRES(s, truncation_length=4, stagger=False, **kw),
    "tes": lambda s, **kw: pes.TruncatedES(s, truncation_length=4, stagger=False, **kw),
}


class Transformed:
    """LinearQuadratic with every per-step loss mapped through f (strictly increasing)."""

    def __init__(self, base, f):
        self.base, self.f, self.horizon = base, f, base.horizon

    def init(self, key):
        return self.base.init(key)

    def step(self, s, theta, t, key):
        s, loss = self.base.step(s, theta, t, key)
        return s, self.f(loss)


def estimate(est, theta=None, steps=2, seed=0):
    """The estimate of the ``steps``-th window from init(PRNGKey(seed))."""
    theta = theta_dict() if theta is None else theta
    state = est.init(jax.random.PRNGKey(seed), theta)
    for i in range(steps):
        grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(100 + i))
    return flat(grad)


# ------------------------------------------------------------------------- centred ranks


def test_centred_ranks_of_a_known_vector():
    losses = jnp.array([[3.0, 1.0], [2.0, 2.0], [9.0, np.nan]])
    ok = jnp.array([True, True, False])
    r = np.asarray(_ars.centred_ranks(losses, ok))
    # ranks among {3, 1, 2, 2}: 1 -> 0, the two 2s share 1.5, 3 -> 3; over n - 1 = 3.
    np.testing.assert_allclose(r[:2], [[0.5, -0.5], [0.0, 0.0]], atol=1e-7)
    assert np.all(r[2] == 0)


# Each estimator compiles three estimates (~5 s each on a quiet machine): only PES runs in
# `make test`, the others with the slow tests.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["pes", pytest.param("nres", marks=SLOW),
                                  pytest.param("tes", marks=SLOW)])
def test_centred_ranks_ignore_a_monotone_transform_of_the_losses(name):
    """An increasing affine map of every per-step loss keeps the order of the window sums
    (and, with K = 1, any increasing map does): the ranked estimate stays the same, while the
    plain one changes."""
    base = LinearQuadratic(horizon=6)
    make = ES[name]
    kw = dict(num_particles=8, sigma=0.1, centered_ranks=True)
    g = estimate(make(base, **kw))
    g_affine = estimate(make(Transformed(base, lambda x: 3.0 * x + 7.0), **kw))
    np.testing.assert_allclose(g_affine, g, rtol=1e-5, atol=1e-6)
    plain = estimate(make(base, num_particles=8, sigma=0.1))
    assert not np.allclose(plain, g, rtol=0.1)


def test_centred_ranks_with_one_step_windows_ignore_any_increasing_map():
    base = LinearQuadratic(horizon=4)
    kw = dict(num_particles=10, sigma=0.1, truncation_length=1, centered_ranks=True,
              stagger=False)
    g = estimate(pes.PES(base, **kw), steps=3)
    g_exp = estimate(pes.PES(Transformed(base, lambda x: jnp.exp(0.5 * x)), **kw), steps=3)
    np.testing.assert_allclose(g_exp, g, rtol=1e-5, atol=1e-6)


def test_centred_ranks_still_descend():
    """With many pairs the ranked estimate points along the true gradient (cosine > 0.9), and
    a ranking that flipped the signs of the ranks (a broken shaping) is caught."""
    system = LinearQuadratic(horizon=5)
    theta = theta_dict()
    true = flat(exact_gradient(system, theta))
    g = estimate(pes.FullES(system, num_particles=2000, sigma=0.05, centered_ranks=True),
                 theta, steps=1)
    cos = g @ true / np.linalg.norm(g) / np.linalg.norm(true)
    assert cos > 0.9, cos
    assert -g @ true / np.linalg.norm(g) / np.linalg.norm(true) < 0  # a flipped one fails


def test_ranks_in_pes_multiply_the_accumulated_perturbation():
    """Without an episode end in the window, PES's ranked credit is (r+ - r-) (xi + eps): the
    estimate equals mean_p (r+ - r-) (xi_p + eps_p) / (2 sigma^2) computed by hand."""
    system = LinearQuadratic(horizon=100)
    est = pes.PES(system, num_particles=6, sigma=0.1, truncation_length=4, stagger=False,
                  centered_ranks=True)
    theta = theta_dict()
    state = est.init(jax.random.PRNGKey(0), theta)
    _, state, _ = est.estimate(state, theta, jax.random.PRNGKey(1))
    xi = state.noise.xi
    key = jax.random.PRNGKey(2)
    grad, _, _ = est.estimate(state, theta, key)
    # The window's eps and member losses, recomputed with the plain estimator's machinery.
    k_noise, _ = jax.random.split(key)
    eps = est.start_window(state.noise, k_noise, theta).eps
    # Each member's window loss, from the same window scan the estimator runs.
    from pes.estimators._particles import window_scan

    _, stats = window_scan(system, theta, state.inner, state.t,
                           est.start_window(state.noise, k_noise, theta), jax.random.split(
                               key)[1], signs=(1.0, -1.0), num_steps=4, hooks=est)
    r = np.asarray(_ars.centred_ranks(stats.member_loss, stats.finite))
    d = r[:, 0] - r[:, 1]
    want = jax.tree_util.tree_map(
        lambda x, e: np.mean(d.reshape((-1,) + (1,) * (x.ndim - 1)) * (x + e), axis=0)
        / (2 * 0.1**2), xi, eps)
    np.testing.assert_allclose(flat(grad), flat(want), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- top-b


@pytest.mark.parametrize("name", ["pes", pytest.param("full-es", marks=SLOW),
                                  pytest.param("nres", marks=SLOW),
                                  pytest.param("tes", marks=SLOW)])
def test_top_b_of_all_pairs_is_the_plain_estimator_bit_for_bit(name):
    system = LinearQuadratic(horizon=6)
    plain = estimate(ES[name](system, num_particles=8, sigma=0.1))
    all_b = estimate(ES[name](system, num_particles=8, sigma=0.1, top_b=4))
    np.testing.assert_array_equal(all_b, plain)
    fewer = estimate(ES[name](system, num_particles=8, sigma=0.1, top_b=2))
    assert not np.allclose(fewer, plain)


def test_top_b_keeps_the_pairs_with_the_best_returns():
    """The top-b estimate equals the mean over the kept pairs of the per-pair credit
    (L+ - L-) eps / (2 sigma^2 K), the pairs chosen by hand from their window losses."""
    system = LinearQuadratic(horizon=4)
    theta = theta_dict()
    kw = dict(num_particles=10, sigma=0.1, truncation_length=4, stagger=False)
    key = jax.random.PRNGKey(3)
    est = pes.TruncatedES(system, **kw, top_b=2)
    state = est.init(jax.random.PRNGKey(0), theta)
    g, _, _ = est.estimate(state, theta, key)
    k_noise, k_window = jax.random.split(key)
    eps = est.start_window(state.noise, k_noise, theta)
    from pes.estimators._particles import window_scan

    inner = jax.tree_util.tree_map(lambda x: jnp.repeat(x[:, :1], 3, axis=1), state.inner)
    _, stats = window_scan(system, theta, inner, state.t, eps, k_window,
                           signs=(1.0, -1.0, 0.0), num_steps=4, hooks=est)
    L = np.asarray(stats.member_loss)[:, :2]
    kept = np.argsort(L.min(axis=1), kind="stable")[:2]  # best return = lowest loss
    d = L[:, 0] - L[:, 1]
    want = jax.tree_util.tree_map(
        lambda e: np.mean(d[kept].reshape((-1,) + (1,) * (e.ndim - 1)) * np.asarray(e)[kept],
                          axis=0) / (2 * 0.1**2 * 4), eps)
    np.testing.assert_allclose(flat(g), flat(want), rtol=1e-4, atol=1e-6)


def test_top_b_with_normalize_losses_divides_by_the_kept_spread():
    system = LinearQuadratic(horizon=6)
    kw = dict(num_particles=8, sigma=0.1, truncation_length=3, stagger=False)
    a = estimate(pes.PES(system, **kw, top_b=4, normalize_losses=True))
    b = estimate(pes.PES(system, **kw, normalize_losses=True))
    np.testing.assert_array_equal(a, b)
    c = estimate(pes.PES(system, **kw, top_b=2, normalize_losses=True))
    assert np.all(np.isfinite(c)) and not np.allclose(c, b)


@pytest.mark.parametrize("kw, match", [
    (dict(top_b=5), "at most"), (dict(top_b=0), ">= 1"),
    (dict(centered_ranks=True, antithetic=False), "antithetic"),
    (dict(top_b=2, antithetic=False), "antithetic"),
    (dict(centered_ranks=True, normalize_losses=True), "exclude"),
    (dict(centered_ranks=1), "True or False"),
])
def test_bad_ars_settings(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pes.PES(LinearQuadratic(), num_particles=8, sigma=0.1, truncation_length=2, **kw)


def test_options_show_in_repr_and_identity():
    a = pes.PES(LinearQuadratic(), num_particles=8, sigma=0.1, truncation_length=2,
                centered_ranks=True, top_b=3)
    assert "centered_ranks=True" in repr(a) and "top_b=3" in repr(a)
    assert a != pes.PES(LinearQuadratic(), num_particles=8, sigma=0.1, truncation_length=2)


# ------------------------------------------------------------------------- survival bonus


def _steps(system, theta, key, n=40):
    """Losses [n] and done flags [n] of one episode stepped n times (ended states stay)."""

    def run(theta, key):
        def body(s, t):
            s, loss, done = system.step(s, theta, t, key)
            return s, (loss, done)

        return jax.lax.scan(body, system.init(key), jnp.arange(n, dtype=jnp.int32))[1]

    return [np.asarray(x) for x in jax.jit(run)(theta, key)]


@pytest.mark.parametrize("fast", [pytest.param(False, marks=SLOW), True])
def test_survival_bonus_shift_moves_training_losses_only(fast):
    from pes import envs

    kw = dict(max_episode_steps=40, fast=fast)
    plain = envs.Gymnasium("Hopper-v5", **kw)
    shifted = envs.Gymnasium("Hopper-v5", survival_bonus_shift=True, **kw)
    assert shifted.fast == fast and shifted.reward_shift == 1.0 and plain.reward_shift == 0.0
    theta = 0.5 * jax.random.normal(jax.random.PRNGKey(1), plain.flatten(plain.theta0()).shape)
    key = jax.random.PRNGKey(2)
    l0, done0 = _steps(plain, theta, key)
    l1, done1 = _steps(shifted, theta, key)
    np.testing.assert_array_equal(done1, done0)
    alive = np.concatenate([[True], ~done0[:-1]])
    assert alive.sum() < len(alive)  # the episode ends: waiting steps are covered too
    np.testing.assert_array_equal(l1, np.where(alive, l0 + np.float32(1.0), 0.0))
    assert np.all(l0[~alive] == 0)
    # evaluate (and evaluate_return, which it runs) steps true_step: the true return.
    e0, e1 = plain.evaluate(theta, key), shifted.evaluate(theta, key)
    for name in e0:
        np.testing.assert_array_equal(np.asarray(e1[name]), np.asarray(e0[name]))


def test_survival_bonus_shift_needs_a_bonus():
    from pes import envs

    with pytest.raises(envs.EnvError, match="no survival bonus"):
        envs.Gymnasium("HalfCheetah-v5", survival_bonus_shift=True)
    with pytest.raises(envs.EnvError, match="True or False"):
        envs.Gymnasium("Hopper-v5", survival_bonus_shift=1)


# ------------------------------------------------------------------------- configs, flags


def test_run_config_settings():
    config = RunConfig("toy-regression", "pes", centered_ranks=True, top_b=2).resolve()
    assert config.estimator_kwargs()["centered_ranks"] is True
    assert config.estimator_kwargs()["top_b"] == 2
    assert "centred ranks" in config.settings_text() and "top-2 pairs" in config.settings_text()
    plain = RunConfig("toy-regression", "pes").resolve()
    assert "centered_ranks" not in plain.estimator_kwargs() and "top_b" not in \
        plain.estimator_kwargs()
    assert RunConfig("toy-regression", "full-es", top_b=1).resolve().top_b == 1
    with pytest.raises(ConfigError, match="top_b=0 must be"):
        RunConfig("toy-regression", "pes", top_b=0)
    with pytest.raises(ConfigError, match="centered_ranks=.yes. must be true or false"):
        RunConfig("toy-regression", "pes", centered_ranks="yes")
    with pytest.raises(ConfigError, match="centered_ranks=True contradicts estimator='tbptt'"):
        RunConfig("toy-regression", "tbptt", centered_ranks=True).resolve()
    with pytest.raises(ConfigError, match="survival_bonus_shift=True does not apply"):
        RunConfig("toy-regression", "pes", survival_bonus_shift=True).resolve()


@pytest.mark.parametrize("args, message", [
    (["toy-regression", "-e", "pes", "--top-b", "99"], "top_b=99 must be at most"),
    (["toy-regression", "-e", "pes", "--top-b", "0"], "top_b=0 must be"),
    (["toy-regression", "-e", "tbptt", "--top-b", "1"], "contradicts estimator='tbptt'"),
    (["toy-regression", "-e", "pes", "--centered-ranks", "--normalize-losses"], "exclude"),
    (["toy-regression", "-e", "pes", "--survival-bonus-shift"], "does not apply"),
    (["gym:HalfCheetah-v5", "-e", "pes", "--survival-bonus-shift"], "no survival bonus"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["run", *args, "--num-steps", "1", "--no-progress",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_run_with_the_flags(tmp_path):
    import json

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "toy-regression", "-e", "pes", "--num-steps", "2",
                                      "--centered-ranks", "--top-b", "2", "--no-progress",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["centered_ranks"] is True and config["top_b"] == 2


# ------------------------------------------------------------------------- options off

# PES's third estimate on InvertedPendulum-v5 (fast path, unstaggered) before these options
# existed (commit 3560969): the gradient's float32 bytes and the info.loss, exactly.
GOLDEN_GRAD = "ae715d40e714b3bf81ae5d3fdc2684c0f6c5d13f"
GOLDEN_LOSS = float.fromhex("-0x1.ddddde0000000p-3")


def _gym_estimate(**kw):
    system = pes.envs.Gymnasium("InvertedPendulum-v5", max_episode_steps=20)
    theta = 0.1 * jax.random.normal(jax.random.PRNGKey(5),
                                    system.flatten(system.theta0()).shape)
    est = pes.PES(system, num_particles=6, sigma=0.1, truncation_length=5, stagger=False, **kw)
    state = est.init(jax.random.PRNGKey(0), theta)
    for i in range(3):
        g, state, info = est.estimate(state, theta, jax.random.PRNGKey(10 + i))
    return np.asarray(g, np.float32).tobytes().hex(), float(info.loss)


def test_options_off_leave_pes_on_a_gym_system_bit_for_bit():
    """Bit for bit from JAX 0.10.2 (the golden's); XLA's float32 code differs in the last
    bits in older JAX (0.6.1-0.10.0 measured), so there the bound is a few ulps."""
    grad, loss = _gym_estimate()
    if tuple(int(p) for p in jax.__version__.split(".")[:3]) >= (0, 10, 2):
        assert (grad, loss) == (GOLDEN_GRAD, GOLDEN_LOSS)
    else:
        want = np.frombuffer(bytes.fromhex(GOLDEN_GRAD), np.float32)
        np.testing.assert_allclose(np.frombuffer(bytes.fromhex(grad), np.float32), want,
                                   rtol=1e-5)
        assert loss == pytest.approx(GOLDEN_LOSS, rel=1e-6)


@pytest.mark.slow
def test_top_b_of_all_pairs_on_a_gym_system_bit_for_bit():
    assert _gym_estimate(top_b=3) == (GOLDEN_GRAD, GOLDEN_LOSS)


# ------------------------------------------------------------------------- policy.npz


def test_policy_file_round_trips_an_observation_normalisation(tmp_path):
    from pes import envs

    cart = envs.Gymnasium("CartPole-v1")
    leaves, treedef = jax.tree_util.tree_flatten(cart.theta0())
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    theta = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in
                                                   zip(keys, leaves, strict=True)])
    mean = np.array([0.1, -0.2, 0.3, 0.5], np.float32)
    var = np.array([4.0, 0.25, 1.0, 9.0], np.float32)
    path = envs.save_policy(tmp_path / "p.npz", cart, theta, obs_norm=(mean, var))
    loaded = envs.load_policy(path)
    np.testing.assert_array_equal(loaded.obs_norm[0], mean)
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    want = [int(jnp.argmax(cart.policy(theta, (o - mean) / np.sqrt(var + 1e-8)))) for o in obs]
    assert list(loaded(obs)) == want
    plain = envs.load_policy(envs.save_policy(tmp_path / "q.npz", cart, theta))
    assert plain.obs_norm is None
    assert list(plain(obs)) != want  # the normalisation changes these actions
    with pytest.raises(envs.EnvError, match="observation's shape"):
        envs.save_policy(tmp_path / "r.npz", cart, theta, obs_norm=(mean[:2], var))
