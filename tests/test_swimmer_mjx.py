"""The swimmer's MJX backend (pure JAX): the MuJoCo backend's rewards and observations to
float32 tolerance, estimators on it under jit and vmap, and its errors.

The three MJX tests each compile a program holding ``mjx.step`` (10-20 s each on a CPU)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pes
from pes.tasks.swimmer import Swimmer, SwimmerMJXState, SwimmerState, from_bits

needs_mjx = pytest.mark.skipif(importlib.util.find_spec("mujoco.mjx") is None,
                               reason="the MJX backend needs mujoco-mjx (pip install 'pes[mjx]')")

# A policy PES trained (seed 0 of docs/results/swimmer, rounded): it swims, ~0.35 per step.
W_SWIM = np.array([[0.162, -0.473, -1.026, -0.052, 0.851, -0.565, 0.100, -0.544],
                   [0.063, 0.685, -0.782, -0.058, 0.159, -1.455, 0.516, 0.314]], np.float32)
STEPS = 100


@pytest.fixture(scope="module")
def tasks():
    if importlib.util.find_spec("mujoco.mjx") is None:
        pytest.skip("the MJX backend needs mujoco-mjx (pip install 'pes[mjx]')")
    return Swimmer(horizon=STEPS, eval_episodes=2), Swimmer(horizon=STEPS, eval_episodes=2,
                                                             backend="mjx")


def mujoco_trajectory(task, start, actions=None, W=None):
    """float64 (observations [T, 8] after each step, rewards [T], actions [T, 2]) from the
    MuJoCo backend in NumPy: the given actions, or those of the policy W."""
    states = start[None]
    obs, rewards, taken = [], [], []
    for i in range(STEPS):
        action = (task.policy_host(W, task.observe_host(states)) if actions is None
                  else actions[i][None])
        states, reward = task.advance_host(states, action)
        rewards.append(reward[0])
        obs.append(task.observe_host(states)[0])
        taken.append(action[0])
    return np.array(obs), np.array(rewards), np.array(taken, np.float32)


@needs_mjx
def test_mjx_equals_mujoco_to_float32_tolerance(tasks):
    """Same initial state (the same init key), same actions: per-step rewards and observations
    agree over 100 steps. Two action sequences, each one jitted scan: the trained policy's
    (swimming, |x| up to ~1.5, joints inside their limits) and a bang-bang control that drives
    both joints into their +-100 degree limits.

    Tolerances, from float32 rounding: the reward is dx/dt with dt = 0.04, so rounding x
    (2^-24 relative, ~1e-7 at |x| ~ 1) alone moves it by ~3e-6 per step, and the state's
    rounding errors accumulate over the 400 RK4 substeps: measured 4e-6 (reward) and 6e-6
    (observations) while swimming; we allow 5x, 2e-5 and 3e-5. At a joint limit the stiff
    limit constraint switches on a substep earlier or later when the joint angle differs by a
    rounding error, which moved observations by up to 2.5e-4 and rewards by 1e-4 (measured);
    we allow 1e-3 and 5e-4 there. In float64 (jax_enable_x64) the two backends agree to 1e-14
    on both sequences (benchmarks/swimmer_mjx.py), so these gaps are float32's, not the
    physics'."""
    task, mjx_task = tasks
    key = jax.random.PRNGKey(0)
    start = from_bits(np.asarray(task.init(key).physics))
    s0 = mjx_task.init(key)
    assert isinstance(s0, SwimmerMJXState) and s0.qpos.dtype == jnp.float32
    qpos_qvel = slice(task.sim.qpos.start, task.sim.qvel.stop)
    np.testing.assert_array_equal(np.concatenate([s0.qpos, s0.qvel]).astype(np.float64),
                                  start[qpos_qvel])  # the same start, exactly

    swim_obs, swim_r, swim_a = mujoco_trajectory(task, start, W=W_SWIM)
    bang = np.where((np.arange(STEPS) // 25 % 2 == 0)[:, None], [1.0, -1.0], [-1.0, 1.0])
    bang_obs, bang_r, _ = mujoco_trajectory(task, start, actions=bang.astype(np.float32))

    def run(actions):
        def body(state, action):
            state, reward = mjx_task.transition(state, action)
            return state, (jnp.concatenate([state.qpos[2:], state.qvel]), reward)
        return jax.lax.scan(body, s0, actions)[1]

    run = jax.jit(run)
    outputs = [run(jnp.asarray(a)) for a in (swim_a, bang.astype(np.float32))]
    obs = np.stack([np.asarray(o, np.float64) for o, _ in outputs])
    rewards = np.stack([np.asarray(r, np.float64) for _, r in outputs])

    assert np.max(np.abs(swim_r)) > 0.5 and np.sum(swim_r) > 15  # it swims
    assert np.max(np.abs(swim_obs[:, 1:3])) < np.deg2rad(99)  # joints inside their limits
    assert np.sum(np.max(np.abs(bang_obs[:, 1:3]), axis=1) > np.deg2rad(99.5)) > 20  # at limits
    np.testing.assert_allclose(rewards[0], swim_r, rtol=0, atol=2e-5)
    np.testing.assert_allclose(obs[0], swim_obs, rtol=0, atol=3e-5)
    np.testing.assert_allclose(rewards[1], bang_r, rtol=0, atol=5e-4)
    np.testing.assert_allclose(obs[1], bang_obs, rtol=0, atol=1e-3)


@pytest.mark.slow  # ~35 s of MJX compilation
@needs_mjx
def test_pes_estimate_runs_on_mjx(tasks):
    """PES (vmap over particles inside a jitted scan) runs unchanged on the MJX backend, with
    no host callback in the compiled program."""
    _, mjx_task = tasks
    est = pes.PES(mjx_task, num_particles=4, sigma=0.3, truncation_length=10, stagger=False)
    theta = jnp.asarray(W_SWIM)
    state = est.init(jax.random.PRNGKey(0), theta)
    lowered = jax.jit(est.estimate).lower(state, theta, jax.random.PRNGKey(1))
    assert "callback" not in lowered.as_text()
    grad, state, info = lowered.compile()(state, theta, jax.random.PRNGKey(1))
    assert grad.shape == (2, 8) and np.all(np.isfinite(grad)) and np.any(grad != 0)
    assert np.isfinite(float(info.loss))
    assert mjx_task.defaults() == Swimmer().defaults()


@pytest.mark.slow  # ~35 s of MJX compilation
@needs_mjx
def test_mjx_evaluate_is_the_mujoco_backends(tasks):
    """evaluate jits on the MJX backend (episodes vmapped, steps scanned), and the returns of
    the swimming policy over 2 episodes of 100 steps (~20 each) are the MuJoCo backend's to
    1e-3: 100 per-step differences of at most ~4e-6 (see above) sum to under 1e-3."""
    task, mjx_task = tasks
    theta = jnp.asarray(W_SWIM)
    ev = jax.jit(mjx_task.evaluate)(theta, jax.random.PRNGKey(5))
    ref = task.evaluate(theta, jax.random.PRNGKey(5))
    assert float(ref["reward"]) > 15
    for name in ("reward", "reward_min", "meta_loss"):
        np.testing.assert_allclose(float(ev[name]), float(ref[name]), rtol=0, atol=1e-3)


def test_mujoco_transition_is_step_with_the_action_given():
    """transition(state, a) on the MuJoCo backend: step's physics and reward for the policy's
    action, bit for bit, and the control clipped to [-1, 1] as MuJoCo clamps it."""
    task = Swimmer(horizon=10)
    state = task.init(jax.random.PRNGKey(1))
    W = jnp.asarray(W_SWIM)
    action = task.policy_host(W_SWIM, task.observe_host(from_bits(np.asarray(state.physics))[None]))
    by_step = task.step(state, W, jnp.int32(0), jax.random.PRNGKey(0))
    by_transition = task.transition(state, jnp.asarray(action[0]))
    np.testing.assert_array_equal(by_step[0].physics, by_transition[0].physics)
    assert float(by_step[1]) == -float(by_transition[1])
    big, clipped = task.transition(state, jnp.array([3.0, -7.0])), task.transition(
        state, jnp.array([1.0, -1.0]))
    assert isinstance(big[0], SwimmerState)
    np.testing.assert_array_equal(big[0].physics, clipped[0].physics)
    assert float(big[1]) == float(clipped[1])  # the cost is charged on the clipped control


def test_bad_backend_is_one_clear_error():
    with pytest.raises(ValueError, match=r"backend='warp' is not known; valid backends: "
                       r"mujoco, mjx"):
        Swimmer(backend="warp")
    with pytest.raises(ValueError, match="threads=2 applies to the mujoco backend only"):
        Swimmer(backend="mjx", threads=2)


def test_backend_is_a_run_setting():
    """pes run swimmer --backend mjx reaches the task through the task options; a bad name or
    another task's run is a configuration error (exit 2) naming backend."""
    from typer.testing import CliRunner

    from pes.cli import app
    from pes.runs.config import RunConfig

    config = RunConfig(task="swimmer", estimator="pes").resolve()
    assert config.backend == "mujoco" and config.task_options() == {"backend": "mujoco"}
    assert RunConfig(task="swimmer", estimator="pes", backend="mjx").task_options() == {
        "backend": "mjx"}
    runner = CliRunner()
    bad = runner.invoke(app, ["run", "swimmer", "-e", "pes", "--backend", "warp",
                              "--no-progress"])
    assert bad.exit_code == 2
    assert "backend='warp' is not a known swimmer backend; valid swimmer backends: mujoco, mjx" \
        in bad.output
    other = runner.invoke(app, ["run", "lorenz", "-e", "pes", "--backend", "mjx",
                                "--no-progress"])
    assert other.exit_code == 2 and "only swimmer, gym:ENV_ID take it" in other.output


def test_missing_mjx_is_one_clear_error(monkeypatch):
    """Without mujoco-mjx the backend says what to install; on the command line that is a
    configuration error naming backend."""
    import sys

    import mujoco

    from pes.runs.errors import ConfigError
    from pes.runs.registry import TASKS

    monkeypatch.setitem(sys.modules, "mujoco.mjx", None)  # makes the import fail
    monkeypatch.delattr(mujoco, "mjx", raising=False)
    with pytest.raises(ImportError, match=r"MJX backend needs .*pip install 'pes\[mjx\]'"):
        Swimmer(backend="mjx")
    with pytest.raises(ConfigError, match=r"task='swimmer': .*pes\[mjx\]") as info:
        TASKS["swimmer"].factory(backend="mjx")
    assert info.value.field == "backend"
