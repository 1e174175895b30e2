"""MuJoCo Swimmer with a linear policy (PAPER.md experiment 6), simulated by MuJoCo in C.

The environment is gymnasium's Swimmer-v5 rebuilt on the official ``mujoco`` bindings: the same
model (a three-link swimmer in a viscous fluid, RK4 at 0.01 s), ``frame_skip`` = 4 simulator
steps per environment step (dt = 0.04 s) and the same reward::

    r_t = w_fwd * (x_{t+1} - x_t) / dt - w_ctrl * |a_t|^2,   w_fwd = 1, w_ctrl = 1e-4

where x is the front tip's x position (qpos[0]). Observations are ``(qpos[2:], qvel)`` (8
numbers: the x and y position are left out) and episodes start from ``qpos0 + U(-0.1, 0.1)``,
``qvel = U(-0.1, 0.1)``. theta is the linear policy ``W`` of shape (2, 8)::

    a_t = clip(W obs_t, -1, 1)         (the actuators' control range)

and the System's loss is ``l_t = -r_t``, so ES descent on the mean per-step loss is ascent on
the reward. gymnasium hands the action to MuJoCo as given (MuJoCo clamps it to the control
range) and charges the control cost on it; the policy here clips first, so its rewards are
gymnasium's for the clipped action, which is the action the swimmer receives.

How it runs. A System's state must be a JAX pytree, but the simulator is C code working in
float64. The simulator is the MuJoCo suite's C fast path, :class:`pes.envs.mujoco_suite.SuiteSim`
("Swimmer-v5" on ``SWIMMER_XML``). The state holds its physics vector
(``mjSTATE_FULLPHYSICS | mjSTATE_WARMSTART``: time, qpos, qvel and the constraint solver's warm
start, which gymnasium's MjData keeps from step to step) as the *bits* of its float64 numbers
(uint32, two per number), so it survives the trip through JAX unchanged whatever JAX's float
precision: trajectories equal gymnasium's bit for bit (tests/test_swimmer.py), also while a
joint presses into its limit, where the solver's answer depends on its warm start in the last
bits. ``step`` hands the state and W to the host through ``jax.pure_callback`` with
``vmap_method="broadcast_all"``: under the estimators' ``vmap`` over particles (and members)
the callback receives the whole batch at once, computes the actions and advances every
environment with one C call (``mujoco.batch``, or a loop of ``mj_step`` where that is
missing). Every estimator therefore runs unchanged, with one host call per window step for all
particles together. ``evaluate`` runs its episodes in one host call (a loop over time, the
episodes batched). The reward is computed here, as above, in float64 from the clipped action.

The model. ``SWIMMER_XML`` below is written for this project from the physical facts of
gymnasium's ``swimmer.xml`` (MIT licence; itself from OpenAI Gym): body sizes, densities,
joints, armature, gear, fluid density and viscosity, integrator and time step. Shipping our own
file, rather than reading gymnasium's at run time, keeps gymnasium out of the run-time
dependencies (it is a test dependency, used to check that rewards and observations agree);
only the floor's and bodies' looks differ, which the physics never sees (nothing collides).

The MJX backend. ``Swimmer(backend="mjx")`` is the same System in pure JAX: the same model XML
put on the device by MuJoCo's JAX port (``mujoco.mjx``, the optional extra ``pes[mjx]``), the
state the float32 arrays qpos, qvel and the solver's warm start, and a step that computes the
policy, clips the control to its range (MuJoCo's ctrllimited) and takes ``frame_skip``
``mjx.step`` calls, all inside JAX. So it jits, vmaps and runs on GPU/TPU with no host round
trip, and every estimator runs on it unchanged. Its physics is MuJoCo's: with float64
(``jax_enable_x64``) its steps equal the C backend's to ~1e-14 (to the solver's tolerance,
~1e-5, while a joint is pressed into its limit). In float32 they differ by float32 rounding:
over 100 steps ~4e-6 in the reward while swimming, up to ~1e-4 where the joints hit their
limits (tests/test_swimmer_mjx.py). Whole 1000-step episodes amplify any such difference: the
C backend itself, started 1e-7 away under the same actions, ends up to ~0.2 away, and float32
episode returns differ between the backends by about as much as that (benchmarks/README.md).
Its dot products are pinned to true float32, since accelerators would otherwise use
TF32/bfloat16 passes. On a CPU it is slower than the C backend; it is for accelerators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pes.envs.host import float32_to_bits64, from_bits, to_bits
from pes.envs.mjx_suite import MJXSim
from pes.envs.mujoco_suite import SuiteSim
from pes.tasks.base import OptimizerSpec, TaskDefaults

SWIMMER_XML = """
<mujoco model="pes-swimmer">
  <compiler angle="degree" inertiafromgeom="true"/>
  <!-- Swimmer-v5's physics: RK4 at 10 ms in a fluid of density 4000 and viscosity 0.1. -->
  <option timestep="0.01" integrator="RK4" density="4000" viscosity="0.1"/>
  <default>
    <!-- Nothing collides: the swimmer moves through fluid forces alone. -->
    <geom contype="0" conaffinity="0" condim="1" rgba="0.85 0.45 0.2 1"/>
    <joint armature="0.1"/>
  </default>
  <visual>
    <headlight ambient="0.4 0.4 0.4" diffuse="0.6 0.6 0.6"/>
  </visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" width="64" height="64"
             rgb1="0.2 0.3 0.4" rgb2="0.3 0.4 0.5"/>
    <material name="grid" texture="grid" texrepeat="40 40"/>
  </asset>
  <worldbody>
    <light pos="0 0 2" dir="0 0 -1" directional="true"/>
    <geom name="floor" type="plane" pos="0 0 -0.1" size="40 40 0.1" material="grid"/>
    <body name="torso">
      <camera name="track" mode="trackcom" pos="0 -3 3" xyaxes="1 0 0 0 1 1"/>
      <joint name="slider1" type="slide" axis="1 0 0"/>
      <joint name="slider2" type="slide" axis="0 1 0"/>
      <joint name="free_body_rot" type="hinge" axis="0 0 1"/>
      <geom type="capsule" fromto="1.5 0 0 0.5 0 0" size="0.1" density="1000"/>
      <body name="mid" pos="0.5 0 0">
        <joint name="motor1_rot" type="hinge" axis="0 0 1" limited="true" range="-100 100"/>
        <geom type="capsule" fromto="0 0 0 -1 0 0" size="0.1" density="1000"/>
        <body name="back" pos="-1 0 0">
          <joint name="motor2_rot" type="hinge" axis="0 0 1" limited="true" range="-100 100"/>
          <geom type="capsule" fromto="0 0 0 -1 0 0" size="0.1" density="1000"/>
        </body>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor joint="motor1_rot" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
    <motor joint="motor2_rot" gear="150" ctrllimited="true" ctrlrange="-1 1"/>
  </actuator>
</mujoco>
"""


BACKENDS = ("mujoco", "mjx")


class SwimmerMJXState(NamedTuple):
    """The MJX backend's state: qpos [5] (front tip x, y, body angle, two joint angles), qvel
    [5] and qacc_warmstart [5], the constraint solver's warm start (MuJoCo's
    mjSTATE_WARMSTART), float32 (float64 under jax_enable_x64)."""

    qpos: jax.Array
    qvel: jax.Array
    qacc_warmstart: jax.Array


class SwimmerMJXSim(MJXSim):
    """The simulator in JAX: the MuJoCo suite's :class:`pes.envs.mjx_suite.MJXSim` (``mujoco.mjx``,
    its pure-JAX implementation) on the swimmer's MjModel, with the swimmer's state.

    Its functions take one environment (vmap them for a batch) and are jittable.
    """

    def __init__(self, model: Any, frame_skip: int):
        super().__init__(model, frame_skip, who="the swimmer's MJX backend")

    def reset_state(self, noise: jax.Array) -> SwimmerMJXState:
        """noise [nq + nv] -> qpos = qpos0 + noise[:nq], qvel = noise[nq:], no warm start."""
        noise = jnp.asarray(noise, self.dtype)
        return SwimmerMJXState(jnp.asarray(self.qpos0, self.dtype) + noise[:self.nq],
                               noise[self.nq:], jnp.zeros((self.nv,), self.dtype))

    def observe(self, state: SwimmerMJXState) -> jax.Array:
        """[obs_dim]: (qpos[2:], qvel), as gymnasium's Swimmer-v5."""
        return jnp.concatenate([state.qpos[2:], state.qvel])

    def simulate(self, state: SwimmerMJXState, ctrl: jax.Array) -> SwimmerMJXState:
        """frame_skip ``mjx.step`` calls holding ctrl [nu] (clipped), the warm start carried
        (see :meth:`MJXSim.simulate`); returns the new state."""
        qpos, qvel, warm, _ = super().simulate(state.qpos, state.qvel, state.qacc_warmstart,
                                               ctrl)
        return SwimmerMJXState(qpos, qvel, warm)


class SwimmerState(NamedTuple):
    """physics: uint32 [2 * nphys], the float64 ``mjSTATE_FULLPHYSICS | mjSTATE_WARMSTART``
    vector bit for bit (nphys = 16: time, 5 qpos, 5 qvel and the constraint solver's 5 warm-start
    accelerations, as :class:`pes.envs.mujoco_suite.SuiteSim` carries it); the observation is
    (qpos[2:], qvel) of it. The MuJoCo backend's state."""

    physics: jax.Array


@dataclass(frozen=True)
class Swimmer:
    """gymnasium's Swimmer-v5 with a linear policy; theta: W, float32 of shape (2, 8).

    horizon: environment steps per episode (gymnasium's TimeLimit, 1000).
    eval_episodes: episodes averaged by :meth:`evaluate`.
    threads: MuJoCo threads per batched call (1 runs it in the calling thread); mujoco
      backend only.
    backend: 'mujoco' (MuJoCo in C through a host callback; state :class:`SwimmerState`) or
      'mjx' (pure JAX through ``mujoco.mjx``, for accelerators; state
      :class:`SwimmerMJXState`). Same model, reward, reset distribution and defaults.
    """

    horizon: int = 1000
    frame_skip: int = 4
    forward_reward_weight: float = 1.0
    ctrl_cost_weight: float = 1e-4
    reset_noise_scale: float = 0.1
    eval_episodes: int = 5
    threads: int = 1
    backend: str = "mujoco"
    sim: SuiteSim = field(init=False, repr=False, compare=False, hash=False)
    mjx: SwimmerMJXSim | None = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"Swimmer backend={self.backend!r} is not known; valid backends: "
                             f"{', '.join(BACKENDS)}")
        for name in ("horizon", "frame_skip", "eval_episodes", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Swimmer {name}={value!r} must be an int >= 1")
        for name in ("forward_reward_weight", "ctrl_cost_weight", "reset_noise_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Swimmer {name}={value!r} must be a finite number >= 0")
        if self.backend == "mjx" and self.threads != 1:
            raise ValueError(f"Swimmer threads={self.threads} applies to the mujoco backend "
                             "only; the mjx backend runs its batch inside JAX")
        sim = SuiteSim("Swimmer-v5", threads=self.threads, xml=SWIMMER_XML,
                       frame_skip=self.frame_skip,
                       forward_reward_weight=self.forward_reward_weight,
                       ctrl_cost_weight=self.ctrl_cost_weight,
                       reset_noise_scale=self.reset_noise_scale)
        object.__setattr__(self, "sim", sim)
        object.__setattr__(self, "mjx", SwimmerMJXSim(sim.model, self.frame_skip)
                           if self.backend == "mjx" else None)
        # init builds states from noise alone: it needs the model's rest state to be zero and
        # qvel to follow qpos in the physics vector.
        if (np.any(sim.template[sim.phys_idx]) or np.any(sim.qpos0) or np.any(sim.qvel0)
                or sim.qpos.stop != sim.qvel.start):
            raise RuntimeError("init assumes the swimmer model's rest state is all zeros and "
                               "qvel follows qpos in its physics vector; this model breaks that")

    @property
    def theta_shape(self) -> tuple[int, int]:
        """(actions, observations) = (2, 8)."""
        return (self.sim.nu, self.sim.obs_dim)

    @property
    def dt(self) -> float:
        """Seconds of simulated time per environment step (0.04)."""
        return self.sim.spec.dt

    # ------------------------------------------------------------------ host-side callbacks

    def policy_host(self, theta: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """a = clip(W obs, ctrl_low, ctrl_high) in float32: W [B, 2, 8] (or [2, 8]), obs
        [B, 8] -> [B, 2]. A fixed order of float32 operations, so an environment's action is
        the same bits whatever the batch it is stepped in (training, evaluation, tests)."""
        theta = np.asarray(theta, np.float32)
        obs = np.asarray(obs, np.float32)
        if theta.ndim == 2:
            theta = np.broadcast_to(theta, (obs.shape[0],) + theta.shape)
        action = np.zeros(theta.shape[:2], np.float32)
        for j in range(theta.shape[2]):
            action += theta[:, :, j] * obs[:, None, j]
        return self._clip_host(action)

    def _clip_host(self, action: np.ndarray) -> np.ndarray:
        """float32 [B, 2] clipped to the actuators' range, as MuJoCo's ctrllimited does."""
        return np.clip(action, self.sim.ctrl_low, self.sim.ctrl_high)

    def reset_host(self, noise: np.ndarray) -> np.ndarray:
        """[B, nq + nv] noise -> float64 physics [B, nphys]: qpos = qpos0 + noise[:, :nq],
        qvel = noise[:, nq:], time 0, no warm start (gymnasium's reset)."""
        noise, nq = np.asarray(noise, np.float64), self.sim.nq
        return self.sim.reset(self.sim.qpos0 + noise[:, :nq], noise[:, nq:])[0]

    def observe_host(self, phys: np.ndarray) -> np.ndarray:
        """float64 physics [B, nphys] -> [B, 8]: (qpos[2:], qvel), as gymnasium's Swimmer-v5."""
        sim = self.sim
        return sim.spec.observe(np, phys[:, sim.qpos], phys[:, sim.qvel], {})

    def xy_host(self, phys: np.ndarray) -> np.ndarray:
        """float64 physics [B, nphys] -> [B, 2], the front tip's (x, y) (qpos[0:2])."""
        return phys[:, self.sim.qpos][:, :2]

    def advance_host(self, phys: np.ndarray, action: np.ndarray):
        """One environment step of float64 physics [B, nphys] holding the clipped action
        float32 [B, 2] (one C call for the batch) -> (new physics, reward float64 [B])."""
        new, _ = self.sim.advance(phys, action)
        return new, self._reward(phys, new, action)

    def _reward(self, before: np.ndarray, after: np.ndarray, action: np.ndarray) -> np.ndarray:
        """r = w_fwd (x_after - x_before) / dt - w_ctrl |a|^2, float64 [B] (the cost on the
        clipped action, in float64)."""
        dx = self.xy_host(after)[:, 0] - self.xy_host(before)[:, 0]
        return (self.forward_reward_weight * dx / self.dt
                - self.ctrl_cost_weight * np.sum(np.asarray(action, np.float64)**2, axis=1))

    def _step_host(self, packed):
        # One buffer in, one out: each extra callback argument or result costs about as much
        # host-call overhead as simulating a few swimmers.
        packed = np.asarray(packed)
        lead, n = packed.shape[:-1], 2 * self.sim.nphys
        packed = packed.reshape(-1, packed.shape[-1])
        states = from_bits(packed[:, :n])
        obs = self.observe_host(states).astype(np.float32)
        theta = np.ascontiguousarray(packed[:, n:]).view(np.float32).reshape(
            (-1,) + self.theta_shape)
        return self._packed_host(states, self.policy_host(theta, obs), lead)

    def _transition_host(self, physics, action):
        physics, action = np.asarray(physics), np.asarray(action, np.float32)
        lead = physics.shape[:-1]
        states = from_bits(physics.reshape(-1, physics.shape[-1]))
        return self._packed_host(states, self._clip_host(action.reshape(-1, action.shape[-1])),
                                 lead)

    def _packed_host(self, states: np.ndarray, action: np.ndarray, lead: tuple) -> np.ndarray:
        """Simulate float64 states [B, nphys] under clipped actions [B, 2]: the new states'
        bits and the float32 reward's bits, uint32 lead + [2 nphys + 1]."""
        new, reward = self.advance_host(states, action)
        return np.concatenate([to_bits(new), reward.astype(np.float32)[:, None].view(np.uint32)],
                              axis=1).reshape(lead + (-1,))

    # ------------------------------------------------------------------------- the System

    def init(self, key: jax.Array) -> SwimmerState | SwimmerMJXState:
        """A fresh episode: qpos = qpos0 + U(-s, s), qvel = U(-s, s), s = reset_noise_scale.

        The model's rest state is all zeros, so the state is the float64 bits of the noise,
        built in JAX (no host call: estimators reset small states every step by selection).
        On the mjx backend it is the noise itself: the same key, the same start.
        """
        sim, s = self.sim, self.reset_noise_scale
        # uniform's outputs are multiples of 2^-23 of the range: never float32-subnormal.
        noise = jax.random.uniform(key, (sim.nq + sim.nv,), jnp.float32, -s, s)
        if self.mjx is not None:
            return self.mjx.reset_state(noise)
        words = jnp.zeros((2 * sim.nphys,), jnp.uint32)  # time 0, no warm start
        return SwimmerState(words.at[2 * sim.qpos.start:2 * sim.qvel.stop].set(
            float32_to_bits64(noise)))

    def step(self, state: SwimmerState | SwimmerMJXState, theta: jax.Array, t: jax.Array,
             key: jax.Array):
        """One environment step under the policy a = clip(W obs); loss = -reward.

        mujoco backend: the host computes the action (:meth:`policy_host`) next to the
        simulator, so training and the one-call evaluation take identical steps. mjx backend:
        all in JAX, ``sum_j W[:, j] obs[j]`` elementwise (no reduced-precision dot product).
        """
        del t, key  # the dynamics are deterministic and the episode length is the horizon
        self.validate_theta(theta)
        if self.mjx is not None:
            obs = self.mjx.observe(state)
            action = jnp.sum(jnp.asarray(theta, obs.dtype) * obs, axis=-1)
            new, reward = self.transition(state, action)
            return new, -reward
        n = state.physics.shape[-1]
        flat = jnp.asarray(theta, jnp.float32).reshape(-1)
        packed = jnp.concatenate([state.physics, jax.lax.bitcast_convert_type(flat, jnp.uint32)])
        out = jax.pure_callback(
            self._step_host, jax.ShapeDtypeStruct((n + 1,), jnp.uint32), packed,
            vmap_method="broadcast_all")
        return SwimmerState(out[:n]), -jax.lax.bitcast_convert_type(out[n], jnp.float32)

    def transition(self, state: SwimmerState | SwimmerMJXState, action: jax.Array):
        """One environment step holding the control clip(action) [2] -> (new state, reward),
        r = w_fwd (x' - x) / dt - w_ctrl |clip(action)|^2 (float32; on mjx the state's dtype).
        The policy-free half of :meth:`step`, in which the backends can be compared action for
        action."""
        if self.mjx is not None:
            action = self.mjx.clip(jnp.asarray(action, self.mjx.dtype))
            new = self.mjx.simulate(state, action)
            dx = new.qpos[0] - state.qpos[0]
            reward = (self.forward_reward_weight * dx / self.dt
                      - self.ctrl_cost_weight * jnp.sum(action**2))
            return new, reward
        n = state.physics.shape[-1]
        out = jax.pure_callback(
            self._transition_host, jax.ShapeDtypeStruct((n + 1,), jnp.uint32), state.physics,
            jnp.asarray(action, jnp.float32), vmap_method="broadcast_all")
        return SwimmerState(out[:n]), jax.lax.bitcast_convert_type(out[n], jnp.float32)

    def validate_theta(self, theta: Any) -> None:
        """A ValueError unless theta is a float array of shape (2, 8)."""
        shape = tuple(getattr(theta, "shape", ()))
        if not hasattr(theta, "shape") or shape != self.theta_shape:
            raise ValueError(
                f"theta of shape {shape if hasattr(theta, 'shape') else type(theta).__name__} "
                f"does not fit the swimmer's linear policy: W must have shape "
                f"{self.theta_shape} (actions x observations)")

    def evaluate(self, theta: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        """{'reward': mean return of ``eval_episodes`` unperturbed episodes of ``horizon``
        steps from the reset distribution, 'reward_min': their lowest return, 'meta_loss':
        the mean per-step loss, -reward / horizon}. Jittable.

        Episode i starts from ``init(split(split(key, E)[i])[0])``, as in
        ``pes.system.unroll``, and its steps are those of ``step``; but the whole evaluation is
        one host call (a NumPy loop over time, the episodes batched in C), because a JAX scan
        of ``horizon`` single callbacks costs several times more. On the mjx backend it is
        that scan of ``step``, vmapped over the episodes, in JAX.
        """
        self.validate_theta(theta)
        keys = jax.random.split(key, self.eval_episodes)
        if self.mjx is not None:
            returns = jax.vmap(lambda k: self._mjx_return(theta, k))(keys)
        else:
            n, s = self.sim.nq + self.sim.nv, self.reset_noise_scale
            noise = jax.vmap(lambda k: jax.random.uniform(jax.random.split(k)[0], (n,),
                                                          jnp.float32, -s, s))(keys)
            returns = jax.pure_callback(
                self._returns_host, jax.ShapeDtypeStruct((self.eval_episodes,), jnp.float32),
                theta, noise, vmap_method="sequential")
        return {"meta_loss": -jnp.mean(returns) / self.horizon, "reward": jnp.mean(returns),
                "reward_min": jnp.min(returns)}

    def _mjx_return(self, theta: jax.Array, key: jax.Array) -> jax.Array:
        def body(carry, _):
            state, total = carry
            state, loss = self.step(state, theta, jnp.int32(0), key)
            return (state, total - loss), None  # a float32 sum in time order, as the host's

        start = (self.init(jax.random.split(key)[0]), jnp.zeros((), self.mjx.dtype))
        (_, total), _ = jax.lax.scan(body, start, None, length=self.horizon)
        return total

    def _returns_host(self, theta, noise):
        states = self.reset_host(noise)
        total = np.zeros(states.shape[0], np.float32)
        for _ in range(self.horizon):
            states, reward = self.advance_host(
                states, self.policy_host(theta, self.observe_host(states)))
            total += reward.astype(np.float32)  # step()'s float32
        return total

    def defaults(self) -> TaskDefaults:
        """PAPER.md experiment 6: 10 antithetic pairs (num_particles 20), plain SGD.

        PES K = 100, sigma 0.3, lr 0.1; full ES (K = T = 1000) sigma 0.3, lr 0.3; TES K = 100,
        sigma 0.1, lr 0.1; NRES with PES's settings. As in the paper's released control code,
        every estimate is divided by the spread of the particles' window returns
        (normalize_losses, its ``--divide_by_variance``) and every pair starts at t = 0, its
        windows aligned with the episodes (no stagger). Outer steps give about 5e5
        environment steps each: PES/NRES 2000 per step, TES 3000 (its unperturbed member
        steps too), full ES 20000.
        """
        es = {"num_particles": 20, "sigma": 0.3, "truncation_length": 100,
              "normalize_losses": True, "stagger": False}
        rows, cols = self.theta_shape
        return TaskDefaults(
            theta0=(0.0,) * (rows * cols),
            theta_shape=(rows, cols),
            num_steps=250,
            optimizer=OptimizerSpec("sgd", 0.1),
            estimators={
                "pes": dict(es),
                "nres": dict(es),
                "tes": {**es, "sigma": 0.1},
                "full-es": {"num_particles": 20, "sigma": 0.3, "normalize_losses": True},
            },
            optimizer_overrides={"full-es": OptimizerSpec("sgd", 0.3)},
            num_steps_overrides={"tes": 167, "full-es": 25},
        )


def episode(task: Swimmer, theta: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """One unperturbed episode in NumPy, for plots and animations; simulated by MuJoCo in C
    whatever the task's backend (the same physics).

    Returns {'states': [T + 1, nphys] float64 physics states (:class:`SwimmerState`'s
    numbers), 'xy': [T + 1, 2] front-tip positions, 'rewards': [T], 'actions': [T, 2]}. The
    initial noise is drawn by NumPy from ``seed`` (the distribution of ``init``); the steps are
    ``step``'s.
    """
    sim = task.sim
    W = np.asarray(theta, np.float32)
    task.validate_theta(W)
    s = task.reset_noise_scale
    noise = np.random.default_rng(seed).uniform(-s, s, (1, sim.nq + sim.nv)).astype(np.float32)
    states = [task.reset_host(noise)]
    rewards, actions = [], []
    for _ in range(task.horizon):
        action = task.policy_host(W, task.observe_host(states[-1]))
        new, reward = task.advance_host(states[-1], action)
        states.append(new)
        rewards.append(reward[0])
        actions.append(action[0])
    states_arr = np.concatenate(states)
    return {"states": states_arr, "xy": task.xy_host(states_arr), "rewards": np.array(rewards),
            "actions": np.array(actions)}
