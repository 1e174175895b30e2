"""Any gymnasium environment as a pes System: ``Gymnasium(env_id, policy=...)``.

The System. theta parameterises a policy, a JAX function ``(theta, obs) -> action``; one
``step`` is one environment step under that policy, with ``loss = -reward`` and ``done =
terminated`` (the episode ended with this step; its loss counts). ``horizon`` is the
environment's time limit (``max_episode_steps``; gymnasium's truncation), None without one.

The state (:class:`GymState`) holds everything the next step depends on, in JAX:

* ``sim``: the environment's own state as the bits of its float64 numbers (see
  :mod:`pes.envs.host`). For MuJoCo environments MuJoCo's ``mjSTATE_INTEGRATION`` (time, qpos,
  qvel, actuator activations, the constraint solver's warm start, controls and applied forces:
  everything ``mj_step`` reads); for others ``env.unwrapped.state`` (classic control:
  CartPole, Pendulum, Acrobot, MountainCar), or what a user's ``state_io`` reads;
* ``obs``: the current observation (float32), so the policy runs in JAX;
* ``status``: running, ended (stepping it is a no-op: loss 0, done), or fresh (a reset
  pending, with its ``seed``).

``init(key)`` is pure JAX and cheap (the estimators call it every step and select): a fresh
state holding the seed ``bits(key)``. The reset itself happens on the host at the start of the
next ``step`` (``env.reset(seed=seed)``), in one host call for all particles that are fresh,
made only on steps where some are (:func:`pes.envs.host.batch_cond`); then the policy
acts on the reset observation in JAX and the environment steps, in one host call for the whole
batch (:func:`pes.envs.host.batch_callback`). So a step costs one host call, two on steps where
some particle starts an episode, and the same seeds give the same run.

Host environments. Row i of a batch is stepped by host environment i (made on first use).
Before stepping, the host compares the row's state with the one environment i last returned;
only if they differ (a particle copied or restored from a checkpoint, another batch shape)
does it write the state into the environment (``mj_setState`` + ``mj_forward``). The state in
JAX therefore determines the step: particles can be copied, reset by selection, checkpointed
and resumed. Required of an environment for this (checked where possible, documented in
docs/environments.md): its step depends only on the state read and written here (no random
draws inside ``step``, no other mutable attributes that matter), and it carries no wrapper
beyond gymnasium's TimeLimit, OrderEnforcing and PassiveEnvChecker (the environment is
stepped unwrapped, as those wrappers leave the numbers alone). One caveat for MuJoCo
environments whose reward reads positions computed by the simulator (``xpos``, e.g. Ant,
Humanoid) before stepping: after a state is *written*, those are recomputed from it, where
an environment that stepped there holds their values from the last substep; the first reward
after a restore can then differ slightly. Hopper, HalfCheetah, Walker2d, Swimmer,
InvertedPendulum and the classic-control environments read only the state.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from pes.envs.errors import EnvError
from pes.envs.host import batch_callback, batch_cond, from_bits, host_call, to_bits
from pes.envs.policies import (
    ActionSpec,
    Linear,
    PolicyError,
    fit_action,
    moments_norm,
    normalize_obs,
)
from pes.system import Moments, zero_moments

RUNNING, ENDED, FRESH = 0, 1, 2
BACKENDS = ("mujoco", "mjx")
# Wrappers gymnasium.make adds that leave observations, rewards and actions alone.
NEUTRAL_WRAPPERS = ("TimeLimit", "OrderEnforcing", "PassiveEnvChecker")


class GymState(NamedTuple):
    """One environment's state in JAX.

    sim: uint32 [2 * state_size], the float64 environment state's bits.
    obs: float32 [*observation_shape], the observation the policy acts on next.
    status: int32 scalar: 0 running, 1 ended (terminated), 2 fresh (reset pending).
    seed: uint32 scalar, the seed of a pending reset.
    """

    sim: jax.Array
    obs: jax.Array
    status: jax.Array
    seed: jax.Array


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def import_gymnasium():
    """gymnasium, or an EnvError saying how to install it."""
    try:
        import gymnasium
    except ImportError as e:
        raise EnvError(f"pes.envs needs gymnasium: pip install 'pes[gym]' (or "
                       f"'gymnasium[mujoco]>=1.0') ({_one_line(e)})") from None
    return gymnasium


def make_env(env_id: str, make_kwargs: dict) -> Any:
    """``gymnasium.make(env_id, **make_kwargs)`` with its failures as one-line EnvErrors."""
    gym = import_gymnasium()
    if not isinstance(env_id, str) or not env_id:
        raise EnvError(f"env_id={env_id!r} must be a gymnasium environment id such as "
                       "'Hopper-v5'")
    try:
        return gym.make(env_id, **make_kwargs)
    except gym.error.DependencyNotInstalled as e:
        raise EnvError(f"environment {env_id!r} needs a package that is not installed: "
                       f"{_one_line(e)} (pip install 'pes[gym]' for MuJoCo)") from None
    except (gym.error.NameNotFound, gym.error.NamespaceNotFound, gym.error.VersionNotFound,
            gym.error.UnregisteredEnv, gym.error.DeprecatedEnv) as e:
        raise EnvError(f"unknown gymnasium environment id {env_id!r}: {_one_line(e)}") from None
    except ImportError as e:
        raise EnvError(f"environment {env_id!r} could not be made: {_one_line(e)}") from None
    except (gym.error.Error, TypeError, ValueError) as e:
        raise EnvError(f"gymnasium.make({env_id!r}, ...) failed: {_one_line(e)}") from None


def action_spec(space: Any, env_id: str) -> ActionSpec:
    """A gymnasium Box or Discrete action space as an ActionSpec; EnvError for others."""
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        return ActionSpec("box", tuple(space.shape), np.asarray(space.low, np.float32),
                          np.asarray(space.high, np.float32))
    if isinstance(space, spaces.Discrete):
        return ActionSpec("discrete", (), n=int(space.n), start=int(space.start))
    raise EnvError(f"{env_id}: action space {space} is not supported; pes.envs takes a Box or "
                   "a Discrete action space")


class MujocoStateIO:
    """MuJoCo's mjSTATE_INTEGRATION of a gymnasium MujocoEnv: everything mj_step reads."""

    def __init__(self, unwrapped: Any):
        import mujoco

        self._get_state, self._set_state = mujoco.mj_getState, mujoco.mj_setState
        self._forward = mujoco.mj_forward
        self.spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self.size = int(mujoco.mj_stateSize(unwrapped.model, self.spec))

    def get(self, u: Any, out: np.ndarray) -> None:
        self._get_state(u.model, u.data, out, self.spec)

    def set(self, u: Any, x: np.ndarray) -> None:
        self._set_state(u.model, u.data, x, self.spec)
        self._forward(u.model, u.data)  # positions etc. that step reads before moving


class AttributeStateIO:
    """``env.unwrapped.state`` (classic control) as float64 numbers. Writing it also clears
    CartPole's ``steps_beyond_terminated``: a written state is never past termination."""

    def __init__(self, unwrapped: Any):
        x = np.asarray(unwrapped.state, np.float64)
        self.shape, self.size = x.shape, int(x.size)

    def get(self, u: Any, out: np.ndarray) -> None:
        out[:] = np.asarray(u.state, np.float64).ravel()

    def set(self, u: Any, x: np.ndarray) -> None:
        u.state = np.array(x, np.float64).reshape(self.shape)
        if hasattr(u, "steps_beyond_terminated"):
            u.steps_beyond_terminated = None


class CustomStateIO:
    """A user's ``(get, set)``: ``get(unwrapped_env) -> float64 array``, ``set(unwrapped_env,
    float64 array)``."""

    def __init__(self, unwrapped: Any, get: Callable, set: Callable):
        self._get, self._set = get, set
        self.size = int(np.asarray(get(unwrapped), np.float64).size)

    def get(self, u: Any, out: np.ndarray) -> None:
        out[:] = np.asarray(self._get(u), np.float64).ravel()

    def set(self, u: Any, x: np.ndarray) -> None:
        self._set(u, np.array(x, np.float64))


def pick_state_io(env: Any, env_id: str, custom: tuple | None) -> Any:
    """How to read and write this (reset) environment's state."""
    u = env.unwrapped
    if custom is not None:
        if not (isinstance(custom, tuple | list) and len(custom) == 2
                and all(callable(f) for f in custom)):
            raise EnvError("state_io must be a pair of functions (get, set)")
        return CustomStateIO(u, *custom)
    if type(getattr(u, "model", None)).__name__ == "MjModel" and hasattr(u, "data"):
        return MujocoStateIO(u)
    state = getattr(u, "state", None)
    if state is not None:
        x = np.asarray(state)
        if x.dtype.kind in "fiu" and x.size > 0:
            return AttributeStateIO(u)
    raise EnvError(f"{env_id}: pes.envs cannot read this environment's state (it is neither a "
                   "MuJoCo environment nor has a numeric env.unwrapped.state); pass "
                   "state_io=(get, set)")


def survival_bonus(env: Any, env_id: str) -> float:
    """The survival bonus per step of a gymnasium v5 environment (``healthy_reward``)."""
    bonus = getattr(env.unwrapped, "_healthy_reward", None)
    if isinstance(bonus, bool) or not isinstance(bonus, int | float) or not math.isfinite(bonus):
        raise EnvError(f"{env_id} has no survival bonus (healthy_reward) to shift; "
                       "survival_bonus_shift applies to Hopper, Walker2d and Ant (v5)")
    return float(bonus)


def _check_wrappers(env: Any, env_id: str) -> None:
    while hasattr(env, "env"):
        name = type(env).__name__
        if name not in NEUTRAL_WRAPPERS:
            raise EnvError(f"{env_id}: the environment carries the wrapper {name}, which "
                           "pes.envs cannot apply (it steps the unwrapped environment); make "
                           "it without that wrapper")
        env = env.env


class Gymnasium:
    """A gymnasium environment with a policy as a pes System (see the module docstring).

    Args:
      env_id: a registered gymnasium id, e.g. 'Hopper-v5', 'CartPole-v1'.
      policy: ``(theta, obs) -> raw action`` (fitted by :func:`pes.envs.policies.fit_action`);
        :class:`~pes.envs.Linear` (the default) or :class:`~pes.envs.MLP`, or any JAX function.
      threads: host threads stepping one batch (1: the calling thread). Helps where the
        simulator releases Python's GIL for long enough (large MuJoCo models).
      eval_episodes: episodes averaged by :meth:`evaluate`.
      state_io: optional ``(get, set)`` reading/writing ``env.unwrapped``'s state as float64
        numbers, for environments pes cannot read by itself.
      fast: 'auto' (default), True or False: step gymnasium's MuJoCo v5 suite (Swimmer,
        Hopper, HalfCheetah, Walker2d, Ant, InvertedPendulum, InvertedDoublePendulum) by the
        batched C fast path of :mod:`pes.envs.mujoco_suite` (the same steps, bit for bit; the
        reset noise drawn in JAX instead of by gymnasium's seeded generator) where it has the
        environment and its keyword arguments. True: an error where it has not.
      backend: 'mujoco' (default: MuJoCo in C, the fast path or gymnasium's own environment)
        or 'mjx': the suite's environments in pure JAX on ``mujoco.mjx``
        (:class:`pes.envs.mjx_suite.MJX`; the extra ``pes[mjx]``), so that ``init``, ``step``
        and a whole estimate jit with no host call, e.g. on a GPU. Only for the fast path's
        environments and keywords; float32 physics, close to the C path's but not equal
        (docs/mujoco_suite.md).
      survival_bonus_shift: train on reward - b, b the environment's survival bonus per step
        (its ``healthy_reward``: 1 on Hopper, Walker2d and Ant v5), as augmented random search
        does: ``step``'s loss is -(reward - b) on every step an episode is alive (0 while a
        member waits after its end). Only the training signal moves: :meth:`evaluate` and
        :func:`pes.envs.evaluate_return` report the true return, and :meth:`transition` the
        true reward. An EnvError for an environment without a survival bonus.
      obs_norm: augmented random search's observation normalisation: the policy acts on
        (obs - mean) / sqrt(var + 1e-8), mean and var the running statistics of every
        observation the particles acted on, kept in theta (``theta['obs_norm']``, a
        :class:`pes.system.Moments`; theta is ``{'obs_norm': ..., 'policy': the policy's
        theta}``, see :meth:`with_obs_norm`), frozen within an outer step and merged after it
        by ``pes.train``; ES never perturbs them (docs/ars.md). Needs the MuJoCo suite's fast
        path (its states hold the observation a step acts on).
      make_kwargs: passed to ``gymnasium.make`` (e.g. ``max_episode_steps=500``).

    Attributes: horizon, observation_shape, obs_dim, action (ActionSpec), state_size,
    reward_shift (b, 0.0 without survival_bonus_shift), obs_norm, running_stats (the
    running-statistics hook of :mod:`pes.system` with obs_norm, else None).
    """

    def __init__(self, env_id: str, policy: Callable | None = None, *, threads: int = 1,
                 eval_episodes: int = 10, state_io: tuple | None = None,
                 fast: bool | str = "auto", backend: str = "mujoco",
                 survival_bonus_shift: bool = False, obs_norm: bool = False,
                 **make_kwargs: Any):
        self.env_id, self.make_kwargs = env_id, dict(make_kwargs)
        self.policy = Linear() if policy is None else policy
        if not callable(self.policy):
            raise EnvError(f"policy={self.policy!r} is not callable; pass pes.envs.Linear(), "
                           "pes.envs.MLP() or a function (theta, obs) -> action")
        for name, value in (("threads", threads), ("eval_episodes", eval_episodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EnvError(f"{name}={value!r} must be an int >= 1")
        self.threads, self.eval_episodes = threads, eval_episodes
        env = make_env(env_id, self.make_kwargs)
        _check_wrappers(env, env_id)
        from gymnasium import spaces

        if not isinstance(env.observation_space, spaces.Box):
            raise EnvError(f"{env_id}: observation space {env.observation_space} is not "
                           "supported; pes.envs takes a Box observation space")
        self.observation_shape = tuple(env.observation_space.shape)
        self.obs_dim = int(math.prod(self.observation_shape))
        self.action = action_spec(env.action_space, env_id)
        limit = env.spec.max_episode_steps if env.spec is not None else None
        self.horizon = None if limit is None else int(limit)
        env.reset(seed=0)
        self._io = pick_state_io(env, env_id, state_io)
        self.state_size = self._io.size
        self._envs, self._unwrapped = [env], [env.unwrapped]
        self._cache = np.zeros((1, 2 * self.state_size), np.uint32)
        self._valid = np.zeros(1, bool)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        if backend not in BACKENDS:
            raise EnvError(f"backend={backend!r} is not known; valid backends: "
                           f"{', '.join(BACKENDS)}")
        self.backend = backend
        self._fast = self._make_fast(fast, state_io)
        if not isinstance(survival_bonus_shift, bool):
            raise EnvError(f"survival_bonus_shift={survival_bonus_shift!r} must be True or False")
        self.survival_bonus_shift = survival_bonus_shift
        self.reward_shift = survival_bonus(env, env_id) if survival_bonus_shift else 0.0
        self.obs_norm = self._check_obs_norm(obs_norm)
        self.running_stats = ObsNormStats(self) if obs_norm else None
        if hasattr(self.policy, "init"):
            self.check_policy(self.theta0())

    def _make_fast(self, fast: bool | str, state_io: tuple | None) -> Any:
        """The fast path's System where ``fast`` asks for it and it has the environment."""
        from pes.envs import mujoco_suite

        if fast not in (True, False, "auto"):
            raise EnvError(f"fast={fast!r} must be True, False or 'auto'")
        kwargs = {k: v for k, v in self.make_kwargs.items() if k != "max_episode_steps"}
        has = (mujoco_suite.has_fast_path(self.env_id, **kwargs) and state_io is None
               and self.action.kind == "box" and self.horizon is not None)
        if self.backend == "mjx":
            return self._make_mjx(fast, has, kwargs)
        if fast is True and not has:
            raise EnvError(f"{self.env_id} (with {sorted(kwargs) or 'no keywords'}) has no fast "
                           f"path; it has {', '.join(mujoco_suite.SPECS)} with their v5 "
                           "keywords (pass fast='auto' to use the generic path)")
        if fast is False or not has:
            return None
        return mujoco_suite.MuJoCo(self.env_id, policy=self.act, threads=self.threads,
                                   max_episode_steps=self.horizon, **kwargs)

    def _make_mjx(self, fast: bool | str, has: bool, kwargs: dict) -> Any:
        """The MJX System (backend='mjx'), or one EnvError saying why there is none."""
        from pes.envs import mujoco_suite

        if not has or fast is False:
            raise EnvError(f"backend='mjx' runs the fast path's environments in JAX: "
                           f"{', '.join(mujoco_suite.SPECS)} with their v5 keywords; "
                           f"{self.env_id} (with {sorted(kwargs) or 'no keywords'}"
                           f"{', fast=False' if fast is False else ''}) is not one")
        if self.threads != 1:
            raise EnvError(f"threads={self.threads} applies to backend='mujoco' only; "
                           "backend='mjx' runs its batch inside JAX")
        try:
            from pes.envs.mjx_suite import MJX

            return MJX(self.env_id, policy=self.act, max_episode_steps=self.horizon, **kwargs)
        except ImportError as e:
            raise EnvError(_one_line(e)) from None

    def _check_obs_norm(self, obs_norm: Any) -> bool:
        if not isinstance(obs_norm, bool):
            raise EnvError(f"obs_norm={obs_norm!r} must be True or False")
        if obs_norm and self._fast is None:
            from pes.envs import mujoco_suite

            raise EnvError(f"obs_norm needs the MuJoCo suite's fast path (its states hold the "
                           f"observation each step acts on): {', '.join(mujoco_suite.SPECS)} "
                           f"with their v5 keywords and fast='auto' or True; {self.env_id} "
                           "steps by the generic path")
        return obs_norm

    @property
    def fast(self) -> bool:
        """Whether this System steps through the MuJoCo suite's fast path (in C, or in
        JAX with backend='mjx')."""
        return self._fast is not None

    def __repr__(self) -> str:
        norm = ", obs_norm=True" if self.obs_norm else ""
        return f"Gymnasium({self.env_id!r}, policy={self.policy!r}{norm})"

    # ------------------------------------------------------------------------ the System

    def theta0(self, key: jax.Array | None = None) -> Any:
        """The built-in policy's initial theta (see its ``init``)."""
        if not hasattr(self.policy, "init"):
            raise EnvError("this policy is a plain function without init(); pass your own "
                           "theta (its parameters)")
        key = jax.random.PRNGKey(0) if key is None else key
        theta = self.policy.init(key, self.obs_dim, self.action)
        return self.with_obs_norm(theta) if self.obs_norm else theta

    def with_obs_norm(self, policy_theta: Any) -> dict:
        """With obs_norm: theta of a policy's parameters and statistics of no observations
        yet, ``{'obs_norm': Moments(0, zeros, zeros), 'policy': policy_theta}``."""
        stats = zero_moments(jax.ShapeDtypeStruct(self.observation_shape, jnp.float32))
        return {"obs_norm": stats, "policy": policy_theta}

    def split_theta(self, theta: Any) -> tuple[Any, Moments | None]:
        """(the policy's theta, the observation statistics or None) of a theta, flat or not."""
        if hasattr(self.policy, "init") and getattr(theta, "ndim", None) == 1:
            theta = self.unflatten(theta)
        if not self.obs_norm:
            return theta, None
        if not (isinstance(theta, dict) and set(theta) == {"obs_norm", "policy"}):
            raise PolicyError("with obs_norm=True theta is {'obs_norm': Moments, 'policy': "
                              "the policy's theta} (system.with_obs_norm(policy_theta) makes "
                              "one)")
        return theta["policy"], Moments(*theta["obs_norm"])

    def check_policy(self, theta: Any) -> None:
        """Trace the policy on theta: a PolicyError if its output does not fit the actions."""
        obs = jax.ShapeDtypeStruct(self.observation_shape, jnp.float32)
        jax.eval_shape(self.act, theta, obs)

    def act(self, theta: Any, obs: jax.Array) -> jax.Array:
        """The environment's action for obs under theta (policy output fitted to the space).
        A built-in policy also takes theta flat (see :meth:`flatten`). With obs_norm the
        policy sees the normalised observation (see the class docstring)."""
        theta, stats = self.split_theta(theta)
        if stats is not None:
            obs = normalize_obs(obs, *moments_norm(stats))
        return fit_action(self.policy(theta, obs), self.action, who=f"the policy {self.policy}")

    def flatten(self, theta: Any) -> jax.Array:
        """A built-in policy's theta as one float32 vector [D] (``ravel_pytree`` order: the
        leaves of :meth:`theta0` in sorted-key order), the form the command line trains."""
        return jax.flatten_util.ravel_pytree(theta)[0]

    def unflatten(self, flat: jax.Array) -> Any:
        """The inverse of :meth:`flatten`: [D] -> the policy's theta layout."""
        template = self.theta0()
        size = jax.flatten_util.ravel_pytree(template)[0].shape[0]
        if tuple(jnp.shape(flat)) != (size,):
            raise PolicyError(f"a flat theta of shape {tuple(jnp.shape(flat))} does not fit "
                              f"{self.policy}: it has {size} numbers")
        return jax.flatten_util.ravel_pytree(template)[1](flat)

    def init(self, key: jax.Array) -> GymState:
        """A fresh episode, reset on the host at the next step with seed = bits(key) (on the
        fast path: drawn in JAX from key, see :meth:`pes.envs.mujoco_suite.MuJoCo.init`)."""
        if self._fast is not None:
            return self._fast.init(key)
        return GymState(jnp.zeros((2 * self.state_size,), jnp.uint32),
                        jnp.zeros(self.observation_shape, jnp.float32),
                        jnp.asarray(FRESH, jnp.int32), jax.random.bits(key, (), jnp.uint32))

    def step(self, state: GymState, theta: Any, t: jax.Array, key: jax.Array):
        """One environment step under the policy -> (state, loss, done): loss = -reward, or
        -(reward - reward_shift) with survival_bonus_shift (0 for an ended state)."""
        new, loss, done = self.true_step(state, theta, t, key)
        if not self.reward_shift:
            return new, loss, done
        # The C fast path's state keeps its status word last; GymState and MJXState have one.
        ended = (state.physics[-1] == ENDED if hasattr(state, "physics")
                 else state.status == ENDED)
        return new, jnp.where(ended, loss, loss + jnp.float32(self.reward_shift)), done

    def true_step(self, state: GymState, theta: Any, t: jax.Array, key: jax.Array):
        """:meth:`step` with the true reward (loss = -reward) whatever the reward shift: what
        evaluations step (:func:`pes.envs.returns.episode_returns`)."""
        if self._fast is not None:
            return self._fast.step(state, theta, t, key)
        del t, key  # the environment is deterministic given its state; resets carry a seed
        state = self.start(state)
        return self._advance(state, self.act(theta, state.obs))

    def transition(self, state: GymState, action: jax.Array):
        """One environment step under a given action (fitted to the space: a Box's action is
        clipped into its bounds) -> (state, loss, done): :meth:`step` without the policy."""
        if self._fast is not None:
            return self._fast.transition(state, fit_action(action, self.action, "the action"))
        return self._advance(self.start(state), fit_action(action, self.action, "the action"))

    def start(self, state: GymState) -> GymState:
        """Reset fresh states on the host (seeded); others pass through. One host call for
        the whole batch, made only on steps where some state is fresh."""
        return batch_cond(state.status == FRESH, self._reset_batch, state)

    def _reset_batch(self, fresh: jax.Array, state: GymState) -> GymState:
        """fresh [*lead], state leaves [*lead, ...] -> the state with fresh rows reset."""
        n2, lead = 2 * self.state_size, fresh.shape
        out = host_call(self._reset_host,
                        jax.ShapeDtypeStruct(lead + (n2 + self.obs_dim,), jnp.uint32),
                        fresh, state.seed)
        obs = jax.lax.bitcast_convert_type(out[..., n2:], jnp.float32).reshape(
            lead + self.observation_shape)
        f = fresh[..., None]
        obs_f = fresh.reshape(lead + (1,) * len(self.observation_shape))
        return GymState(jnp.where(f, out[..., :n2], state.sim), jnp.where(obs_f, obs, state.obs),
                        jnp.where(fresh, RUNNING, state.status).astype(jnp.int32), state.seed)

    def _advance(self, state: GymState, action: jax.Array):
        n2 = 2 * self.state_size
        bits = jax.lax.bitcast_convert_type(action, jnp.uint32).reshape(-1)
        packed = jnp.concatenate([state.sim, bits, state.status.astype(jnp.uint32)[None]])
        out = batch_callback(self._step_host,
                             jax.ShapeDtypeStruct((n2 + self.obs_dim + 2,), jnp.uint32), packed)
        obs = jax.lax.bitcast_convert_type(out[n2:n2 + self.obs_dim], jnp.float32)
        reward = jax.lax.bitcast_convert_type(out[-2], jnp.float32)
        ended = state.status == ENDED
        done = ended | (out[-1] != 0)
        new = GymState(out[:n2], jnp.where(ended, state.obs, obs.reshape(self.observation_shape)),
                       jnp.where(done, ENDED, RUNNING).astype(jnp.int32), state.seed)
        return new, jnp.where(ended, 0.0, -reward), done

    def evaluate(self, theta: Any, key: jax.Array) -> dict[str, jax.Array]:
        """{'meta_loss': -mean return / horizon, 'return': mean return, 'return_std': its
        spread, 'return_min', 'return_max', 'episode_length': mean length, 'env_steps':
        steps taken} of ``eval_episodes`` fresh episodes (of at most ``horizon`` steps, see
        :func:`pes.envs.evaluate_return`). Jittable."""
        from pes.envs.returns import episode_returns

        if self.horizon is None:
            raise EnvError(f"{self.env_id} has no time limit; evaluate needs one (pass "
                           "max_episode_steps=...)")
        ret, length = episode_returns(self, theta, key, self.eval_episodes, self.horizon)
        return {"meta_loss": -jnp.mean(ret) / self.horizon, "return": jnp.mean(ret),
                "return_std": jnp.std(ret), "return_min": jnp.min(ret),
                "return_max": jnp.max(ret), "episode_length": jnp.mean(length),
                "env_steps": jnp.sum(length)}

    # ------------------------------------------------------------------- the host side

    def _grow(self, batch: int) -> None:
        while len(self._envs) < batch:
            env = make_env(self.env_id, self.make_kwargs)
            env.reset(seed=0)  # gymnasium wants a reset before anything else
            self._envs.append(env)
            self._unwrapped.append(env.unwrapped)
        if self._cache.shape[0] < batch:
            extra = batch - self._cache.shape[0]
            self._cache = np.concatenate([self._cache, np.zeros((extra,) + self._cache.shape[1:],
                                                                np.uint32)])
            self._valid = np.concatenate([self._valid, np.zeros(extra, bool)])

    def _reset_host(self, fresh: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """fresh [*lead] bool, seed [*lead] uint32 -> [*lead, 2 n + O] uint32: reset states'
        bits and observations (zeros in rows that are not fresh); row-major rows."""
        lead = fresh.shape
        fresh, seed = fresh.reshape(-1), seed.reshape(-1)
        batch = fresh.shape[0]
        states = np.zeros((batch, self.state_size))
        obs = np.zeros((batch, self.obs_dim), np.float32)
        with self._lock:
            self._grow(batch)
            rows = np.flatnonzero(fresh)
            for i in rows:
                u = self._unwrapped[i]
                o, _ = u.reset(seed=int(seed[i]))
                self._io.get(u, states[i])
                obs[i] = np.asarray(o, np.float32).ravel()
            bits = to_bits(states)
            self._cache[rows], self._valid[rows] = bits[rows], True
        return np.concatenate([bits, obs.view(np.uint32)], axis=1).reshape(lead + (-1,))

    def _step_host(self, packed: np.ndarray) -> np.ndarray:
        """[B, 2 n + A + 1] (state bits, action bits, status) -> [B, 2 n + O + 2] (new state
        bits, observation, reward as float32 bits, terminated). Ended rows pass through."""
        batch, n2 = packed.shape[0], 2 * self.state_size
        sim = packed[:, :n2]
        status = packed[:, -1]
        raw = np.ascontiguousarray(packed[:, n2:-1])
        if self.action.kind == "box":
            actions = raw.view(np.float32).reshape((batch,) + self.action.shape)
        else:
            actions = raw.view(np.int32)[:, 0] + self.action.start
        states = from_bits(sim).copy()
        obs = np.zeros((batch,) + self.observation_shape, np.float32)
        reward = np.zeros(batch, np.float32)
        term = np.zeros(batch, np.uint32)
        with self._lock:
            self._grow(batch)
            rows = np.flatnonzero(status == RUNNING)
            known = self._valid[:batch] & np.all(sim == self._cache[:batch], axis=1)
            envs, get, put = self._unwrapped, self._io.get, self._io.set

            def run(chunk):
                # The per-environment loop is most of a step's host time: keep it lean.
                for i in chunk:
                    u = envs[i]
                    if not known[i]:
                        put(u, states[i])
                    obs[i], reward[i], term[i], _, _ = u.step(actions[i])
                    get(u, states[i])

            if self._pool is None or len(rows) < 2:
                run(rows)
            else:
                list(self._pool.map(run, np.array_split(rows, self.threads)))
            bits = to_bits(states)
            self._cache[rows], self._valid[rows] = bits[rows], True
        return np.concatenate([bits, obs.reshape(batch, -1).view(np.uint32),
                               reward[:, None].view(np.uint32), term[:, None]], axis=1)

    def close(self) -> None:
        """Close the host environments (the System cannot step afterwards)."""
        with self._lock:
            for env in self._envs:
                env.close()
            self._envs, self._unwrapped = [], []
            self._valid = np.zeros_like(self._valid)
        if self._pool is not None:
            self._pool.shutdown()


class ObsNormStats:
    """Gymnasium's running-statistics hook (:mod:`pes.system`) for obs_norm: the observation a
    step acts on (``state.obs``, fast path) and the statistics in theta['obs_norm'] (theta
    flat or not)."""

    def __init__(self, system: Gymnasium):
        self._system = system

    def observe(self, state: Any) -> jax.Array:
        return state.obs

    def get(self, theta: Any) -> Moments:
        return self._system.split_theta(theta)[1]

    def put(self, theta: Any, stats: Moments) -> Any:
        flat = getattr(theta, "ndim", None) == 1
        policy, _ = self._system.split_theta(theta)
        tree = {"obs_norm": Moments(*stats), "policy": policy}
        return self._system.flatten(tree) if flat else tree


__all__ = ["Gymnasium", "GymState", "PolicyError", "make_env", "import_gymnasium"]
