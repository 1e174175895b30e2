"""The MuJoCo suite's fast path against gymnasium's own environments: per step, observations,
rewards and terminations equal bit for bit (float64 on the host, float32 in the System) for
the same initial states and actions."""

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import pes.envs as envs
from pes.envs.mujoco_suite import ENDED, SPECS, MuJoCo, SuiteSim, from_bits, has_fast_path

STEPS = 200


def gym_envs(env_id: str, n: int, **kwargs):
    """n gymnasium environments reset with seeds 0..n-1, and their (qpos, qvel)."""
    envs = [gymnasium.make(env_id, **kwargs) for _ in range(n)]
    obs = np.array([e.reset(seed=i)[0] for i, e in enumerate(envs)])
    qpos = np.array([e.unwrapped.data.qpos for e in envs])
    qvel = np.array([e.unwrapped.data.qvel for e in envs])
    return envs, obs, qpos, qvel


def integration_state(env) -> np.ndarray:
    u = env.unwrapped
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS | mujoco.mjtState.mjSTATE_WARMSTART
    out = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, out, spec)
    return out


def run_against_gymnasium(sim: SuiteSim, env_id: str, steps: int = STEPS, n: int = 2,
                          break_warmstart: bool = False, **kwargs) -> dict[str, float]:
    """Step n gymnasium environments and the same batch in ``sim`` under random actions
    (up to 1.2x the control range, so MuJoCo's clamping and the control cost on the raw
    action are exercised); return the largest differences seen."""
    envs, obs0, qpos, qvel = gym_envs(env_id, n, **kwargs)
    state = sim.reset(qpos, qvel)
    worst = {"reset_obs": float(np.abs(sim.observe_reset(state) - obs0).max()),
             "obs": 0.0, "reward": 0.0, "terminated": 0, "state": 0.0}
    rng = np.random.default_rng(0)
    for _ in range(steps):
        action = (rng.uniform(-1.2, 1.2, (n, sim.nu)) * sim.ctrl_high).astype(np.float32)
        if break_warmstart:
            state[0][:, sim.warmstart] = 0.0
        state, obs, reward, terminated = sim.step(state, action)
        for i, env in enumerate(envs):
            o, r, term, _, _ = env.step(action[i])
            worst["obs"] = max(worst["obs"], float(np.abs(o - obs[i]).max()))
            worst["reward"] = max(worst["reward"], abs(float(r) - float(reward[i])))
            worst["terminated"] += int(term != terminated[i])
            worst["state"] = max(worst["state"],
                                 float(np.abs(integration_state(env) - state[0][i]).max()))
    return worst


@pytest.mark.parametrize("env_id", sorted(SPECS))
def test_steps_equal_gymnasiums(env_id):
    """200 steps from gymnasium's seeded resets: every observation, reward, termination and
    the whole carried state (warm start included) are gymnasium's, bit for bit."""
    worst = run_against_gymnasium(SuiteSim(env_id), env_id)
    assert worst == {"reset_obs": 0.0, "obs": 0.0, "reward": 0.0, "terminated": 0,
                     "state": 0.0}


def test_loop_engine_equals_gymnasium_too():
    """The mj_step loop (used where mujoco.batch is missing or for Ant) is exact as well."""
    sim = SuiteSim("Hopper-v5", engine="loop")
    assert run_against_gymnasium(sim, "Hopper-v5", steps=100)["state"] == 0.0


def test_dropping_the_warm_start_is_caught():
    """Without the solver's warm start carried between steps the contact dynamics drift from
    gymnasium's (HalfCheetah: observations ~0.2 apart within 100 steps):
    the comparison above can fail."""
    worst = run_against_gymnasium(SuiteSim("HalfCheetah-v5"), "HalfCheetah-v5", steps=100,
                                  break_warmstart=True)
    assert worst["obs"] > 1e-9


def test_keywords_are_gymnasiums():
    """v5 keywords change the fast path as they change gymnasium's environment."""
    kwargs = {"ctrl_cost_weight": 0.05, "healthy_z_range": (0.9, 2.0),
              "exclude_current_positions_from_observation": False}
    sim = SuiteSim("Hopper-v5", **kwargs)
    assert sim.obs_dim == 12
    worst = run_against_gymnasium(sim, "Hopper-v5", steps=60, **kwargs)
    assert worst["obs"] == worst["reward"] == worst["terminated"] == 0
    assert has_fast_path("Hopper-v5", ctrl_cost_weight=0.05, max_episode_steps=500)
    assert not has_fast_path("Hopper-v5", xml_file="other.xml")
    assert not has_fast_path("Humanoid-v5")
    with pytest.raises(ValueError, match="does not implement xml_file"):
        SuiteSim("Hopper-v5", xml_file="other.xml")
    with pytest.raises(ValueError, match="has no fast path"):
        SuiteSim("CartPole-v1")


def system_and_theta(env_id: str, scale: float = 0.3):
    """(System, its JAX policy, a random linear theta, its SuiteSim); ``gym:`` ids go through
    pes.envs.Gymnasium (fast='auto', its Linear policy), others use MuJoCo directly."""
    if env_id.startswith("gym:"):
        system = envs.Gymnasium(env_id[4:])
        assert system.fast
        theta = system.theta0()
        theta = {"W": scale * jax.random.normal(jax.random.PRNGKey(1), theta["W"].shape),
                 "b": theta["b"]}
        return system, system.act, theta, system._fast.sim
    sim = SuiteSim(env_id)
    low, high = sim.ctrl_low, sim.ctrl_high

    def policy(theta, obs):
        return jnp.clip(theta["W"] @ obs + theta["b"], low, high)

    system = MuJoCo(env_id, policy=policy)
    theta = {"W": scale * jax.random.normal(jax.random.PRNGKey(1),
                                            (system.action_dim, system.obs_dim)),
             "b": jnp.zeros(system.action_dim)}
    return system, policy, theta, system.sim


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["Hopper-v5", "Ant-v5", "InvertedDoublePendulum-v5",
                                    "gym:Walker2d-v5"])
def test_system_steps_equal_gymnasiums(env_id):
    """The System (init in JAX, one batched host call per step under jit and vmap) gives
    gymnasium's float32 observations, rewards and terminations for the same initial states
    and the policy's actions; after ``done`` a particle stays ended (loss 0, done). Also
    through pes.envs.Gymnasium, which takes the fast path by itself."""
    system, policy, theta, sim = system_and_theta(env_id)
    env_id = env_id.removeprefix("gym:")
    n = 4
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    states = jax.vmap(system.init)(keys)
    step = jax.jit(jax.vmap(system.step, in_axes=(0, None, None, None)))
    act = jax.jit(jax.vmap(policy, in_axes=(None, 0)))
    phys = from_bits(np.asarray(states.physics)[:, :-1])[:, :sim.nphys].copy()
    sim.reset_from_noise(phys)  # the initial states init drew, as the host completes them
    envs = [gymnasium.make(env_id) for _ in range(n)]
    for i, env in enumerate(envs):
        env.reset(seed=0)
        env.unwrapped.set_state(phys[i, sim.qpos], phys[i, sim.qvel])
        assert np.array_equal(np.asarray(states.obs[i]),
                              env.unwrapped._get_obs().astype(np.float32))
    alive = np.ones(n, bool)
    for t in range(100):
        actions = np.asarray(act(theta, states.obs))
        states, loss, done = step(states, theta, jnp.int32(t), keys[0])
        obs, loss, done = np.asarray(states.obs), np.asarray(loss), np.asarray(done)
        status = np.asarray(states.physics[:, -1])
        for i, env in enumerate(envs):
            if not alive[i]:
                assert done[i] and loss[i] == 0.0 and status[i] == ENDED
                continue
            o, r, term, _, _ = env.step(actions[i])
            assert np.array_equal(obs[i], o.astype(np.float32))
            assert loss[i] == -np.float32(r)
            assert done[i] == term
            alive[i] = not term
    if env_id != "Ant-v5":
        assert not alive.all(), "the check should cover terminations"


@pytest.mark.slow
def test_init_is_the_v5_reset_distribution():
    """init draws qpos = qpos0 + U(-s, s) and Ant's qvel = s N(0, 1), as gymnasium's reset."""
    system, _, _, _ = system_and_theta("Ant-v5")
    sim = system.sim
    states = jax.jit(jax.vmap(system.init))(jax.random.split(jax.random.PRNGKey(3), 2000))
    phys = from_bits(np.asarray(states.physics)[:, :-1])[:, :sim.nphys].copy()
    sim.reset_from_noise(phys)
    noise_q = phys[:, sim.qpos] - sim.qpos0
    s = sim.spec.p["reset_noise_scale"]
    assert np.abs(noise_q).max() <= s and np.abs(noise_q.std() - s / np.sqrt(3)) < 0.003
    assert abs(phys[:, sim.qvel].std() - s) < 0.003
    assert np.all(phys[:, sim.time] == 0.0)


def test_gymnasium_takes_the_fast_path_where_it_has_it():
    assert envs.Gymnasium("HalfCheetah-v5", ctrl_cost_weight=0.2).fast
    assert not envs.Gymnasium("HalfCheetah-v5", fast=False).fast
    assert not envs.Gymnasium("CartPole-v1").fast
    with pytest.raises(envs.EnvError, match="has no fast path"):
        envs.Gymnasium("CartPole-v1", fast=True)
    with pytest.raises(envs.EnvError, match="fast="):
        envs.Gymnasium("Hopper-v5", fast="yes")


def test_pes_window_on_the_fast_path():
    """The estimators take the fast path's (state, loss, done): a window runs, its gradient
    is finite, and it counts only the steps simulated (terminated members wait)."""
    import pes

    system = envs.Gymnasium("InvertedPendulum-v5")
    theta = system.theta0()
    est = pes.PES(system, num_particles=4, sigma=0.5, truncation_length=20, stagger=False)
    state = est.init(jax.random.PRNGKey(0), theta)
    grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(1))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grad))
    assert 0 < int(info.inner_steps) < 4 * 20  # sigma 0.5 topples some pendulums early
