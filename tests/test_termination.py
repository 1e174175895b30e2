"""Early termination (``step`` returning ``done``): statistical tests against an exact gradient.

``Hazard`` ends its episodes at random, with probabilities that depend on theta and on the
state. Its expected episode loss E[sum_{t<tau} l_t] is a polynomial of degree <= 2 in the
parameters used at the individual steps (see ``Hazard.expected_total``), and the components
of theta are perturbed independently, so Gaussian smoothing (with any correlation of the
perturbations across steps) leaves its gradient unchanged: the exact smoothed gradient of
L(theta) = E[sum_{t<tau} l_t] / T is ``jax.grad`` of the closed form. Unbiased estimators must
be within 4.5 standard errors of it; two broken ones (termination applied one step late, and
termination ignored until the horizon) must be > 6 away.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from systems import check_biased, check_unbiased, replicate_estimates

import pes

R = 200
THETA = jnp.array([0.5, 0.25])
STATE_SCALE = 0.5


class Hazard:
    """T = 5 steps; theta = (a, b); state s ~ N(0, STATE_SCALE^2), constant over the episode.

    step 0: l = (a - 1)^2 + b
    step 1: l = 2 b;  ends the episode with probability h1 = 0.3 + 0.4 a + 0.05 s
    step 2: l = 4
    step 3: l = 1;    ends the episode with probability h3 = 0.2 + 0.6 b + 0.05 s
    step 4: l = 3
    A step that ends the episode counts its loss. The hazards stay far inside (0, 1) for the
    perturbations used (sigma = 0.1), so the clip never acts in practice.
    """

    horizon = 5

    def init(self, key):
        return STATE_SCALE * jax.random.normal(key, ())

    def step(self, s, theta, t, key):
        a, b = theta[0], theta[1]
        u = jax.random.uniform(key)
        h = jnp.where(t == 1, 0.3 + 0.4 * a + 0.05 * s,
                      jnp.where(t == 3, 0.2 + 0.6 * b + 0.05 * s, 0.0))
        done = u < jnp.clip(h, 0.0, 1.0)
        loss = jnp.select([t == 0, t == 1, t == 2, t == 3],
                          [(a - 1.0) ** 2 + b, 2.0 * b, 4.0, 1.0], 3.0)
        return s, loss, done

    @staticmethod
    def expected_total(theta):
        """E[sum_{t<tau} l_t] at theta (E[s] = 0; the s^2 term of the product is constant)."""
        a, b = theta[0], theta[1]
        h1, h3 = 0.3 + 0.4 * a, 0.2 + 0.6 * b
        return (a - 1.0) ** 2 + b + 2.0 * b + (1.0 - h1) * (4.0 + 1.0 + (1.0 - h3) * 3.0)


def exact():
    return jax.grad(lambda th: Hazard.expected_total(th) / Hazard.horizon)(THETA)


def test_expected_total_matches_simulation():
    # The closed form itself, against plain episodes (pes.unroll) at theta.
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    totals = jax.vmap(lambda k: pes.unroll(Hazard(), THETA, k, 5)[1].sum())(keys)
    se = float(jnp.std(totals)) / np.sqrt(len(keys))
    assert abs(float(jnp.mean(totals)) - float(Hazard.expected_total(THETA))) < 4.5 * se
    # evaluate is the mean per-step loss of such episodes: the meta-objective L
    got = pes.evaluate(Hazard(), THETA, jax.random.PRNGKey(1), num_episodes=20000)
    assert abs(float(got) - float(Hazard.expected_total(THETA)) / 5) < 4.5 * se / 5


def make(kind):
    kw = dict(num_particles=256, sigma=0.1)
    return {
        "pes_staggered": lambda s: pes.PES(s, truncation_length=2, **kw),
        "pes_lockstep": lambda s: pes.PES(s, truncation_length=2, stagger=False, **kw),
        "nres": lambda s: pes.NRES(s, truncation_length=2, **kw),
        "full_es": lambda s: pes.FullES(s, **kw),
    }[kind](Hazard())


WINDOWS = {"pes_staggered": 1, "pes_lockstep": 5, "nres": 2, "full_es": 1}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(WINDOWS))
def test_unbiased_with_termination(kind):
    rows = replicate_estimates(make(kind), THETA, R, windows=WINDOWS[kind])
    # Termination makes the estimates noisier (standard errors up to 6% of the gradient at
    # R = 200): power is shown on a 40% error here, and on the broken estimators below, whose
    # errors are those termination bugs actually make.
    check_unbiased(rows, exact(), shift=0.4)


class DelayDone:
    """The system as a broken estimator would see it: ``done`` takes effect one step late, so
    the step after done is credited to the old episode."""

    horizon = Hazard.horizon

    def __init__(self, system):
        self.system = system

    def init(self, key):
        return self.system.init(key), jnp.zeros((), bool)

    def step(self, state, theta, t, key):
        s, pending = state
        s, loss, done = self.system.step(s, theta, t, key)
        return (s, done), loss, pending


class IgnoreDone:
    """... and one that ignores ``done``: episodes end only at the horizon."""

    horizon = Hazard.horizon

    def __init__(self, system):
        self.system = system

    def init(self, key):
        return self.system.init(key)

    def step(self, s, theta, t, key):
        return self.system.step(s, theta, t, key)[:2]


class LateDonePES(pes.PES):
    """Broken on purpose: the step after ``done`` still counts in the old episode."""

    def __init__(self, system, **kw):
        super().__init__(DelayDone(system), **kw)


class HorizonOnlyPES(pes.PES):
    """Broken on purpose: resets only at the horizon, stepping on after ``done``."""

    def __init__(self, system, **kw):
        super().__init__(IgnoreDone(system), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("broken", [LateDonePES, HorizonOnlyPES])
def test_broken_termination_is_caught(broken):
    est = broken(Hazard(), num_particles=256, sigma=0.1, truncation_length=2)
    check_biased(replicate_estimates(est, THETA, R, windows=1), exact())


# ----------------------------------------------------------------------------- exact checks


class EndsAt:
    """Deterministic: the episode ends with step ``end`` (t == end), loss 1 per step."""

    def __init__(self, horizon, end):
        self.horizon, self.end = horizon, end

    def init(self, key):
        return jnp.zeros(())

    def step(self, s, theta, t, key):
        return s + 1.0, theta[0] * 0.0 + 1.0, t == self.end


@pytest.mark.parametrize("make_est, members", [
    (lambda s: pes.PES(s, num_particles=4, sigma=0.1, truncation_length=3, stagger=False), 2),
    (lambda s: pes.NRES(s, num_particles=4, sigma=0.1, truncation_length=3, stagger=False), 2),
    (lambda s: pes.TruncatedES(s, num_particles=4, sigma=0.1, truncation_length=3,
                               stagger=False), 3),
    (lambda s: pes.TBPTT(s, num_particles=2, truncation_length=3, stagger=False), 1),
    (lambda s: pes.TBPTT(s, num_particles=2, truncation_length=3, backprop_depth=5,
                         stagger=False), 1),
    (lambda s: pes.RTRL(s, num_particles=2, truncation_length=3, stagger=False), 1),
    (lambda s: pes.UORO(s, num_particles=2, truncation_length=3, stagger=False), 1),
], ids=["pes", "nres", "tes", "tbptt", "tbptt_deep", "rtrl", "uoro"])
def test_waiting_members_take_no_counted_steps(make_est, members):
    # T = 6, the episode ends with t = 1: of every 6 steps of the clock 2 are taken. Two
    # windows of 3 steps cover one slot: 2 steps taken in the first, none in the second.
    est = make_est(EndsAt(6, 1))
    theta = jnp.array([0.3])
    state = est.init(jax.random.PRNGKey(0), theta)
    taken, losses = [], []
    for i in range(4):
        _, state, info = est.estimate(state, theta, jax.random.PRNGKey(i))
        taken.append(int(info.inner_steps))
        losses.append(float(info.loss))
    per_window = est.num_pairs * members * 2
    assert taken == [per_window, 0, per_window, 0]
    np.testing.assert_allclose(losses, [2 / 3, 0.0, 2 / 3, 0.0], rtol=1e-6)
    # the clock wrapped after 6 steps: t is 0 again after windows 2 and 4
    assert np.all(np.asarray(state.t) == 0)


def test_full_es_counts_steps_until_done():
    est = pes.FullES(EndsAt(6, 3), num_particles=4, sigma=0.1)
    theta = jnp.array([0.3])
    _, state, info = est.estimate(est.init(jax.random.PRNGKey(0), theta), theta,
                                  jax.random.PRNGKey(1))
    assert int(info.inner_steps) == 4 * 4
    np.testing.assert_allclose(float(info.loss), 4 / 6, rtol=1e-6)
    assert not np.any(np.asarray(state.ended))


def test_members_of_a_pair_end_at_different_steps():
    # done when theta + eps > 0: the + member of a pair ends at once, the - member never.
    class Sign:
        horizon = 4

        def init(self, key):
            return jnp.zeros(())

        def step(self, s, theta, t, key):
            return s + 1.0, jnp.ones(()), theta[0] > 0.0

    est = pes.PES(Sign(), num_particles=2, sigma=1.0, truncation_length=2, stagger=False)
    theta = jnp.array([0.0])
    state = est.init(jax.random.PRNGKey(0), theta)
    _, state, info = est.estimate(state, theta, jax.random.PRNGKey(1))
    # one member stepped once and waits, the other stepped twice
    assert int(info.inner_steps) == 3
    assert sorted(np.asarray(state.ended)[0].tolist()) == [False, True]
    assert sorted(np.asarray(state.inner)[0].tolist()) == [1.0, 2.0]
    _, state, info = est.estimate(state, theta, jax.random.PRNGKey(2))
    # the slot ended at t = 4: both restarted together
    assert int(state.t[0]) == 0 and not np.any(np.asarray(state.ended))


def test_checkpointable_state_and_sharding_layout():
    est = pes.PES(Hazard(), num_particles=8, sigma=0.1, truncation_length=2)
    state = est.init(jax.random.PRNGKey(0), THETA)
    assert state.ended.shape == (4, 2) and state.ended.dtype == bool
    shapes = jax.eval_shape(lambda: est.init(jax.random.PRNGKey(0), THETA))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(state)


class BadDone:
    horizon = 3

    def __init__(self, done, state_dtype=jnp.float32):
        self.done, self.state_dtype = done, state_dtype

    def init(self, key):
        return {"x": jnp.zeros((2,), jnp.float32)}

    def step(self, s, theta, t, key):
        return {"x": s["x"].astype(self.state_dtype)}, jnp.sum(theta), self.done


@pytest.mark.parametrize("system, error, words", [
    (BadDone(jnp.zeros(2, bool)), TypeError, "done must be a bool (or int) scalar"),
    (BadDone(jnp.zeros((), jnp.float32)), TypeError, "done must be a bool (or int) scalar"),
    (BadDone(jnp.zeros((), bool), jnp.int32), ValueError, "state['x']"),
])
def test_step_output_is_checked(system, error, words):
    est = pes.PES(system, num_particles=2, sigma=0.1, truncation_length=2)
    with pytest.raises(error) as info:
        est.init(jax.random.PRNGKey(0), jnp.ones(2))
    assert words in str(info.value)


# ----------------------------------------------------------------------------- reset="pair"


def expected_cycle(theta, sigma, n=1_000_000, seed=0):
    """E[C] for Hazard under antithetic NRES with reset="pair": C = max(tau+, tau-), the steps
    until both members (theta +/- eps, the same uniforms u1, u3 and state s) have ended.

    Given s and eps, with m, M the smaller and larger of a step's two hazards: P(C = 2) = m1,
    and P(C <= 4) = 1 - (1 - m1)(1 - m3) when one member has both smaller hazards (eps_a and
    eps_b of one sign), else m1 + (M1 - m1) M3 + (1 - M1) m3. E[C] = 5 - P(C <= 4) - 2 P(C = 2)
    is then averaged over s and eps by Monte Carlo (standard error ~1e-4, negligible here).
    """
    rng = np.random.default_rng(seed)
    a, b = float(theta[0]), float(theta[1])
    s = STATE_SCALE * rng.standard_normal(n)
    ea, eb = sigma * rng.standard_normal(n), sigma * rng.standard_normal(n)
    h1, h3 = 0.3 + 0.4 * a + 0.05 * s, 0.2 + 0.6 * b + 0.05 * s
    m1, M1 = h1 - 0.4 * np.abs(ea), h1 + 0.4 * np.abs(ea)
    m3, M3 = h3 - 0.6 * np.abs(eb), h3 + 0.6 * np.abs(eb)
    le4 = np.where(ea * eb >= 0, 1 - (1 - m1) * (1 - m3), m1 + (M1 - m1) * M3 + (1 - M1) * m3)
    return float(np.mean(5 - le4 - 2 * m1))


def stationary_rows(est, num_replicates, burn, windows):
    """[R, D]: each row the mean of ``windows`` estimates after ``burn`` discarded ones."""
    rows = []
    for r in range(num_replicates):
        k_init, k_run = jax.random.split(jax.random.PRNGKey(r))
        state = est.init(k_init, THETA)
        total = 0.0
        for w in range(burn + windows):
            g, state, _ = est.estimate(state, THETA, jax.random.fold_in(k_run, w))
            total = total + (np.asarray(g) if w >= burn else 0.0)
        rows.append(total / windows)
    return np.stack(rows)


class MemberReset:
    """The system as a broken pair mode would run it: each member restarts as soon as its own
    episode ends (on its own step index), so the members drift into different episodes."""

    horizon = Hazard.horizon

    def __init__(self, system):
        self.system = system

    def init(self, key):
        return self.system.init(key), jnp.zeros((), jnp.int32)

    def step(self, state, theta, t, key):
        s, own = state
        k_step, k_init = jax.random.split(key)
        s, loss, done = self.system.step(s, theta, own, k_step)
        restart = done | (own + 1 >= self.horizon)
        s = jnp.where(restart, self.system.init(k_init), s)
        return (s, jnp.where(restart, 0, own + 1)), loss


@pytest.mark.slow
def test_pair_reset_nres_expectation():
    # docs/termination.md: with reset="pair", NRES's stationary expectation is
    # grad J_sigma / E[C] = (T / E[C]) grad L_sigma, C = max(tau+, tau-) (E[C] = 3.43 here).
    # 10 windows (about 6 episodes) are discarded so that the pairs reach stationarity.
    claim = exact() * Hazard.horizon / expected_cycle(THETA, 0.1)
    kw = dict(num_particles=256, sigma=0.1, truncation_length=2)
    rows = stationary_rows(pes.NRES(Hazard(), reset="pair", **kw), 80, 10, 6)
    check_unbiased(rows, claim, shift=0.2)
    check_biased(rows, exact())  # not the slot mode's expectation (factor 5 / 3.43)
    # Restarting each member on its own is caught.
    check_biased(stationary_rows(pes.NRES(MemberReset(Hazard()), **kw), 80, 10, 6), claim)


@pytest.mark.parametrize("make_est, members", [
    (lambda s, **kw: pes.PES(s, num_particles=4, sigma=0.1, truncation_length=3, **kw), 2),
    (lambda s, **kw: pes.TruncatedES(s, num_particles=4, sigma=0.1, truncation_length=3,
                                     **kw), 3),
    (lambda s, **kw: pes.TBPTT(s, num_particles=2, truncation_length=3, backprop_depth=5,
                               **kw), 1),
    (lambda s, **kw: pes.RTRL(s, num_particles=2, truncation_length=3, **kw), 1),
], ids=["pes", "tes", "tbptt_deep", "rtrl"])
def test_pair_reset_takes_every_step(make_est, members):
    # T = 6, every episode ends with t = 1: with reset="pair" a pair restarts at once, so
    # every step of every window is taken (compare test_waiting_members_take_no_counted_steps).
    est = make_est(EndsAt(6, 1), stagger=False, reset="pair")
    theta = jnp.array([0.3])
    state = est.init(jax.random.PRNGKey(0), theta)
    for i in range(2):
        _, state, info = est.estimate(state, theta, jax.random.PRNGKey(i))
        assert int(info.inner_steps) == est.num_pairs * members * 3
        np.testing.assert_allclose(float(info.loss), 1.0, rtol=1e-6)
        # episodes of 2 steps back to back: after windows 1 and 2, t = 1 and 0
        assert np.all(np.asarray(state.t) == (1 - i)) and not np.any(np.asarray(state.ended))
    assert "reset='pair'" in repr(est)


def test_reset_setting():
    kw = dict(num_particles=4, sigma=0.1)
    # full ES is one slot per estimate: "pair" changes nothing
    system = Hazard()
    assert pes.FullES(system, reset="pair", **kw) == pes.FullES(system, **kw)
    with pytest.raises(ValueError, match="reset='episode' must be one of 'slot', 'pair'"):
        pes.PES(Hazard(), truncation_length=2, reset="episode", **kw)
