"""The MuJoCo swimmer task: gymnasium's Swimmer-v5 rewards and observations, the batched
callback, estimators on it, the command line, and the views. Short horizons keep it fast."""

import json
import os

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest
from typer.testing import CliRunner

import pes
from pes.cli import app
from pes.envs.mujoco_suite import SuiteSim
from pes.paper import swimmer_view
from pes.system import unroll
from pes.tasks.swimmer import (
    Swimmer,
    SwimmerState,
    episode,
    float32_to_bits64,
    from_bits,
    to_bits,
)

RUNNER = CliRunner()
# A large random policy: it saturates the actuators, and from init(PRNGKey(0)) presses a joint
# into its +-100 degree limit in 72 of its first 100 steps.
W_LIMITS = 2.0 * jax.random.normal(jax.random.PRNGKey(7), (2, 8))
LIMIT = np.deg2rad(100)


@pytest.fixture(scope="module")
def task():
    return Swimmer(horizon=100, eval_episodes=3)


def gym_swimmer():
    env = gymnasium.make("Swimmer-v5")
    env.reset(seed=0)
    return env


def physics(state: SwimmerState) -> np.ndarray:
    """float64 [..., nphys] from the state's bits."""
    return from_bits(np.asarray(state.physics))


def test_bits_round_trip_exactly():
    x = np.random.default_rng(0).normal(size=(3, 11)) * 10.0 ** np.arange(-5, 6)
    assert np.array_equal(from_bits(to_bits(x)), x)
    assert to_bits(x).shape == (3, 22) and to_bits(x).dtype == np.uint32


def test_model_is_gymnasiums_physics(task):
    """Our XML compiles to the same physical model as gymnasium's swimmer.xml."""
    ours = task.sim.model
    path = os.path.join(os.path.dirname(gymnasium.__file__), "envs/mujoco/assets/swimmer.xml")
    theirs = mujoco.MjModel.from_xml_path(path)
    for name in ("body_mass", "body_inertia", "body_pos", "body_ipos", "body_iquat",
                 "jnt_type", "jnt_range", "jnt_limited", "dof_armature", "dof_damping",
                 "actuator_gear", "actuator_ctrlrange", "geom_size", "qpos0"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), err_msg=name)
    for name in ("timestep", "integrator", "density", "viscosity", "gravity"):
        np.testing.assert_array_equal(getattr(ours.opt, name), getattr(theirs.opt, name),
                                      err_msg=name)


def test_rewards_and_observations_equal_gymnasium(task):
    """Same initial state and actions: gymnasium's Swimmer-v5 gives the same observations bit
    for bit and the same rewards (ours rounded to float32), over steps where the policy
    saturates the actuators and the joints press into their limits (a large W). At a limit
    MuJoCo's constraint solver starts from the previous step's accelerations (the warm start
    gymnasium's MjData keeps): a state without it differs there in the last bits (~1e-14)."""
    env = gym_swimmer()
    W = W_LIMITS
    state = task.init(jax.random.PRNGKey(0))
    s0 = physics(state)
    env.unwrapped.set_state(s0[task.sim.qpos], s0[task.sim.qvel])
    step = jax.jit(task.step)
    ours, theirs, clipped, at_limit = [], [], 0, 0
    for _ in range(task.horizon):
        obs = task.observe_host(physics(state)[None])
        action = task.policy_host(np.asarray(W), obs)[0]
        clipped += int(np.any(np.abs(action) == 1.0))
        state, loss = step(state, W, jnp.int32(0), jax.random.PRNGKey(0))
        gym_obs, reward, terminated, truncated, _ = env.step(action.astype(np.float64))
        np.testing.assert_array_equal(task.observe_host(physics(state)[None])[0], gym_obs)
        at_limit += int(np.any(np.abs(gym_obs[1:3]) > LIMIT))  # obs[1:3]: the joints
        ours.append(-float(loss))
        theirs.append(np.float32(reward))
        assert not terminated and not truncated
    assert clipped > task.horizon // 2  # the clipping path was exercised
    assert at_limit > task.horizon // 2  # and the joint limits' (the warm start's)
    np.testing.assert_array_equal(np.float32(ours), theirs)


@pytest.mark.parametrize("engine", ["batch", "loop"])
def test_steps_are_the_suites_swimmer(task, engine):
    """The task's MuJoCo backend is the suite's C fast path: SuiteSim("Swimmer-v5") on
    gymnasium's own model file, stepped from the same physics under the same clipped actions,
    gives the same physics bits (warm start included) and observations, on either engine, and
    the same rewards to float32 rounding (the suite charges the control cost in float32)."""
    suite = SuiteSim("Swimmer-v5", engine=engine)
    W = W_LIMITS
    states = jax.vmap(task.init)(jax.random.PRNGKey(0)[None])
    host, at_limit = (physics(states), np.zeros((1, 0))), 0
    step = jax.jit(jax.vmap(task.step, in_axes=(0, None, None, None)))
    for _ in range(50):
        action = task.policy_host(np.asarray(W), task.observe_host(physics(states)))
        states, loss = step(states, W, jnp.int32(0), jax.random.PRNGKey(0))
        host, obs, reward, _ = suite.step(host, action)
        np.testing.assert_array_equal(physics(states), host[0])
        np.testing.assert_array_equal(task.observe_host(physics(states)), obs)
        np.testing.assert_allclose(-np.asarray(loss), reward, rtol=1e-6, atol=1e-6)
        at_limit += int(np.any(np.abs(obs[:, 1:3]) > LIMIT))
    assert at_limit > 10


def test_init_is_the_reset_distribution(task):
    states = jax.vmap(task.init)(jax.random.split(jax.random.PRNGKey(1), 200))
    x = physics(states)
    assert x.shape == (200, task.sim.nphys)
    np.testing.assert_array_equal(x[:, 0], 0.0)  # time
    np.testing.assert_array_equal(x[:, task.sim.warmstart], 0.0)  # no warm start
    noise = np.concatenate([x[:, task.sim.qpos], x[:, task.sim.qvel]], axis=1)
    assert np.all(np.abs(noise) <= 0.1) and noise.std() > 0.05  # U(-0.1, 0.1): std 0.058


def test_batched_step_equals_stepping_each_environment(task):
    """One callback for a [P, M] batch (nested vmap, as in the estimators) gives each
    environment exactly what stepping it alone gives."""
    P, M = 3, 2
    states = jax.vmap(task.init)(jax.random.split(jax.random.PRNGKey(2), P * M))
    thetas = 0.5 * jax.random.normal(jax.random.PRNGKey(4), (P * M, 2, 8))
    step = jax.vmap(jax.vmap(task.step, in_axes=(0, 0, None, None)),
                    in_axes=(0, 0, None, None))
    reshape = lambda x: x.reshape((P, M) + x.shape[1:])
    batched, losses = jax.jit(step)(jax.tree_util.tree_map(reshape, states), reshape(thetas),
                                    jnp.int32(0), jax.random.PRNGKey(0))
    single = jax.jit(task.step)
    for i in range(P * M):
        s, loss = single(SwimmerState(states.physics[i]), thetas[i], jnp.int32(0),
                         jax.random.PRNGKey(0))
        np.testing.assert_array_equal(np.asarray(s.physics),
                                      np.asarray(batched.physics).reshape(P * M, -1)[i])
        assert float(loss) == float(np.asarray(losses).reshape(-1)[i])


def test_evaluate_is_the_mean_return_of_unrolled_episodes(task):
    W = 0.7 * jax.random.normal(jax.random.PRNGKey(5), (2, 8))
    key = jax.random.PRNGKey(6)
    ev = jax.jit(task.evaluate)(W, key)
    keys = jax.random.split(key, task.eval_episodes)
    returns = -jax.vmap(lambda k: unroll(task, W, k, task.horizon)[1])(keys).sum(axis=1)
    np.testing.assert_allclose(float(ev["reward"]), float(returns.mean()), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(ev["reward_min"]), float(returns.min()), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(float(ev["meta_loss"]), -float(returns.mean()) / task.horizon,
                               rtol=1e-5, atol=1e-6)
    # The numpy episode (plots, GIF) takes the same steps from its own start state.
    ep = episode(task, np.asarray(W), seed=0)
    assert ep["states"].shape == (task.horizon + 1, task.sim.nphys)
    assert ep["xy"].shape == (task.horizon + 1, 2) and ep["rewards"].shape == (task.horizon,)


def test_zero_policy_is_a_poor_swimmer(task):
    r = float(task.evaluate(jnp.zeros((2, 8)), jax.random.PRNGKey(0))["reward"])
    assert abs(r) < 20  # from rest it drifts, it does not swim


def test_pes_estimate_runs_and_is_deterministic_per_seed(task):
    """PES vmaps the step over its particles inside lax.scan, unchanged; same keys, same
    estimate, bit for bit."""
    est = pes.PES(task, num_particles=4, sigma=0.3, truncation_length=10)
    theta = jnp.zeros((2, 8))
    runs = []
    for _ in range(2):
        state = est.init(jax.random.PRNGKey(0), theta)
        grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(1))
        grad2, _, _ = est.estimate(state, theta, jax.random.PRNGKey(2))
        runs.append((np.asarray(grad), np.asarray(grad2), float(info.loss)))
    g, g2, loss = runs[0]
    assert g.shape == (2, 8) and np.all(np.isfinite(g)) and np.any(g != 0)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2] and np.isfinite(loss)
    assert not np.array_equal(g, g2)  # a new key, new noise


def test_wrong_theta_shape_is_one_clear_error(task):
    with pytest.raises(ValueError, match=r"theta of shape \(16,\).*\(2, 8\)"):
        pes.PES(task, num_particles=4, sigma=0.3, truncation_length=10).init(
            jax.random.PRNGKey(0), jnp.zeros(16))
    with pytest.raises(ValueError, match=r"W must have shape \(2, 8\)"):
        task.evaluate(jnp.zeros((8, 2)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="horizon"):
        Swimmer(horizon=0)


def test_defaults_follow_the_paper():
    d = Swimmer().defaults()
    assert d.initial_theta().shape == (2, 8) and not np.any(np.asarray(d.initial_theta()))
    # The paper's control code divides by the spread of the returns and starts every pair at
    # t = 0 (its --divide_by_variance, no stagger).
    assert d.estimator_settings("pes") == {"num_particles": 20, "sigma": 0.3,
                                           "truncation_length": 100,
                                           "normalize_losses": True, "stagger": False}
    assert d.estimator_settings("tes")["sigma"] == 0.1
    assert d.estimator_settings("full-es") == {"num_particles": 20, "sigma": 0.3,
                                               "normalize_losses": True}
    assert d.optimizer_for("pes").learning_rate == 0.1
    assert d.optimizer_for("full-es").learning_rate == 0.3
    assert {d.optimizer_for(n).name for n in ("pes", "tes", "full-es", "nres")} == {"sgd"}


def test_cli_run_and_views(tmp_path):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["run", "swimmer", "-e", "pes", "--num-steps", "2",
                                 "--num-particles", "2", "-K", "5", "--eval-every", "2",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["task"] == "swimmer"
    assert np.asarray(summary["final_theta"]).shape == (2, 8)
    assert "reward" in summary["final_metrics"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["inner_steps"] >= 2 * 2 * 5  # 2 windows of 2 particles, plus burn-in

    # A wrong theta0 length is a configuration error: exit 2, one line naming theta0.
    bad = RUNNER.invoke(app, ["run", "swimmer", "-e", "pes", "--theta0=1,2,3",
                              "--out", str(tmp_path / "bad"), "--no-progress"])
    assert bad.exit_code == 2
    assert "theta0" in bad.output and "16 numbers" in bad.output

    # Views: the path plot always; the GIF needs offscreen GL (tried in a child process).
    files = swimmer_view.views({"pes": out}, tmp_path / "views", gif=False)
    assert [f.name for f in files] == ["paths.png"] and files[0].stat().st_size > 0


def test_gif_of_a_few_states(tmp_path):
    states = Swimmer().reset_host(np.linspace(-1.0, 1.0, 6)[:, None] * np.ones(10))
    try:
        out = swimmer_view.write_gif(states, tmp_path / "x.gif", every=3, width=64, height=48)
    except swimmer_view.RenderUnavailable as e:
        pytest.skip(str(e))
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 48) and im.n_frames == 2


def test_gif_without_gl_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    states = Swimmer().reset_host(np.zeros((3, 10)))
    with pytest.raises(swimmer_view.RenderUnavailable,
                       match="no offscreen OpenGL context.*no-such-backend"):
        swimmer_view.write_gif(states, tmp_path / "x.gif")
    assert not (tmp_path / "x.gif").exists()


def test_views_refuse_other_runs(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"task": "lorenz", "final_theta": [1, 2]}))
    with pytest.raises(ValueError, match="not swimmer"):
        swimmer_view.final_theta(tmp_path)
    assert swimmer_view.main([str(tmp_path), "--out", str(tmp_path / "v")]) == 2


def test_comparison_tables_take_a_matrix_theta():
    """pes compare averages final thetas over seeds; the swimmer's is a 2 x 8 matrix."""
    from pes.paper.compare import _mean_std, _pm

    mean, std = _mean_std([[[1.0, 2.0], [3.0, 4.0]], [[3.0, 4.0], [5.0, 6.0]]])
    assert mean == [[2.0, 3.0], [4.0, 5.0]]
    np.testing.assert_allclose(std, np.full((2, 2), np.sqrt(2.0)))
    assert _pm(mean, std).startswith("((2 ± 1.4, 3 ± 1.4), (4 ± 1.4")


def test_init_is_the_host_reset_bit_for_bit():
    # init builds the float64 state bits in JAX; they must be what the simulator's own reset
    # (float64 arithmetic in NumPy) makes of the same noise.
    task = Swimmer()
    for k in range(8):
        key = jax.random.PRNGKey(k)
        noise = np.asarray(jax.random.uniform(key, (10,), jnp.float32, -0.1, 0.1))
        expected = to_bits(task.reset_host(noise[None]))[0]
        np.testing.assert_array_equal(np.asarray(task.init(key).physics), expected)
    x = np.concatenate([np.random.default_rng(0).uniform(-1, 1, 10_000),
                        [0.0, -0.0, 1.0, -2.5, 3e38, -1.2e-38, 7e-10]]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(float32_to_bits64(jnp.asarray(x))),
                                  to_bits(x.astype(np.float64)))
