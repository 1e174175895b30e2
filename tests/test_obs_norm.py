"""ARS's running observation normalisation: the running-statistics hook of pes.system, the ES
estimators' observed moments, pes.train's merge, Gymnasium(obs_norm=True), policy.npz, the
command line (--obs-norm on pes run and pes compare; compare's ARS options)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from typer.testing import CliRunner

import pes
from pes.cli import app
from pes.estimators import _particles
from pes.system import Moments, masked_moments, merge_moments, zero_moments


class Drift:
    """A random walk that ends early, with running statistics of its position in theta.

    state (x [2], ended); x' = x + tanh(w) + 0.5 z (z from the step key, shared by a pair's
    members); the episode ends when x'[0] > 1. theta = {'w': [2], 'stats': Moments of x}.
    Every step taken from a running state records (x, the statistics it was handed) on the
    host, independently of the estimator's bookkeeping: the reference of these tests."""

    horizon = 8

    def __init__(self):
        self.log = []
        self.running_stats = self

    def init(self, key):
        return 0.3 * jax.random.normal(key, (2,)), jnp.zeros((), bool)

    def step(self, state, theta, t, key):
        x, ended = state
        s = theta["stats"]
        jax.debug.callback(self._record, x, ended, s.count, s.mean, s.m2)
        new = x + jnp.tanh(theta["w"]) + 0.5 * jax.random.normal(key, (2,))
        done = ended | (new[0] > 1.0)
        return (jnp.where(ended, x, new), done), jnp.where(ended, 0.0, jnp.sum(new**2)), done

    def _record(self, x, ended, count, mean, m2):
        if not bool(ended):
            self.log.append((np.asarray(x), (float(count), np.asarray(mean), np.asarray(m2))))

    # the running-statistics hook
    def observe(self, state):
        return state[0]

    def get(self, theta):
        return Moments(*theta["stats"])

    def put(self, theta, stats):
        return {**theta, "stats": Moments(*stats)}


def drift_theta():
    return {"w": jnp.array([0.2, -0.1], jnp.float32),
            "stats": zero_moments(jax.ShapeDtypeStruct((2,), jnp.float32))}


ES = {
    "pes": lambda s: pes.PES(s, num_particles=6, sigma=0.3, truncation_length=3, stagger=False),
    "full-es": lambda s: pes.FullES(s, num_particles=6, sigma=0.3),
    "nres": lambda s: pes.NRES(s, num_particles=6, sigma=0.3, truncation_length=3,
                               stagger=False),
    "tes": lambda s: pes.TruncatedES(s, num_particles=6, sigma=0.3, truncation_length=3,
                                     stagger=False),
}


def assert_moments_of(observed, xs):
    """observed (Moments) are the count, mean and m2 of the samples xs [n, d] (NumPy, float64)."""
    xs = np.asarray(xs, np.float64)
    assert float(observed.count) == len(xs)
    np.testing.assert_allclose(observed.mean, xs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(observed.m2, ((xs - xs.mean(0)) ** 2).sum(0), rtol=1e-4,
                               atol=1e-5)


def window_observations(make):
    """(info.observed, the host log's positions) of each of three windows."""
    system = Drift()
    est = make(system)
    theta = drift_theta()
    state = est.init(jax.random.PRNGKey(0), theta)
    out = []
    for i in range(3):
        system.log.clear()
        _, state, info = est.estimate(state, theta, jax.random.PRNGKey(10 + i))
        jax.block_until_ready(info)
        out.append((info, [x for x, _ in system.log]))
    return out


# ------------------------------------------------------------------------ the statistics


def test_moments_merge_equals_numpy_of_the_union():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 0.1, (50, 3)), rng.normal(2.0, 0.5, (7, 3))
    ma = masked_moments(jnp.asarray(a, jnp.float32), jnp.ones(50, bool))
    mb = masked_moments(jnp.asarray(b, jnp.float32), jnp.ones(7, bool))
    assert_moments_of(merge_moments(ma, mb), np.concatenate([a, b]))
    assert_moments_of(merge_moments(zero_moments(a[0]), mb), b)
    with_nan = np.concatenate([b, np.full((1, 3), np.nan)])  # a sample left out stays out
    assert_moments_of(masked_moments(jnp.asarray(with_nan, jnp.float32),
                                     jnp.arange(8) < 7), b)
    none = masked_moments(jnp.asarray(b, jnp.float32), jnp.zeros(7, bool))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda x, y: bool(jnp.all(x == y)), merge_moments(ma, none), ma))


@pytest.mark.parametrize("name", ES)
def test_window_moments_are_those_of_every_taken_observation(name):
    """All members of all pairs (perturbed ones and TES's unperturbed one), only the steps they
    took: the host's record of the steps the system simulated from a running state."""
    steps, members = (8, 6) if name == "full-es" else (3, 9 if name == "tes" else 6)
    waited = 0
    for info, xs in window_observations(ES[name]):
        assert_moments_of(info.observed, xs)
        assert float(info.observed.count) == int(info.inner_steps)
        waited += int(info.inner_steps) < steps * members
    assert waited, "no member waited after an episode's end: the test would not see it"


@pytest.mark.parametrize("name", ["pes", "tes"])
def test_the_burn_in_counts_with_the_first_window(name):
    """Staggered particles: the burn-in's observations (as many as its steps taken) are
    reported, merged with the first window's, by the first estimate; the second reports its
    own only. (The host record cannot check the burn-in's own moments: pairs whose burn-in
    is over are stepped, and their steps discarded, while others still burn in.)"""
    system = Drift()
    make = {"pes": pes.PES, "tes": pes.TruncatedES}[name]
    est = make(system, num_particles=6, sigma=0.3, truncation_length=3)
    theta = drift_theta()
    state = est.init(jax.random.PRNGKey(0), theta)
    burn_in = state.pending_steps
    assert isinstance(burn_in, _particles.Pending)
    assert float(burn_in.observed.count) == int(burn_in.steps) > 0
    for i in range(2):
        system.log.clear()
        _, state, info = est.estimate(state, theta, jax.random.PRNGKey(10 + i))
        jax.block_until_ready(info)
        window = masked_moments(jnp.asarray(np.array([x for x, _ in system.log])),
                                jnp.ones(len(system.log), bool))
        want = merge_moments(burn_in.observed, window) if i == 0 else window
        assert float(info.observed.count) == float(want.count) == int(info.inner_steps)
        np.testing.assert_allclose(info.observed.mean, want.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info.observed.m2, want.m2, rtol=1e-4, atol=1e-5)


def _broken(kind):
    real = _particles.observations

    def observations(system, inner, live, act, num_members):
        x, taking = real(system, inner, live, act, num_members)
        if kind == "waiting steps counted":
            return x, jnp.ones_like(taking)
        return x, taking & jnp.asarray([True, False])  # the + members only

    return observations


@pytest.mark.parametrize("kind", ["waiting steps counted", "plus members only"])
def test_a_broken_collection_fails_the_check(monkeypatch, kind):
    monkeypatch.setattr(_particles, "observations", _broken(kind))
    with pytest.raises(AssertionError):
        for info, xs in window_observations(ES["pes"]):
            assert_moments_of(info.observed, xs)


def train_drift(steps_per_call, num_steps=4, system=None):
    system = system or Drift()
    lengths, thetas = [], []

    def callback(record, theta):
        lengths.append(len(system.log))
        thetas.append(jax.tree_util.tree_map(np.asarray, theta))

    result = pes.train(ES["pes"](system), drift_theta(), optax.adam(0.05), num_steps=num_steps,
                       key=jax.random.PRNGKey(1), callback=callback,
                       steps_per_call=steps_per_call)
    return system, lengths, thetas, result


def test_train_merges_after_each_step_and_freezes_within_it():
    """Outer step i: every member's every step is handed theta_{i-1}'s statistics exactly
    (frozen, never perturbed by ES); theta_i's are the moments of every observation so far
    (pes.train's merge), while w moves with the optimizer."""
    system, lengths, thetas, _ = train_drift(steps_per_call=1)
    before = drift_theta()
    start = 0
    for end, theta in zip(lengths, thetas, strict=True):
        handed = {(c, m.tobytes(), s.tobytes()) for _, (c, m, s) in system.log[start:end]}
        want = before["stats"]
        assert handed == {(float(want.count), np.asarray(want.mean).tobytes(),
                           np.asarray(want.m2).tobytes())}
        assert_moments_of(theta["stats"], [x for x, _ in system.log[:end]])
        assert not np.array_equal(theta["w"], before["w"])
        before, start = theta, end
    assert float(thetas[-1]["stats"].count) > 0


def test_chunked_equals_unchunked():
    system = Drift()  # one system: the second run reuses the compiled chunk loop
    _, _, _, one = train_drift(steps_per_call=1, system=system)
    _, _, _, chunked = train_drift(steps_per_call=4, system=system)
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(one.theta), leaves(chunked.theta),
                                                    strict=True))


@pytest.mark.parametrize("make", [
    lambda s: pes.TBPTT(s, truncation_length=2), lambda s: pes.FullBPTT(s),
    lambda s: pes.RTRL(s), lambda s: pes.UORO(s)])
def test_differentiating_estimators_refuse_running_statistics(make):
    with pytest.raises(ValueError, match="does not keep running statistics") as e:
        make(Drift())
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------ Gymnasium


@pytest.fixture(scope="module")
def hopper():
    return pes.envs.Gymnasium("Hopper-v5", obs_norm=True, max_episode_steps=30)


def test_gym_theta_layout_and_errors(hopper):
    plain = pes.envs.Gymnasium("Hopper-v5", max_episode_steps=30)
    assert hopper.running_stats is not None and plain.running_stats is None
    theta = hopper.theta0()
    assert set(theta) == {"obs_norm", "policy"} and float(theta["obs_norm"].count) == 0
    flat = hopper.flatten(theta)
    assert flat.shape == (plain.flatten(plain.theta0()).size + 1 + 2 * 11,)
    # No statistics yet: the identity normalisation, the plain policy's action.
    obs = jnp.linspace(-1, 1, 11)
    w = {"W": jnp.ones((3, 11)) * 0.1, "b": jnp.zeros(3)}
    assert np.array_equal(hopper.act(hopper.with_obs_norm(w), obs), plain.act(w, obs))
    with pytest.raises(pes.envs.EnvError, match="fast path"):
        pes.envs.Gymnasium("CartPole-v1", obs_norm=True)
    with pytest.raises(pes.envs.PolicyError, match="with_obs_norm"):
        hopper.act(w, obs)


def test_gym_window_counts_the_steps_taken_and_policy_file_round_trips(hopper, tmp_path):
    """Statistics from a real window (episodes end early and members wait): as many
    observations as steps taken; theta with them saved as policy.npz acts as training does."""
    est = pes.PES(hopper, num_particles=4, sigma=0.5, truncation_length=30, stagger=False)
    theta = hopper.flatten(hopper.theta0())
    theta = theta.at[23:].set(0.3 * jax.random.normal(jax.random.PRNGKey(2), (theta.size - 23,)))
    state = est.init(jax.random.PRNGKey(0), theta)
    _, state, info = est.estimate(state, theta, jax.random.PRNGKey(1))
    assert 0 < int(info.observed.count) == int(info.inner_steps) < 4 * 30
    theta = hopper.running_stats.put(theta, info.observed)
    path = pes.envs.save_policy(tmp_path / "policy.npz", hopper, theta)
    loaded = pes.envs.load_policy(path)
    stats = hopper.split_theta(theta)[1]
    np.testing.assert_allclose(loaded.obs_norm[0], stats.mean)
    obs = np.random.default_rng(0).normal(size=(16, 11)).astype(np.float32) * 2 + 1
    train_actions = np.asarray(jax.jit(jax.vmap(hopper.act, in_axes=(None, 0)))(theta, obs))
    np.testing.assert_allclose(loaded(obs), train_actions, rtol=1e-6, atol=1e-6)
    assert not np.allclose(train_actions, np.asarray(jax.vmap(
        lambda o: hopper.act(hopper.running_stats.put(
            theta, zero_moments(jax.ShapeDtypeStruct((11,), jnp.float32))), o))(obs)))


# ------------------------------------------------------------------------ command line


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


HOPPER = ["gym:Hopper-v5", "-e", "pes", "--obs-norm", "--num-particles", "4", "-K", "20",
          "--eval-every", "2", "--no-progress", "--no-compile-cache"]


@pytest.mark.slow
def test_cli_run_and_exact_resume_with_obs_norm(tmp_path):
    """pes run --obs-norm: the statistics are in theta (and policy.npz); a run resumed from
    its checkpoint, in chunks, ends bit for bit where the uninterrupted one does."""
    ref, part = tmp_path / "ref", tmp_path / "part"
    result = cli("run", *HOPPER, "--num-steps", "4", "--steps-per-call", "1", "--out", ref)
    assert result.exit_code == 0, result.output
    config = json.loads((ref / "config.json").read_text())
    assert config["obs_norm"] is True
    summary = json.loads((ref / "summary.json").read_text())
    # theta starts with its count of observations: every step taken, the burn-in included.
    assert summary["final_theta"][0] == summary["inner_steps"]
    policy = np.load(ref / "policy.npz")
    assert policy["obs_mean"].shape == (11,) and np.all(policy["obs_var"] > 0)
    assert cli("run", *HOPPER, "--num-steps", "2", "--out", part).exit_code == 0
    result = cli("run", "--resume", part, "--num-steps", "4", "--steps-per-call", "4",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((part / "summary.json").read_text())["final_theta"] == \
        summary["final_theta"]
    assert (part / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
    assert (part / "policy.npz").read_bytes() == (ref / "policy.npz").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["run", "toy-regression", "-e", "pes", "--obs-norm"], "obs_norm=True does not apply"),
    (["run", "gym:CartPole-v1", "-e", "pes", "--obs-norm"], "obs_norm needs the MuJoCo"),
    (["compare", "variance", "--obs-norm"], "--obs-norm does not apply to pes compare"),
    (["compare", "toy-regression", "--survival-bonus-shift", "--seeds", "0"],
     "survival_bonus_shift=True does not apply"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args, message):
    result = cli(*args, "--num-steps", "1", "--no-progress", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_compare_applies_the_ars_options(tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "gym:InvertedPendulum-v5", "--seeds", "0", "--num-steps", "1",
                 "--estimators", "pes", "--obs-norm", "--centered-ranks", "--top-b", "2",
                 "--no-progress", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "pes" / "seed-0" / "config.json").read_text())
    assert (config["obs_norm"], config["centered_ranks"], config["top_b"]) == (True, True, 2)
    command = json.loads((out / "comparison.json").read_text())["command"]
    assert "--centered-ranks --top-b 2" in command and "--obs-norm" in command


# ------------------------------------------------------------------------ a user's System

PROBLEM = '''
import jax
import jax.numpy as jnp
from pes.system import Moments, zero_moments


class Drift:
    """test_obs_norm.Drift without the host record: statistics of x in theta['stats']."""
    horizon = 8

    def __init__(self):
        self.running_stats = self

    def init(self, key):
        return 0.3 * jax.random.normal(key, (2,)), jnp.zeros((), bool)

    def step(self, state, theta, t, key):
        x, ended = state
        scale = jnp.sqrt(theta["stats"].m2 / jnp.maximum(theta["stats"].count, 1.0) + 1.0)
        new = x + jnp.tanh(theta["w"]) / scale + 0.5 * jax.random.normal(key, (2,))
        done = ended | (new[0] > 1.0)
        return (jnp.where(ended, x, new), done), jnp.where(ended, 0.0, jnp.sum(new**2)), done

    def observe(self, state):
        return state[0]

    def get(self, theta):
        return Moments(*theta["stats"])

    def put(self, theta, stats):
        return {**theta, "stats": Moments(*stats)}


def make_system():
    return Drift(), {"w": jnp.array([0.2, -0.1]),
                     "stats": zero_moments(jax.ShapeDtypeStruct((2,), jnp.float32))}
'''


@pytest.mark.slow
def test_a_user_system_with_running_statistics_on_1_and_2_devices(tmp_path, monkeypatch):
    """pes run FILE.py:fn trains the flat theta: the statistics (its first numbers: count,
    mean, m2) count every step taken, and sharding the pairs over two devices reduces them
    as it reduces the gradient."""
    from device_runs import run_on_1_and_2_devices

    monkeypatch.chdir(tmp_path)
    (tmp_path / "problem.py").write_text(PROBLEM)
    one, two = run_on_1_and_2_devices(
        ["problem.py:make_system", "-e", "pes", "--num-particles", "4", "-K", "4",
         "--no-stagger", "--num-steps", "3", "--no-progress"], tmp_path)
    assert two["devices"] == 2 and one["inner_steps"] == two["inner_steps"]
    # ravel order: 'stats' (count, mean [2], m2 [2]) before 'w'.
    assert one["final_theta"][0] == one["inner_steps"] == two["final_theta"][0]
    assert one["final_theta"] == pytest.approx(two["final_theta"], rel=1e-5)
    refused = cli("run", "problem.py:make_system", "-e", "tbptt", "--num-steps", "1",
                  "--no-progress", "--out", tmp_path / "bptt")
    assert refused.exit_code == 2 and "does not keep running statistics" in refused.output


@pytest.mark.slow
def test_obs_norm_on_the_mjx_path():
    """backend='mjx': the same hook in pure JAX (the state holds the observation acted on);
    a window's statistics count its steps taken and agree with the C path's to float32
    physics' tolerance."""
    pytest.importorskip("mujoco.mjx")
    out = []
    for backend in ("mujoco", "mjx"):
        system = pes.envs.Gymnasium("InvertedPendulum-v5", backend=backend, obs_norm=True,
                                    max_episode_steps=10)
        est = pes.PES(system, num_particles=4, sigma=0.1, truncation_length=10, stagger=False)
        theta = system.flatten(system.theta0())
        state = est.init(jax.random.PRNGKey(0), theta)
        _, _, info = est.estimate(state, theta, jax.random.PRNGKey(1))
        assert float(info.observed.count) == int(info.inner_steps) > 0
        out.append(info.observed)
    c, mjx = out
    assert float(c.count) == float(mjx.count)
    np.testing.assert_allclose(mjx.mean, c.mean, atol=1e-4)


def test_compare_gives_ranks_and_top_b_to_the_es_arms_only(monkeypatch, tmp_path):
    from pes.paper import compare
    from pes.runs import RunConfig

    seen = []

    class Recording(RunConfig):
        def resolve(self):
            seen.append(self)
            return super().resolve()

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(compare, "RunConfig", Recording)
    monkeypatch.setattr(compare, "prepare_comparison_dir", stop)
    with pytest.raises(Stop):
        compare.run_comparison("toy-regression", seeds=(0,), num_steps=1, out=tmp_path,
                               estimators=["pes", "tbptt"],
                               ars={"centered_ranks": True, "top_b": 2})
    got = {c.estimator: (c.centered_ranks, c.top_b) for c in seen}
    assert got == {"pes": (True, 2), "tbptt": (None, None)}
