"""pes.envs: gymnasium environments as Systems, their policies, returns and policy files."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
mujoco = pytest.importorskip("mujoco")

import pes.envs as envs  # noqa: E402
from pes.envs import host  # noqa: E402
from pes.envs.gym import ENDED, FRESH, RUNNING  # noqa: E402

MUJOCO_IDS = ["InvertedPendulum-v5", "Hopper-v5", "HalfCheetah-v5"]
CLASSIC_IDS = ["CartPole-v1", "Pendulum-v1"]
_SYSTEMS: dict[str, envs.Gymnasium] = {}


def system(env_id: str) -> envs.Gymnasium:
    """One System per id for the whole module (making MuJoCo environments costs time); the
    generic path (the MuJoCo suite's fast path has its own tests: test_mujoco_suite.py)."""
    if env_id not in _SYSTEMS:
        _SYSTEMS[env_id] = envs.Gymnasium(env_id, fast=False)
    return _SYSTEMS[env_id]


def random_actions(sys_: envs.Gymnasium, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = sys_.action
    if a.kind == "box":
        return rng.uniform(a.low, a.high, (steps,) + a.shape).astype(np.float32)
    return rng.integers(0, a.n, steps).astype(np.int32)


def mj_state(env) -> np.ndarray:
    u = env.unwrapped
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    out = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, out, spec)
    return out


@pytest.mark.parametrize("env_id", MUJOCO_IDS + CLASSIC_IDS)
def test_steps_equal_gymnasiums_own(env_id):
    """Two particles stepped together (one host call per step) under given actions: every
    observation, reward and termination equals gymnasium's for the same seed and actions, and
    a MuJoCo environment's full physics state is the same bits."""
    sys_ = system(env_id)
    steps, n = 30, 2
    states = jax.vmap(sys_.init)(jax.random.split(jax.random.PRNGKey(7), n))
    assert np.all(np.asarray(states.status) == FRESH)
    seeds = [int(s) for s in np.asarray(states.seed)]
    actions = np.stack([random_actions(sys_, steps, i) for i in range(n)], axis=1)
    transition = jax.jit(jax.vmap(sys_.transition))
    refs = [gymnasium.make(env_id) for _ in range(n)]
    obs = np.stack([r.reset(seed=s)[0] for r, s in zip(refs, seeds, strict=True)])
    started = jax.jit(jax.vmap(sys_.start))(states)  # the reset, as a step begins with it
    np.testing.assert_array_equal(np.asarray(started.obs), obs.astype(np.float32))
    ended = [False] * n
    for t in range(steps):
        states, loss, done = transition(states, actions[t])
        for i, ref in enumerate(refs):
            if ended[i]:  # stepping an ended episode is a no-op
                assert float(loss[i]) == 0.0 and bool(done[i])
                continue
            o, r, term, _, _ = ref.step(actions[t, i])
            np.testing.assert_array_equal(np.asarray(states.obs[i]), o.astype(np.float32))
            assert float(loss[i]) == -np.float32(r), (t, i)
            assert bool(done[i]) == term
            if hasattr(ref.unwrapped, "model"):
                np.testing.assert_array_equal(host.from_bits(np.asarray(states.sim[i])),
                                              mj_state(ref))
            ended[i] = term
    assert np.all(np.asarray(states.status) == np.where(ended, ENDED, RUNNING))


def test_policy_step_is_the_linear_policy_on_gymnasium():
    """step = the Linear policy's clipped action on the current observation, then the env."""
    sys_ = system("Hopper-v5")
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    theta = {"W": 0.3 * jax.random.normal(k[0], (3, 11)), "b": 0.1 * jnp.ones(3)}
    state = sys_.init(k[1])
    ref = gymnasium.make("Hopper-v5")
    o, _ = ref.reset(seed=int(state.seed))
    step = jax.jit(sys_.step)
    for t in range(30):
        state, loss, done = step(state, theta, jnp.int32(t), k[0])
        W, b = np.asarray(theta["W"]), np.asarray(theta["b"])
        a = np.clip(W @ o.astype(np.float32) + b, -1, 1).astype(np.float32)
        o, r, term, _, _ = ref.step(a)
        np.testing.assert_allclose(np.asarray(state.obs), o.astype(np.float32), rtol=1e-5,
                                   atol=1e-6)
        assert abs(float(loss) + r) < 1e-4 and bool(done) == term
        if term:
            break


def test_state_in_jax_determines_the_step():
    """Particles swapped between host environments, or a state restored after the host moved
    on (a checkpoint), step exactly as if nothing had happened: the host writes the state."""
    sys_ = system("Hopper-v5")
    acts = random_actions(sys_, 12, 3).reshape(6, 2, 3)
    states = jax.vmap(sys_.init)(jax.random.split(jax.random.PRNGKey(2), 2))
    tr = jax.jit(jax.vmap(sys_.transition))
    states, _, _ = tr(states, acts[0])
    saved = states
    straight = []
    for t in range(1, 6):
        states, loss, _ = tr(states, acts[t])
        straight.append((np.asarray(states.sim), np.asarray(loss)))
    # Replay from the saved state with the two particles' rows swapped on every other step.
    states = saved
    for t in range(1, 6):
        swap = t % 2 == 1
        s_in = jax.tree_util.tree_map(lambda x: x[::-1], states) if swap else states
        a_in = acts[t][::-1] if swap else acts[t]
        s_out, loss, _ = tr(s_in, a_in)
        states = jax.tree_util.tree_map(lambda x: x[::-1], s_out) if swap else s_out
        loss = np.asarray(loss)[::-1] if swap else np.asarray(loss)
        np.testing.assert_array_equal(np.asarray(states.sim), straight[t - 1][0])
        np.testing.assert_array_equal(loss, straight[t - 1][1])


def test_threads_step_the_same_numbers():
    one, two = system("HalfCheetah-v5"), envs.Gymnasium("HalfCheetah-v5", threads=2,
                                                           fast=False)
    keys = jax.random.split(jax.random.PRNGKey(8), 3)
    acts = random_actions(one, 15, 0).reshape(5, 3, 6)
    out = []
    for sys_ in (one, two):
        states, tr = jax.vmap(sys_.init)(keys), jax.jit(jax.vmap(sys_.transition))
        for a in acts:
            states, loss, _ = tr(states, a)
        out.append((np.asarray(states.sim), np.asarray(loss)))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    two.close()


def test_resets_are_seeded_and_made_only_when_needed():
    """The same key gives the same start; the reset host call runs only on steps where some
    particle is fresh; pure_callback's path gives the same numbers."""
    sys_ = system("CartPole-v1")
    calls = []
    real = sys_._reset_host
    sys_._reset_host = lambda fresh, seed: (calls.append(int(np.sum(fresh))), real(fresh, seed))[1]
    try:
        theta = sys_.theta0()
        keys = jax.random.split(jax.random.PRNGKey(4), 3)

        def run(keys):
            def body(s, j):
                s, loss, done = jax.vmap(sys_.step, in_axes=(0, None, None, None))(
                    s, theta, j, keys[0])
                # particle 0 restarts at step 2 (a reset by selection, as the estimators do)
                fresh = jax.vmap(sys_.init)(keys)
                s = jax.tree_util.tree_map(
                    lambda a, b: jnp.where((j == 2) & (jnp.arange(3) == 0).reshape(
                        (3,) + (1,) * (a.ndim - 1)), a, b), fresh, s)
                return s, (loss, s.obs)
            return jax.lax.scan(body, jax.vmap(sys_.init)(keys), jnp.arange(6))[1]

        losses, obs = jax.jit(run)(keys)
        assert calls == [3, 1]  # the first step (all fresh) and the step after the restart
        # particle 0's step 3 is the first of an episode from init(keys[0])
        first, loss0, _ = sys_.step(sys_.init(keys[0]), theta, jnp.int32(0), keys[0])
        np.testing.assert_array_equal(np.asarray(obs[3, 0]), np.asarray(first.obs))
        assert float(losses[3, 0]) == float(loss0)
        host.FAST = False
        losses2, obs2 = jax.jit(run)(keys)
        np.testing.assert_array_equal(np.asarray(obs), np.asarray(obs2))
        np.testing.assert_array_equal(np.asarray(losses), np.asarray(losses2))
    finally:
        host.FAST = True
        sys_._reset_host = real


@pytest.mark.slow
def test_builtin_policies_fit_the_action_spaces():
    key = jax.random.PRNGKey(0)
    hopper, cart = system("Hopper-v5"), system("CartPole-v1")
    theta = envs.Linear().init(key, hopper.obs_dim, hopper.action)
    assert theta["W"].shape == (3, 11) and theta["b"].shape == (3,)
    big = {"W": 100.0 * jnp.ones((3, 11)), "b": jnp.zeros(3)}
    a = hopper.act(big, jnp.ones(11))
    np.testing.assert_array_equal(np.asarray(a), np.ones(3, np.float32))  # clipped to bounds
    mlp = envs.MLP(hidden=(8, 4))
    th = mlp.init(key, cart.obs_dim, cart.action)
    assert [layer["W"].shape for layer in th["layers"]] == [(8, 4), (4, 8), (2, 4)]
    th["layers"][-1]["b"] = jnp.array([0.0, 1.0])
    cart_mlp = envs.Gymnasium("CartPole-v1", policy=mlp)
    assert int(cart_mlp.act(th, jnp.zeros(4))) == 1  # argmax of the logits
    assert cart_mlp.act(th, jnp.zeros(4)).dtype == jnp.int32
    hopper_mlp = envs.Gymnasium("Hopper-v5", policy=envs.MLP())
    th = hopper_mlp.theta0(key)
    th["layers"][2]["W"] = 0.1 * jnp.ones((3, 32))
    out = hopper_mlp.act(th, jnp.ones(11))
    assert out.shape == (3,) and out.dtype == jnp.float32
    flat = hopper_mlp.flatten(th)  # the command line's flat theta acts the same
    assert flat.shape == (11 * 32 + 32 + 32 * 32 + 32 + 32 * 3 + 3,)
    np.testing.assert_array_equal(np.asarray(hopper_mlp.act(flat, jnp.ones(11))),
                                  np.asarray(out))


@pytest.mark.slow
def test_custom_policies_plain_equinox_and_nnx():
    cart = system("CartPole-v1")

    def policy(theta, obs):
        return jnp.tanh(theta["w"] @ obs)  # two logits

    sys_ = envs.Gymnasium("CartPole-v1", policy=policy)
    out = envs.evaluate_return(sys_, {"w": jnp.zeros((2, 4))}, jax.random.PRNGKey(0),
                               episodes=2)
    assert out["env_steps"] >= 2
    with pytest.raises(envs.EnvError, match="without init"):
        sys_.theta0()
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.PRNGKey(0))
    fn, theta0 = envs.from_equinox(model)
    a = envs.Gymnasium("CartPole-v1", policy=fn).act(theta0, jnp.ones(4))
    assert int(a) == int(jnp.argmax(model(jnp.ones(4))))
    nnx = pytest.importorskip("flax.nnx")
    fn, theta0 = envs.from_nnx(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    theta0 = jax.tree_util.tree_map(lambda x: x + 1.0, theta0)  # theta, not the module, counts
    a = envs.Gymnasium("CartPole-v1", policy=fn).act(theta0, jnp.ones(4))
    ref = jnp.ones(4) @ theta0["kernel"] + theta0["bias"]
    assert int(a) == int(jnp.argmax(ref)) and cart.action.n == 2


def test_evaluate_return_equals_a_gymnasium_loop():
    sys_ = system("CartPole-v1")
    theta = {"W": jnp.array([[0.0, 0.0, -1.0, -0.3], [0.0, 0.0, 1.0, 0.3]]),
             "b": jnp.zeros(2)}
    key = jax.random.PRNGKey(5)
    out = envs.evaluate_return(sys_, theta, key, episodes=3, max_steps=60)
    returns, steps = [], 0
    for k in jax.random.split(key, 3):
        seed = int(sys_.init(jax.random.split(k)[0]).seed)
        env = gymnasium.make("CartPole-v1")
        o, _ = env.reset(seed=seed)
        total = 0.0
        for _ in range(60):
            a = int(np.argmax(np.asarray(theta["W"]) @ o.astype(np.float32)))
            o, r, term, _, _ = env.step(a)
            total, steps = total + r, steps + 1
            if term:
                break
        returns.append(total)
    np.testing.assert_allclose(out["returns"], returns)
    assert out["env_steps"] == steps
    assert out["return"] == pytest.approx(np.mean(returns))
    assert out["return_std"] == pytest.approx(np.std(returns))
    ev = sys_.evaluate(theta, key)
    assert ev["meta_loss"] == pytest.approx(-ev["return"] / sys_.horizon)


def test_policy_file_round_trip(tmp_path):
    hopper = envs.Gymnasium("Hopper-v5", policy=envs.MLP(hidden=(5,)))
    theta = hopper.theta0(jax.random.PRNGKey(3))
    theta["layers"][1]["W"] = 0.5 * jnp.ones((3, 5))
    path = envs.save_policy(tmp_path / "policy.npz", hopper, theta)
    policy = envs.load_policy(path)
    assert policy.env_id == "Hopper-v5" and policy.kind == "mlp"
    obs = np.linspace(-1, 1, 11)
    np.testing.assert_array_equal(policy(obs), np.asarray(hopper.act(theta, obs)))
    assert policy(np.stack([obs, obs])).shape == (2, 3)
    env = gymnasium.make(policy.env_id)  # the README's loop
    o, _ = env.reset(seed=0)
    for _ in range(5):
        o, r, term, trunc, _ = env.step(policy(o))
    cart = system("CartPole-v1")
    envs.save_policy(tmp_path / "cart.npz", cart, cart.theta0())
    a = envs.load_policy(tmp_path / "cart.npz")(np.zeros(4))
    assert isinstance(a, int)
    with pytest.raises(envs.EnvError, match="does not exist"):
        envs.load_policy(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(envs.EnvError, match="not a pes policy"):
        envs.load_policy(tmp_path / "other.npz")


class _MultiDiscreteEnv(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1, 1, (2,))
    action_space = gymnasium.spaces.MultiDiscrete([2, 2])


class _NeedsMissing(gymnasium.Env):
    def __init__(self):
        raise gymnasium.error.DependencyNotInstalled("No module named 'mujoco'")


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(envs.EnvError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_input_gives_one_line_errors(monkeypatch):
    _one_line_error("unknown gymnasium environment id 'Hoper-v5'", envs.Gymnasium, "Hoper-v5")
    _one_line_error("observation space Discrete", envs.Gymnasium, "FrozenLake-v1")
    gymnasium.register("PesTestMultiDiscrete-v0", entry_point=_MultiDiscreteEnv)
    _one_line_error("action space MultiDiscrete", envs.Gymnasium, "PesTestMultiDiscrete-v0")
    gymnasium.register("PesTestMissing-v0", entry_point=_NeedsMissing)
    _one_line_error("needs a package that is not installed", envs.Gymnasium, "PesTestMissing-v0")
    from gymnasium.envs.classic_control import CartPoleEnv

    gymnasium.register("PesTestWrapped-v0", entry_point=lambda: gymnasium.wrappers.TransformReward(
        CartPoleEnv(), lambda r: 2 * r))
    _one_line_error("wrapper TransformReward", envs.Gymnasium, "PesTestWrapped-v0")
    hopper = system("Hopper-v5")
    with pytest.raises(envs.PolicyError, match="does not fit the action space Box"):
        envs.Gymnasium("Hopper-v5", policy=lambda th, o: th @ o).check_policy(jnp.ones((4, 11)))
    with pytest.raises(envs.PolicyError, match="theta\\['W'\\] of shape \\(3, 5\\)"):
        hopper.check_policy({"W": jnp.ones((3, 5)), "b": jnp.ones(3)})
    with pytest.raises(envs.PolicyError, match="2 float logits"):
        envs.Gymnasium("CartPole-v1", policy=lambda th, o: th).check_policy(jnp.ones(3))
    _one_line_error("must be a non-empty tuple", envs.MLP, hidden=())
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    _one_line_error("pes.envs needs gymnasium: pip install 'pes\\[gym\\]'", envs.Gymnasium,
                    "CartPole-v1")


def test_host_helpers_batch_over_nested_vmaps():
    seen = []

    def fn(x, y):
        seen.append((x.shape, y.shape))
        return x * 2 + y[:, :1]

    def one(x, y):
        return host.batch_callback(fn, jax.ShapeDtypeStruct((3,), jnp.float32), x, y)

    x = jnp.arange(24.0).reshape(4, 2, 3)
    y = jnp.ones((4, 2, 5))
    out = jax.jit(jax.vmap(jax.vmap(one)))(x, y)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x) + 1)
    assert seen == [((8, 3), (8, 5))]  # one call, rows flattened
    host_calls = []

    def on_host(p, v):
        host_calls.append(p.shape)
        return np.where(p[..., None], v + 1, v)

    def bump(p, v):  # sees the whole batch: p [2, 2], v [2, 2, 3]
        return host.host_call(on_host, jax.ShapeDtypeStruct(v.shape, v.dtype), p, v)

    def maybe(p, v):
        return host.batch_cond(p, bump, v)

    run = jax.jit(jax.vmap(jax.vmap(maybe)))
    p = jnp.array([[False, False], [False, True]])
    v = jnp.zeros((2, 2, 3))
    out = run(p, v)
    np.testing.assert_array_equal(np.asarray(out)[..., 0], np.asarray(p, float))
    assert host_calls == [(2, 2)]  # one call for the whole batch
    none = run(jnp.zeros((2, 2), bool), v)
    np.testing.assert_array_equal(np.asarray(none), 0.0)
    assert host_calls == [(2, 2)]  # no particle asked: no host call


def _estimators_take_done() -> bool:
    """Whether this installation's estimators accept (state, loss, done) steps."""
    import pes

    class Ends:
        horizon = 3

        def init(self, key):
            return jnp.zeros(())

        def step(self, state, theta, t, key):
            return state + 1, jnp.sum(theta) * state, state >= 1

    try:
        pes.PES(Ends(), num_particles=2, sigma=0.1, truncation_length=2).init(
            jax.random.PRNGKey(0), jnp.zeros(1))
        return True
    except (TypeError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _estimators_take_done(), reason="estimators without termination")
def test_cli_trains_a_gym_task_and_writes_its_policy(tmp_path):
    """pes run gym:CartPole-v1 --env-steps: return and env_steps in metrics.jsonl and
    summary.json, policy.npz loadable; bad ids and options are one-line errors (exit 2)."""
    import json

    from typer.testing import CliRunner

    from pes.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "gym:CartPole-v1", "-e", "pes", "--env-steps", "3000",
                              "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["env_steps"] == summary["inner_steps"]
    assert summary["return"] is not None and summary["initial_return"] is not None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "return" in lines[0] and all("env_steps" in x for x in lines)
    # stopped at the first outer step whose steps reached the budget
    assert lines[-1]["env_steps"] >= 3000 > lines[-2]["env_steps"]
    policy = envs.load_policy(out / "policy.npz")
    assert policy.env_id == "CartPole-v1" and isinstance(policy(np.zeros(4)), int)
    for args, text in ((["gym:Nope-v1"], "unknown gymnasium environment id 'Nope-v1'"),
                       (["gym:FrozenLake-v1"], "observation space Discrete"),
                       (["gym:CartPole-v1", "--policy", "cnn"], "policy='cnn'"),
                       (["toy-regression", "--env-steps", "10"], "gym:ENV_ID tasks only")):
        res = runner.invoke(app, ["run", *args, "-e", "pes", "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and text in res.output, res.output
