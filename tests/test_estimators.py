"""Exact (non-statistical) checks of the estimators: weights at episode boundaries,
equalities between backprop variants, pytree theta, and argument validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from systems import LinearQuadratic, exact_gradient, theta_dict

import pes
from pes.estimators.nres import NRESNoise
from pes.estimators.pes import PESNoise


class Indicator:
    """loss_t = theta[0] if t == target else 0; the state is unused.

    With a single antithetic pair l+ - l- = 2 eps[0] at the target step only, so the estimate is
    eps[0] * w / (sigma^2 K) summed over the steps at the target: it reveals their weights w.
    """

    def __init__(self, horizon, target):
        self.horizon, self.target = horizon, target

    def init(self, key):
        return jnp.zeros(())

    def step(self, s, theta, t, key):
        return s + 1.0, jnp.where(t == self.target, theta[0], 0.0)


SIGMA, K = 0.5, 4
THETA = jnp.array([0.2, -0.1])
XI = jnp.array([0.3, -0.7])


def pes_window_from_t1(target):
    """T = 3, K = 4, start at t = 1 with accumulator XI: steps t = 1, 2 | reset | 0, 1."""
    est = pes.PES(Indicator(3, target), num_particles=2, sigma=SIGMA, truncation_length=K,
                  stagger=False)
    state = est.init(jax.random.PRNGKey(0), THETA)
    state = state._replace(t=jnp.array([1], jnp.int32),
                           noise=state.noise._replace(xi=XI[None]))
    grad, new, info = est.estimate(state, THETA, jax.random.PRNGKey(1))
    return grad, new, info


@pytest.mark.parametrize(
    "target, weight",
    [
        (2, lambda eps: XI + eps),  # last step of the old episode: old accumulator + eps
        (0, lambda eps: eps),  # first step of the new episode: this window's noise only
        (1, lambda eps: XI + 2 * eps),  # t = 1 is hit once in each episode
    ],
)
def test_pes_weights_across_an_episode_end(target, weight):
    grad, new, info = pes_window_from_t1(target)
    eps = new.noise.eps[0]
    expected = eps[0] * weight(eps) / (SIGMA**2 * K)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    # The new episode stepped twice with eps, so that is its whole accumulator.
    np.testing.assert_allclose(new.noise.xi[0], eps, rtol=1e-6)
    assert int(new.t[0]) == 2
    assert int(info.inner_steps) == 2 * K


def test_pes_reset_on_last_step_of_window_empties_accumulator():
    est = pes.PES(Indicator(3, 0), num_particles=2, sigma=SIGMA, truncation_length=3,
                  stagger=False)
    state = est.init(jax.random.PRNGKey(0), THETA)
    state = state._replace(noise=state.noise._replace(xi=XI[None]))
    _, new, _ = est.estimate(state, THETA, jax.random.PRNGKey(1))
    assert int(new.t[0]) == 0
    np.testing.assert_array_equal(new.noise.xi, np.zeros((1, 2)))


def test_nres_redraws_noise_when_an_episode_restarts_mid_window():
    sys_old, sys_new = Indicator(3, 2), Indicator(3, 0)
    results = []
    for system in (sys_old, sys_new):
        est = pes.NRES(system, num_particles=2, sigma=SIGMA, truncation_length=K, stagger=False)
        state = est.init(jax.random.PRNGKey(0), THETA)
        state = state._replace(t=jnp.array([1], jnp.int32))
        results.append((state.noise.eps[0], *est.estimate(state, THETA, jax.random.PRNGKey(1))))
    (eps_old, g_old, new, _), (_, g_new, new2, _) = results
    eps_new = new.noise.eps[0]
    assert not np.allclose(eps_new, eps_old)
    assert isinstance(new.noise, NRESNoise)
    np.testing.assert_allclose(new.noise.xi[0], eps_new)
    np.testing.assert_allclose(g_old, eps_old[0] * eps_old / (SIGMA**2 * K), rtol=1e-5)
    np.testing.assert_allclose(g_new, eps_new[0] * eps_new / (SIGMA**2 * K), rtol=1e-5)


def test_tbptt_full_length_equals_full_bptt_equals_autodiff():
    system = LinearQuadratic(horizon=6, noise=0.0)
    theta = theta_dict()
    key = jax.random.PRNGKey(3)
    tb = pes.TBPTT(system, num_particles=2, truncation_length=6, stagger=False)
    fb = pes.FullBPTT(system, num_particles=2)
    g_tb, _, _ = tb.estimate(tb.init(key, theta), theta, key)
    g_fb, _, info = fb.estimate(fb.init(key, theta), theta, key)
    exact = exact_gradient(system, theta)
    for a, b, c in zip(*map(jax.tree_util.tree_leaves, (g_tb, g_fb, exact)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    assert int(info.inner_steps) == 2 * 6


def test_full_es_window_is_one_fresh_episode():
    system = LinearQuadratic(horizon=6)
    est = pes.FullES(system, num_particles=4, sigma=0.1)
    state = est.init(jax.random.PRNGKey(0), theta_dict())
    for i in range(3):
        _, state, info = est.estimate(state, theta_dict(), jax.random.PRNGKey(i))
        assert np.all(np.asarray(state.t) == 0)
        assert int(info.inner_steps) == 4 * 6
        for leaf in jax.tree_util.tree_leaves(state.noise.xi):
            np.testing.assert_array_equal(leaf, 0.0)


def all_estimators(system):
    kw = dict(num_particles=4, sigma=0.1)
    ests = [
        pes.PES(system, truncation_length=2, **kw),
        pes.PES(system, truncation_length=2, antithetic=False, **kw),
        pes.TruncatedES(system, truncation_length=2, **kw),
        pes.NRES(system, truncation_length=2, **kw),
        pes.NRES(system, truncation_length=2, noise_period=3, **kw),
        pes.FullES(system, **kw),
        pes.TBPTT(system, num_particles=2, truncation_length=2),
        pes.FullBPTT(system, num_particles=2),
    ]
    for name in ("RTRL", "UORO"):
        if hasattr(pes, name):
            ests.append(getattr(pes, name)(system, num_particles=2, truncation_length=2))
    return ests


@pytest.mark.parametrize("index", range(10))
def test_every_estimator_takes_a_dict_theta(index):
    system = LinearQuadratic(horizon=5)
    ests = all_estimators(system)
    if index >= len(ests):
        pytest.skip("estimator not available")
    est, theta = ests[index], theta_dict()
    state = est.init(jax.random.PRNGKey(0), theta)
    steps = 0
    for i in range(3):
        grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(i))
        steps += int(info.inner_steps)
        assert np.isfinite(float(info.loss))
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(theta)
    for g, th in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(theta),
                     strict=True):
        assert g.shape == th.shape and np.all(np.isfinite(g))
    assert steps > 0


def test_stagger_burn_in_counts_inner_steps_and_spreads_particles():
    system = LinearQuadratic(horizon=50)
    est = pes.PES(system, num_particles=400, sigma=0.1, truncation_length=1)
    state = est.init(jax.random.PRNGKey(0), theta_dict())
    t = np.asarray(state.t)
    # 200 pairs uniform on {0..49}: the mean offset is 24.5 +- 1.0
    assert abs(t.mean() - 24.5) < 4 and t.min() >= 0 and t.max() <= 49
    _, _, info = est.estimate(state, theta_dict(), jax.random.PRNGKey(1))
    assert int(info.inner_steps) == 2 * int(t.sum()) + 400
    _, _, info = est.estimate(state._replace(pending_steps=jnp.zeros((), jnp.int32)),
                              theta_dict(), jax.random.PRNGKey(1))
    assert int(info.inner_steps) == 400


def test_horizon_none_never_resets():
    class Drift:
        horizon = None

        def init(self, key):
            return jnp.zeros(())

        def step(self, s, theta, t, key):
            return s + 1.0, (s - theta) ** 2

    est = pes.PES(Drift(), num_particles=2, sigma=0.1, truncation_length=7)
    state = est.init(jax.random.PRNGKey(0), jnp.array(0.0))
    for i in range(3):
        _, state, _ = est.estimate(state, jnp.array(0.0), jax.random.PRNGKey(i))
    assert np.all(np.asarray(state.t) == 21)
    np.testing.assert_array_equal(state.inner, 21.0)


# ----------------------------------------------------------------------------- bad input


class NoStep:
    horizon = 3

    def init(self, key):
        return jnp.zeros(())


class VectorLoss:
    horizon = 3

    def init(self, key):
        return jnp.zeros(2)

    def step(self, s, theta, t, key):
        return s, s * theta


LQ = LinearQuadratic(5)
BAD = [
    (lambda: pes.PES(LQ, num_particles=5, sigma=0.1, truncation_length=2), ValueError,
     "num_particles=5"),
    (lambda: pes.PES(LQ, num_particles=4, sigma=0.0, truncation_length=2), ValueError,
     "sigma=0.0"),
    (lambda: pes.NRES(LQ, num_particles=4, sigma=-1.0, truncation_length=2), ValueError,
     "sigma=-1.0"),
    (lambda: pes.PES(LQ, num_particles=4, sigma=0.1, truncation_length=0), ValueError,
     "truncation_length=0"),
    (lambda: pes.TruncatedES(LQ, num_particles=4, sigma=0.1, truncation_length=2.5), TypeError,
     "truncation_length=2.5"),
    (lambda: pes.TBPTT(LQ, num_particles=0, truncation_length=2), ValueError, "num_particles=0"),
    (lambda: pes.PES(NoStep(), num_particles=4, sigma=0.1, truncation_length=2), TypeError,
     "lacks step"),
    (lambda: pes.FullES(object(), num_particles=4, sigma=0.1), TypeError,
     "lacks init, step, horizon"),
    (lambda: pes.FullBPTT(type("S", (), {"horizon": None, "init": 1, "step": 1})()), ValueError,
     "horizon=None"),
    (lambda: pes.PES(VectorLoss(), num_particles=4, sigma=0.1, truncation_length=2).init(
        jax.random.PRNGKey(0), jnp.ones(2)), ValueError, "loss of shape (2,)"),
    (lambda: pes.PES(LQ, num_particles=4, sigma=0.1, truncation_length=2).init(
        jax.random.PRNGKey(0), {**theta_dict(), "b": jnp.array(1)}), TypeError,
     "theta['b']"),
    (lambda: pes.TBPTT(LQ, truncation_length=2).init(
        jax.random.PRNGKey(0), {**theta_dict(), "w": np.arange(3)}), TypeError, "theta['w']"),
    (lambda: pes.evaluate(type("S", (), {"horizon": None, "init": lambda s, k: 0,
                                         "step": lambda *a: 0})(), jnp.ones(()),
                          jax.random.PRNGKey(0)), ValueError, "eval_steps"),
]


@pytest.mark.parametrize("make, error, words", BAD)
def test_bad_input_names_argument_and_value(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


def test_estimate_rejects_theta_of_another_shape():
    est = pes.PES(LQ, num_particles=4, sigma=0.1, truncation_length=2)
    state = est.init(jax.random.PRNGKey(0), theta_dict())
    with pytest.raises(ValueError, match="different structure"):
        est.estimate(state, {**theta_dict(), "w": jnp.ones(4)}, jax.random.PRNGKey(1))


def test_state_is_a_pytree_and_estimate_is_deterministic():
    est = pes.PES(LQ, num_particles=4, sigma=0.1, truncation_length=2)
    s1 = est.init(jax.random.PRNGKey(0), theta_dict())
    s2 = est.init(jax.random.PRNGKey(0), theta_dict())
    g1, _, _ = est.estimate(s1, theta_dict(), jax.random.PRNGKey(5))
    g2, _, _ = est.estimate(s2, theta_dict(), jax.random.PRNGKey(5))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(s1.noise, PESNoise)
    assert len(jax.tree_util.tree_leaves(s1)) > 3


@pytest.mark.parametrize("make", [
    lambda s: pes.PES(s, num_particles=6, sigma=0.1, truncation_length=4),
    lambda s: pes.NRES(s, num_particles=6, sigma=0.1, truncation_length=4),
], ids=["pes", "nres"])
def test_keys_drawn_before_the_window_equal_keys_drawn_per_step(make, monkeypatch):
    # Windows draw their per-step keys and small fresh states up front when they fit in
    # PREDRAW_MAX elements; the other path draws them step by step. Same bits either way,
    # across episode ends (horizon 5 < 3 windows of 4) and the stagger burn-in.
    import pes.estimators._particles as particles

    def run():
        est = make(LinearQuadratic(horizon=5))
        theta = theta_dict()
        state = est.init(jax.random.PRNGKey(0), theta)
        out = []
        for i in range(3):
            g, state, _ = est.estimate(state, theta, jax.random.PRNGKey(i + 1))
            out.append((g, state))
        return jax.tree_util.tree_leaves(out)

    predrawn = run()
    monkeypatch.setattr(particles, "PREDRAW_MAX", 0)
    for a, b in zip(predrawn, run(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- immutability


def test_estimators_are_immutable_values():
    system = LinearQuadratic(horizon=5)
    a = pes.PES(system, num_particles=4, sigma=0.1, truncation_length=2)
    b = pes.PES(system, num_particles=4, sigma=0.1, truncation_length=2)
    c = pes.PES(system, num_particles=4, sigma=0.2, truncation_length=2)
    other = pes.PES(LinearQuadratic(horizon=5), num_particles=4, sigma=0.1, truncation_length=2)
    assert a == b and hash(a) == hash(b)
    assert a != c and a != other  # another unhashable-by-value system object
    assert a != pes.NRES(system, num_particles=4, sigma=0.1, truncation_length=2)
    with pytest.raises(AttributeError, match="immutable"):
        a.sigma = 0.5
    with pytest.raises(AttributeError, match="immutable"):
        pes.TBPTT(system, truncation_length=2).backprop_depth = 4
    # a resumed run passes a state from another process: no instance needs to have seen init
    state = a.init(jax.random.PRNGKey(0), theta_dict())
    g1, _, _ = a.estimate(state, theta_dict(), jax.random.PRNGKey(1))
    g2, _, _ = b.estimate(state, theta_dict(), jax.random.PRNGKey(1))
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="different structure"):
        b.estimate(state, {**theta_dict(), "w": jnp.ones(4)}, jax.random.PRNGKey(1))


def test_equal_estimators_share_one_compilation():
    from pes.estimators._particles import _estimate_jit
    from pes.tasks import ToyRegression

    theta = jnp.array([-1.0, -2.0])
    make = lambda: pes.PES(ToyRegression(horizon=9), num_particles=4, sigma=0.1,
                           truncation_length=3)
    est = make()
    state = est.init(jax.random.PRNGKey(0), theta)
    est.estimate(state, theta, jax.random.PRNGKey(1))
    before = _estimate_jit._cache_size()
    # ToyRegression is a frozen dataclass: equal tasks give equal estimators
    make().estimate(state, theta, jax.random.PRNGKey(2))
    assert _estimate_jit._cache_size() == before
