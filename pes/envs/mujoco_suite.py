"""A batched C fast path for gymnasium's MuJoCo v5 locomotion suite.

Each environment is a small :class:`EnvSpec`: gymnasium's model file, ``frame_skip``, its v5
keyword defaults, and its observation, reward, termination and reset noise written once in
vectorised NumPy over a batch of environments (the observation is written against an array
module ``xp``, so the same function gives the first observation of an episode in JAX). A
:class:`SuiteSim` steps a whole batch per call in C and :class:`MuJoCo` wraps it as a
``pes`` System whose policy is a JAX function, one host callback per step for every particle.

Why it matches gymnasium bit for bit. gymnasium steps one ``MjData`` per environment with
``mj_step(nstep=frame_skip)``; between steps the data keeps, besides time, qpos and qvel, the
constraint solver's warm start (``qacc_warmstart``), and its observations and rewards read
fields "one substep behind" (``xpos``, ``site_xpos``, ``qfrc_constraint``: from the forward
pass of the last substep) and, for Ant, ``cfrc_ext`` from ``mj_rnePostConstraint`` after the
step. Here the carried state is MuJoCo's ``mjSTATE_FULLPHYSICS | mjSTATE_WARMSTART`` vector,
expanded on the host into ``mjSTATE_INTEGRATION`` rows (controls from the action, applied
forces zero) and stepped by ``mujoco.batch.Batch`` (MuJoCo >= 4: one C call for the batch,
bit-identical to an ``mj_step`` loop) or, where ``mj_rnePostConstraint`` is needed or
``mujoco.batch`` is missing, by a loop of ``mj_step`` over one ``MjData``. Rewards use the
action as given (MuJoCo clamps the control to ``ctrlrange``, gymnasium charges the control
cost on the unclamped action), as gymnasium does.

Resets. gymnasium draws ``qpos = qpos0 + U(-s, s)`` and ``qvel = U(-s, s)`` (or
``s * N(0, 1)``), then ``mj_forward``. :meth:`MuJoCo.init` draws the noise in JAX (float32) and
stores it with a "fresh" flag; the host adds ``qpos0`` in float64 at the next step, exactly as
gymnasium's ``init_qpos + noise``. The first observation is computed in JAX from the same
float32 numbers (equal to the host's float32 observation where the observation is a slice or
clip of qpos and qvel; IDP's sin/cos may differ in the last float32 bit).
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pes.envs.host import batch_callback, float32_to_bits64, from_bits, to_bits

# --------------------------------------------------------------------------- environments


class Frame(NamedTuple):
    """What gymnasium's reward code reads of a batch of MjData after a step (or a reset).

    qpos [B, nq], qvel [B, nv]: the state; data: derived MjData fields by name, [B, ...], as
    after ``mj_step`` (from the last substep's forward pass); carry [B, ncarry]: the spec's own
    values carried from the previous step (e.g. Ant's torso position before the step).
    """

    qpos: np.ndarray
    qvel: np.ndarray
    data: dict[str, np.ndarray]
    carry: np.ndarray


class EnvSpec:
    """One environment of the suite. Subclasses set the class attributes and write
    :meth:`observe` and :meth:`reward`; ``self.p`` holds the v5 keyword arguments (``params``
    updated with the user's)."""

    env_id: ClassVar[str]
    xml: ClassVar[str]                      # file in gymnasium/envs/mujoco/assets
    params: ClassVar[dict[str, Any]]        # the v5 keyword defaults this spec implements
    qvel_noise: ClassVar[str] = "uniform"   # 'uniform': U(-s, s); 'normal': s * N(0, 1)
    fields: ClassVar[tuple[str, ...]] = ()  # derived MjData fields observe/reward read
    post_constraint: ClassVar[bool] = False  # needs mj_rnePostConstraint (cfrc_ext)
    ncarry: ClassVar[int] = 0

    def __init__(self, model: Any, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            raise ValueError(f"{self.env_id}'s fast path does not implement "
                             f"{', '.join(unknown)} (it implements {', '.join(self.params)})")
        self.p = {**self.params, **kwargs}
        fs = self.p["frame_skip"]
        if isinstance(fs, bool) or not isinstance(fs, int) or fs < 1:
            raise ValueError(f"{self.env_id} frame_skip={fs!r} must be an int >= 1")
        self.dt = model.opt.timestep * fs  # gymnasium's MujocoEnv.dt, the same product
        self.nbody = model.nbody

    def observe(self, xp: Any, qpos: Any, qvel: Any, data: dict[str, Any]) -> Any:
        """[B, obs_dim] from qpos [B, nq], qvel [B, nv] and derived fields (xp: numpy or
        jax.numpy)."""
        raise NotImplementedError

    def reward(self, xp: Any, before: Frame, after: Frame, action: Any):
        """(reward [B], terminated bool [B]) of a step from ``before`` to ``after`` under
        ``action`` float32 [B, nu] (xp: numpy, float64 frames, as on the C path; or jax.numpy,
        float32 frames, as on the MJX path)."""
        raise NotImplementedError

    def carry(self, frame: Frame) -> np.ndarray:
        """[B, ncarry] values of this step's data the next step's reward reads."""
        return np.zeros((frame.qpos.shape[0], 0))

    def reset_data(self, xp: Any, qpos: Any, qvel: Any) -> dict[str, Any]:
        """The derived fields :meth:`observe` reads, right after a reset (``mj_resetData``,
        then ``mj_forward``)."""
        return {}

    def reset_carry(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """[B, ncarry] after a reset."""
        return np.zeros((qpos.shape[0], 0))

    def ctrl_cost(self, xp: Any, action: Any) -> Any:
        """w_ctrl * sum(a^2) in the action's dtype, as gymnasium's control_cost."""
        return self.p["ctrl_cost_weight"] * xp.sum(xp.square(action), axis=1)

    def forward(self, before: Frame, after: Frame) -> np.ndarray:
        """w_fwd * (x_after - x_before) / dt with x = qpos[0]."""
        return self.p["forward_reward_weight"] * ((after.qpos[:, 0] - before.qpos[:, 0])
                                                  / self.dt)


def _square(xp: Any, x: Any) -> Any:
    """x ** 2 as gymnasium computes it on a NumPy float64 scalar: C's pow(x, 2), which
    differs from x * x in the last bit for ~0.1% of inputs. NumPy's array ``power`` is no
    substitute: on CPUs with AVX-512 it dispatches to a SIMD pow that differs from C's for a
    few % of inputs, so the NumPy path applies C's pow element by element (x holds one number
    per particle). JAX (the MJX path, float32) squares as XLA does."""
    if xp is np:
        return _C_POW(x, 2.0).astype(x.dtype)
    return xp.power(x, xp.full_like(x, 2.0))


# C's pow as a NumPy ufunc over Python floats (object dtype), made once: _square runs every step.
_C_POW = np.frompyfunc(math.pow, 2, 1)


def _skip(p: dict, n: int) -> int:
    return n if p["exclude_current_positions_from_observation"] else 0


class Swimmer(EnvSpec):
    env_id, xml = "Swimmer-v5", "swimmer.xml"
    params = {"frame_skip": 4, "forward_reward_weight": 1.0, "ctrl_cost_weight": 1e-4,
              "reset_noise_scale": 0.1, "exclude_current_positions_from_observation": True}

    def observe(self, xp, qpos, qvel, data):
        return xp.concatenate([qpos[:, _skip(self.p, 2):], qvel], axis=1)

    def reward(self, xp, before, after, action):
        reward = self.forward(before, after) - self.ctrl_cost(xp, action)
        return reward, xp.zeros(reward.shape, bool)


class HalfCheetah(EnvSpec):
    env_id, xml, qvel_noise = "HalfCheetah-v5", "half_cheetah.xml", "normal"
    params = {"frame_skip": 5, "forward_reward_weight": 1.0, "ctrl_cost_weight": 0.1,
              "reset_noise_scale": 0.1, "exclude_current_positions_from_observation": True}

    def observe(self, xp, qpos, qvel, data):
        return xp.concatenate([qpos[:, _skip(self.p, 1):], qvel], axis=1)

    def reward(self, xp, before, after, action):
        reward = self.forward(before, after) - self.ctrl_cost(xp, action)
        return reward, xp.zeros(reward.shape, bool)


class Hopper(EnvSpec):
    env_id, xml = "Hopper-v5", "hopper.xml"
    params = {"frame_skip": 4, "forward_reward_weight": 1.0, "ctrl_cost_weight": 1e-3,
              "healthy_reward": 1.0, "terminate_when_unhealthy": True,
              "healthy_state_range": (-100.0, 100.0), "healthy_z_range": (0.7, float("inf")),
              "healthy_angle_range": (-0.2, 0.2), "reset_noise_scale": 5e-3,
              "exclude_current_positions_from_observation": True}

    def observe(self, xp, qpos, qvel, data):
        return xp.concatenate([qpos[:, _skip(self.p, 1):], xp.clip(qvel, -10, 10)], axis=1)

    def healthy(self, xp: Any, f: Frame) -> Any:
        state = xp.concatenate([f.qpos, f.qvel], axis=1)[:, 2:]
        lo, hi = self.p["healthy_state_range"]
        ok = xp.all((lo < state) & (state < hi), axis=1)
        lo, hi = self.p["healthy_z_range"]
        ok &= (lo < f.qpos[:, 1]) & (f.qpos[:, 1] < hi)
        lo, hi = self.p["healthy_angle_range"]
        return ok & (lo < f.qpos[:, 2]) & (f.qpos[:, 2] < hi)

    def reward(self, xp, before, after, action):
        healthy = self.healthy(xp, after)
        reward = (self.forward(before, after) + healthy * self.p["healthy_reward"]
                  - self.ctrl_cost(xp, action))
        return reward, ~healthy & bool(self.p["terminate_when_unhealthy"])


class Walker2d(Hopper):
    env_id, xml = "Walker2d-v5", "walker2d_v5.xml"
    params = {"frame_skip": 4, "forward_reward_weight": 1.0, "ctrl_cost_weight": 1e-3,
              "healthy_reward": 1.0, "terminate_when_unhealthy": True,
              "healthy_z_range": (0.8, 2.0), "healthy_angle_range": (-1.0, 1.0),
              "reset_noise_scale": 5e-3, "exclude_current_positions_from_observation": True}

    def healthy(self, xp: Any, f: Frame) -> Any:
        z, angle = f.qpos[:, 1], f.qpos[:, 2]
        (zlo, zhi), (alo, ahi) = self.p["healthy_z_range"], self.p["healthy_angle_range"]
        return (zlo < z) & (z < zhi) & (alo < angle) & (angle < ahi)


class Ant(EnvSpec):
    """Ant's x velocity is the torso's ``xpos`` (one substep behind), carried between steps;
    its contact cost and observation read ``cfrc_ext`` after ``mj_rnePostConstraint``."""

    env_id, xml, qvel_noise = "Ant-v5", "ant.xml", "normal"
    params = {"frame_skip": 5, "forward_reward_weight": 1.0, "ctrl_cost_weight": 0.5,
              "contact_cost_weight": 5e-4, "healthy_reward": 1.0,
              "terminate_when_unhealthy": True, "healthy_z_range": (0.2, 1.0),
              "contact_force_range": (-1.0, 1.0), "reset_noise_scale": 0.1,
              "exclude_current_positions_from_observation": True,
              "include_cfrc_ext_in_observation": True}
    fields = ("xpos", "cfrc_ext")
    post_constraint = True
    ncarry = 2
    main_body = 1  # the torso, whose free joint makes its xpos qpos[0:3]

    def observe(self, xp, qpos, qvel, data):
        parts = [qpos[:, _skip(self.p, 2):], qvel]
        if self.p["include_cfrc_ext_in_observation"]:
            lo, hi = self.p["contact_force_range"]
            force = xp.clip(data["cfrc_ext"], lo, hi)[:, 1:]
            parts.append(force.reshape(force.shape[0], -1))
        return xp.concatenate(parts, axis=1)

    def reward(self, xp, before, after, action):
        x_velocity = (after.carry[:, 0] - before.carry[:, 0]) / self.dt
        state = xp.concatenate([after.qpos, after.qvel], axis=1)
        lo, hi = self.p["healthy_z_range"]
        healthy = (xp.isfinite(state).all(axis=1) & (lo <= after.qpos[:, 2])
                   & (after.qpos[:, 2] <= hi))
        lo, hi = self.p["contact_force_range"]
        force = xp.clip(after.data["cfrc_ext"], lo, hi).reshape(len(action), -1)
        contact = self.p["contact_cost_weight"] * xp.sum(xp.square(force), axis=1)
        rewards = x_velocity * self.p["forward_reward_weight"] + healthy * self.p[
            "healthy_reward"]
        reward = rewards - (self.ctrl_cost(xp, action) + contact)
        return reward, ~healthy & bool(self.p["terminate_when_unhealthy"])

    def carry(self, frame):
        return frame.data["xpos"][:, self.main_body, :2]

    def reset_data(self, xp, qpos, qvel):
        return {"cfrc_ext": xp.zeros((qpos.shape[0], self.nbody, 6), qpos.dtype)}

    def reset_carry(self, qpos, qvel):
        return qpos[:, :2]


class InvertedPendulum(EnvSpec):
    env_id, xml = "InvertedPendulum-v5", "inverted_pendulum.xml"
    params = {"frame_skip": 2, "reset_noise_scale": 0.01}

    def observe(self, xp, qpos, qvel, data):
        return xp.concatenate([qpos, qvel], axis=1)

    def reward(self, xp, before, after, action):
        obs = self.observe(xp, after.qpos, after.qvel, after.data)
        terminated = ~xp.isfinite(obs).all(axis=1) | (xp.abs(obs[:, 1]) > 0.2)
        return xp.where(terminated, 0.0, 1.0).astype(obs.dtype), terminated


class InvertedDoublePendulum(EnvSpec):
    """The tip's position is ``site_xpos[0]`` and the observation's constraint force
    ``qfrc_constraint``, both one substep behind; after a reset no constraint is active."""

    env_id, xml, qvel_noise = "InvertedDoublePendulum-v5", "inverted_double_pendulum.xml", \
        "normal"
    params = {"frame_skip": 5, "healthy_reward": 10.0, "reset_noise_scale": 0.1}
    fields = ("site_xpos", "qfrc_constraint")

    def observe(self, xp, qpos, qvel, data):
        return xp.concatenate([qpos[:, :1], xp.sin(qpos[:, 1:]), xp.cos(qpos[:, 1:]),
                               xp.clip(qvel, -10, 10),
                               xp.clip(data["qfrc_constraint"], -10, 10)[:, :1]], axis=1)

    def reward(self, xp, before, after, action):
        x, y = after.data["site_xpos"][:, 0, 0], after.data["site_xpos"][:, 0, 2]
        terminated = y <= 1
        v1, v2 = after.qvel[:, 1], after.qvel[:, 2]
        dist_penalty = 0.01 * _square(xp, x) + _square(xp, y - 2)
        vel_penalty = 1e-3 * _square(xp, v1) + 5e-3 * _square(xp, v2)
        alive = self.p["healthy_reward"] * (~terminated)
        return alive - dist_penalty - vel_penalty, terminated

    def reset_data(self, xp, qpos, qvel):
        return {"qfrc_constraint": xp.zeros(qvel.shape, qvel.dtype)}


SPECS: dict[str, type[EnvSpec]] = {
    cls.env_id: cls for cls in (Swimmer, HalfCheetah, Hopper, Walker2d, Ant, InvertedPendulum,
                                InvertedDoublePendulum)}
# gymnasium registers every v5 environment with a 1000-step TimeLimit.
MAX_EPISODE_STEPS = 1000


def has_fast_path(env_id: str, **make_kwargs: Any) -> bool:
    """Whether ``env_id`` with these keyword arguments has a fast path here."""
    spec = SPECS.get(env_id)
    kwargs = {k: v for k, v in make_kwargs.items() if k != "max_episode_steps"}
    return spec is not None and set(kwargs) <= set(spec.params)


def asset_path(xml: str) -> str:
    """Path of a model file shipped with gymnasium (found without importing gymnasium)."""
    found = importlib.util.find_spec("gymnasium")
    if found is None or not found.submodule_search_locations:
        raise ImportError("the MuJoCo suite's fast path reads gymnasium's model files: "
                          "pip install 'gymnasium[mujoco]>=1.0'")
    path = os.path.join(found.submodule_search_locations[0], "envs", "mujoco", "assets", xml)
    if not os.path.exists(path):
        raise FileNotFoundError(f"gymnasium's model file {path} is missing")
    return path


def load_model(env_id: str, xml: str | None = None) -> Any:
    """The MjModel of suite environment ``env_id``: from ``xml``, a model as an XML string,
    if given (a task shipping its own file), else gymnasium's file for it."""
    import mujoco

    if env_id not in SPECS:
        raise ValueError(f"{env_id!r} has no fast path; the suite has {', '.join(SPECS)}")
    if xml is not None:
        return mujoco.MjModel.from_xml_string(xml)
    return mujoco.MjModel.from_xml_path(asset_path(SPECS[env_id].xml))


def reset_noise(key: jax.Array, spec: EnvSpec, nq: int, nv: int, scale: float):
    """float32 (qpos noise [nq], qvel noise [nv]) of a v5 reset from ``key``: ``U(-s, s)``
    and ``U(-s, s)`` or ``s N(0, 1)`` (the spec's ``qvel_noise``). The C and MJX paths both
    draw their resets here, so the same key starts the same episode on either."""
    kq, kv = jax.random.split(key)
    noise_q = jax.random.uniform(kq, (nq,), jnp.float32, -scale, scale)
    if spec.qvel_noise == "normal":
        return noise_q, scale * jax.random.normal(kv, (nv,), jnp.float32)
    return noise_q, jax.random.uniform(kv, (nv,), jnp.float32, -scale, scale)


def check_noise_scale(spec: EnvSpec) -> float:
    """The spec's ``reset_noise_scale`` as a float, or a ValueError."""
    scale = float(spec.p["reset_noise_scale"])
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"reset_noise_scale={scale!r} must be a finite number >= 0")
    return scale


# --------------------------------------------------------------------------- the simulator

INTEGRATION_BITS = 20  # mjtState's component bits are below 2^20


def _layout(mujoco: Any, model: Any, spec: int, sub: int) -> np.ndarray:
    """Indices, in an mjState vector of ``spec``, of its components that are in ``sub``
    (components are laid out in the order of their bits)."""
    idx, offset = [], 0
    for k in range(INTEGRATION_BITS):
        bit = 1 << k
        if not bit & spec:
            continue
        n = mujoco.mj_stateSize(model, bit)
        if bit & sub:
            idx.extend(range(offset, offset + n))
        offset += n
    return np.asarray(idx, np.int64)


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """A contiguous index array as a slice (cheaper to read and write), else the array."""
    if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


class _BatchEngine:
    """``mujoco.batch.Batch``: the batch's INTEGRATION rows stepped in one C call. Each batch
    size gets its own Batch, whose rows keep the template's other components (applied forces
    zero, ...), which ``mj_step`` never changes."""

    def __init__(self, model, frame_skip, fields, threads, template, phys, ctrl):
        from mujoco import batch

        self._batch_cls, self.model, self.frame_skip = batch.Batch, model, frame_skip
        self.fields, self.threads = fields, threads
        self.template, self.phys, self.ctrl = template, phys, ctrl
        self._cache: dict[int, Any] = {}

    def step(self, phys: np.ndarray, ctrl: np.ndarray):
        """phys [B, nphys], ctrl [B, nu] -> (phys after frame_skip steps, derived fields)."""
        n = phys.shape[0]
        b = self._cache.get(n)
        if b is None:
            b = self._cache[n] = self._batch_cls(self.model, n, nthread=self.threads)
            b.state[:] = self.template
            for f in self.fields:
                b.bind(f)
        b.state[:, self.phys] = phys
        b.state[:, self.ctrl] = ctrl
        b.step(nstep=self.frame_skip)
        return b.state[:, self.phys].copy(), {f: b.bind(f).copy() for f in self.fields}


class _LoopEngine:
    """``mj_step`` (then ``mj_rnePostConstraint`` if asked) on one MjData, env by env."""

    def __init__(self, mujoco, model, frame_skip, fields, post_constraint, template, phys,
                 ctrl):
        self.mj, self.model, self.frame_skip = mujoco, model, frame_skip
        self.fields, self.post = fields, post_constraint
        self.template, self.phys, self.ctrl = template, phys, ctrl
        self.data = mujoco.MjData(model)
        self.spec = int(mujoco.mjtState.mjSTATE_INTEGRATION)

    def step(self, phys: np.ndarray, ctrl: np.ndarray):
        mj, m, d = self.mj, self.model, self.data
        rows = np.repeat(self.template[None], len(phys), axis=0)
        rows[:, self.phys], rows[:, self.ctrl] = phys, ctrl
        derived = {f: np.empty((len(rows),) + getattr(d, f).shape) for f in self.fields}
        for i in range(len(rows)):
            mj.mj_setState(m, d, rows[i], self.spec)
            mj.mj_step(m, d, nstep=self.frame_skip)
            if self.post:
                mj.mj_rnePostConstraint(m, d)
            mj.mj_getState(m, d, rows[i], self.spec)
            for f in self.fields:
                derived[f][i] = getattr(d, f)
        return rows[:, self.phys], derived


class SuiteSim:
    """A batch of one suite environment on the host, float64 throughout.

    A host state is ``(phys [B, nphys], carry [B, ncarry])``: ``phys`` the
    ``mjSTATE_FULLPHYSICS | mjSTATE_WARMSTART`` vector (time, qpos, qvel, act, ..., warm
    start), ``carry`` the spec's values from the previous step. ``engine``: 'auto' (batch
    where it applies), 'batch' or 'loop'. ``xml``: the model as an XML string (default:
    gymnasium's file for ``env_id``). Not re-entrant: calls are serialised by a lock.
    """

    def __init__(self, env_id: str, threads: int = 1, engine: str = "auto", *,
                 xml: str | None = None, **kwargs: Any):
        import mujoco

        self.mj = mujoco
        self.model = load_model(env_id, xml)
        self.spec = spec = SPECS[env_id](self.model, **kwargs)
        m = self.model
        self.frame_skip, self.nq, self.nv, self.nu = spec.p["frame_skip"], m.nq, m.nv, m.nu
        integ = int(mujoco.mjtState.mjSTATE_INTEGRATION)
        carried = int(mujoco.mjtState.mjSTATE_FULLPHYSICS) | int(
            mujoco.mjtState.mjSTATE_WARMSTART)
        self.phys_idx = _as_slice(_layout(mujoco, m, integ, carried))
        self.ctrl_idx = _as_slice(_layout(mujoco, m, integ, int(mujoco.mjtState.mjSTATE_CTRL)))
        qpos = _layout(mujoco, m, carried, int(mujoco.mjtState.mjSTATE_QPOS))
        qvel = _layout(mujoco, m, carried, int(mujoco.mjtState.mjSTATE_QVEL))
        warm = _layout(mujoco, m, carried, int(mujoco.mjtState.mjSTATE_WARMSTART))
        self.qpos, self.qvel = slice(qpos[0], qpos[-1] + 1), slice(qvel[0], qvel[-1] + 1)
        self.warmstart = slice(warm[0], warm[-1] + 1)
        self.time = int(_layout(mujoco, m, carried, int(mujoco.mjtState.mjSTATE_TIME))[0])
        self.nphys = mujoco.mj_stateSize(m, carried)
        data = mujoco.MjData(m)
        mujoco.mj_resetData(m, data)
        self.template = np.empty(mujoco.mj_stateSize(m, integ))
        mujoco.mj_getState(m, data, self.template, integ)  # mj_resetData's state
        self.qpos0, self.qvel0 = data.qpos.copy(), data.qvel.copy()
        self.ctrl_low = m.actuator_ctrlrange[:, 0].astype(np.float32)
        self.ctrl_high = m.actuator_ctrlrange[:, 1].astype(np.float32)
        self.obs_dim = self.observe_reset(self.reset(self.qpos0[None], self.qvel0[None])).shape[1]
        if engine not in ("auto", "batch", "loop"):
            raise ValueError(f"engine={engine!r} is not one of auto, batch, loop")
        has_batch = importlib.util.find_spec("mujoco.batch") is not None
        if engine == "batch" and (spec.post_constraint or not has_batch):
            raise ValueError(f"{env_id} cannot run on mujoco.batch (needs "
                             f"{'mj_rnePostConstraint' if has_batch else 'mujoco >= 4'})")
        layout = (self.template, self.phys_idx, self.ctrl_idx)
        if engine == "batch" or (engine == "auto" and has_batch and not spec.post_constraint):
            self.engine = _BatchEngine(m, self.frame_skip, spec.fields, threads, *layout)
        else:
            self.engine = _LoopEngine(mujoco, m, self.frame_skip, spec.fields,
                                      spec.post_constraint, *layout)
        self._lock = threading.Lock()

    # -- host states

    def reset(self, qpos: np.ndarray, qvel: np.ndarray):
        """A reset to qpos [B, nq], qvel [B, nv] (gymnasium's ``set_state`` after
        ``mj_resetData``: time 0, no warm start). Returns the host state (phys, carry)."""
        qpos, qvel = np.asarray(qpos, np.float64), np.asarray(qvel, np.float64)
        phys = np.repeat(self.template[self.phys_idx][None], len(qpos), axis=0)
        phys[:, self.qpos], phys[:, self.qvel] = qpos, qvel
        return phys, self.spec.reset_carry(qpos, qvel)

    def reset_from_noise(self, phys: np.ndarray) -> None:
        """In place: rows whose qpos/qvel hold reset noise become ``qpos0 + noise``,
        ``qvel0 + noise`` (gymnasium's ``init_qpos + noise``)."""
        phys[:, self.qpos] = self.qpos0 + phys[:, self.qpos]
        phys[:, self.qvel] = self.qvel0 + phys[:, self.qvel]

    def observe_reset(self, state) -> np.ndarray:
        """float64 [B, obs_dim]: the observation right after a reset."""
        phys = state[0]
        qpos, qvel = phys[:, self.qpos], phys[:, self.qvel]
        return self.spec.observe(np, qpos, qvel, self.spec.reset_data(np, qpos, qvel))

    def advance(self, phys: np.ndarray, ctrl: np.ndarray):
        """The physics alone: phys [B, nphys] after ``frame_skip`` simulator steps holding the
        control ctrl [B, nu] (float32), and the derived fields the spec reads."""
        with self._lock:
            return self.engine.step(phys, ctrl)

    def step(self, state, action: np.ndarray):
        """One environment step of the batch holding ``action`` float32 [B, nu].

        Returns (new host state, obs float64 [B, obs_dim], reward float64 [B],
        terminated bool [B])."""
        phys, carry = state
        action = np.asarray(action, np.float32)
        new, derived = self.advance(phys, action)
        before = Frame(phys[:, self.qpos], phys[:, self.qvel], {}, carry)
        after = Frame(new[:, self.qpos], new[:, self.qvel], derived, carry)
        after = after._replace(carry=self.spec.carry(after))
        obs = self.spec.observe(np, after.qpos, after.qvel, derived)
        reward, terminated = self.spec.reward(np, before, after, action)
        return (new, after.carry), obs, reward, terminated


# --------------------------------------------------------------------------- the System


RUNNING, ENDED, FRESH = 0, 1, 2


class MuJoCoState(NamedTuple):
    """physics: uint32 [2 (nphys + ncarry) + 1], the float64 host state bit for bit, then a
    status word: 0 running, 1 ended (the episode terminated: stepping it is a no-op with loss
    0 and done), 2 fresh (qpos/qvel hold reset noise; the host adds qpos0 before stepping).
    obs: float32 [obs_dim], the observation the policy acts on next."""

    physics: jax.Array
    obs: jax.Array


class MuJoCo:
    """A suite environment as a ``pes`` System: ``MuJoCo("Hopper-v5", policy=...)``.

    policy: a JAX function ``(theta, obs float32 [obs_dim]) -> action [nu]``; the action is
      handed to MuJoCo as given (as gymnasium does: MuJoCo clamps the control, the control
      cost is charged on the action; clip it in the policy to stay in bounds).
    horizon: the time limit (gymnasium's 1000, or ``max_episode_steps``).
    step returns ``(state, loss, done)``: loss = -reward (float32), done = terminated.
    threads: MuJoCo threads per batched call (``mujoco.batch`` engine only).
    Other keyword arguments are the environment's v5 keywords (e.g. ``ctrl_cost_weight``).
    """

    def __init__(self, env_id: str, policy: Any, *, threads: int = 1, engine: str = "auto",
                 max_episode_steps: int = MAX_EPISODE_STEPS, **kwargs: Any):
        if not callable(policy):
            raise TypeError(f"policy={policy!r} must be a function (theta, obs) -> action")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be an int >= 1")
        self.env_id, self.policy = env_id, policy
        self.sim = SuiteSim(env_id, threads=threads, engine=engine, **kwargs)
        self.horizon = int(max_episode_steps)
        sim, spec = self.sim, self.sim.spec
        self.obs_dim, self.action_dim = sim.obs_dim, sim.nu
        self.action_low, self.action_high = sim.ctrl_low, sim.ctrl_high
        self._nwords = 2 * (sim.nphys + spec.ncarry) + 1
        template = np.concatenate([sim.template[sim.phys_idx], np.zeros(spec.ncarry)])
        self._template = to_bits(template)
        q0 = sim.qpos0.astype(np.float32)
        if not np.array_equal(q0, sim.qpos0):
            raise RuntimeError(f"{env_id}'s qpos0 is not float32-exact; init assumes it")
        self._qpos0 = q0
        self._scale = check_noise_scale(spec)

    def __repr__(self) -> str:
        return f"MuJoCo({self.env_id!r}, policy={self.policy!r})"

    def init(self, key: jax.Array) -> MuJoCoState:
        """A fresh episode: qpos = qpos0 + U(-s, s), qvel = U(-s, s) or s N(0, 1) (the
        environment's v5 reset), drawn in float32; the first observation from them in JAX."""
        sim, spec = self.sim, self.sim.spec
        nq, nv = reset_noise(key, spec, sim.nq, sim.nv, self._scale)
        words = jnp.asarray(self._template)
        words = words.at[2 * sim.qpos.start:2 * sim.qpos.stop].set(float32_to_bits64(nq))
        words = words.at[2 * sim.qvel.start:2 * sim.qvel.stop].set(float32_to_bits64(nv))
        words = jnp.concatenate([words, jnp.full((1,), FRESH, jnp.uint32)])
        qpos, qvel = (jnp.asarray(self._qpos0) + nq)[None], nv[None]
        obs = spec.observe(jnp, qpos, qvel, spec.reset_data(jnp, qpos, qvel))[0]
        return MuJoCoState(words, obs.astype(jnp.float32))

    def step(self, state: MuJoCoState, theta: Any, t: jax.Array, key: jax.Array):
        """action = policy(theta, obs), then :meth:`transition`: one host call steps every
        particle of the batch. Returns (state, -reward, terminated)."""
        del t, key  # deterministic given the state; resets are drawn in init
        return self.transition(state, self.policy(theta, state.obs))

    def transition(self, state: MuJoCoState, action: Any):
        """One environment step holding ``action`` [nu] (float32) -> (state, loss, done).
        An ended state stays as it is (loss 0, done)."""
        action = jnp.asarray(action, jnp.float32).reshape(self.action_dim)
        packed = jnp.concatenate([state.physics,
                                  jax.lax.bitcast_convert_type(action, jnp.uint32)])
        n, od = self._nwords, self.obs_dim
        out = batch_callback(self._host_step,
                             jax.ShapeDtypeStruct((n + od + 2,), jnp.uint32), packed)
        obs = jax.lax.bitcast_convert_type(out[n:n + od], jnp.float32)
        reward = jax.lax.bitcast_convert_type(out[n + od], jnp.float32)
        ended = state.physics[n - 1] == ENDED
        done = ended | (out[n + od + 1] != 0)
        physics = jnp.where(ended, state.physics, out[:n])
        physics = physics.at[n - 1].set(jnp.where(done, ENDED, RUNNING).astype(jnp.uint32))
        return (MuJoCoState(physics, jnp.where(ended, state.obs, obs)),
                jnp.where(ended, 0.0, -reward), done)

    def _host_step(self, packed: np.ndarray) -> np.ndarray:
        """uint32 [..., W] (state bits, status, action bits) -> [..., n + obs_dim + 2] (new
        state bits, status, observation, reward and terminated). Ended rows are not
        simulated (their outputs are zeros; :meth:`transition` keeps their state)."""
        # One buffer in, one out: each extra argument or result costs host-call overhead.
        packed = np.asarray(packed)
        lead, n, od = packed.shape[:-1], self._nwords, self.obs_dim
        packed = packed.reshape(-1, packed.shape[-1])
        sim = self.sim
        status = packed[:, n - 1]
        out = np.zeros((len(packed), n + od + 2), np.uint32)
        running = status != ENDED
        rows = slice(None) if running.all() else np.flatnonzero(running)
        if not running.any():
            return out.reshape(lead + (-1,))
        phys_carry = from_bits(packed[rows, :n - 1])
        if not phys_carry.flags.writeable:  # one contiguous row: a view of the read-only input
            phys_carry = phys_carry.copy()
        phys, carry = phys_carry[:, :sim.nphys], phys_carry[:, sim.nphys:]
        fresh = status[rows] == FRESH
        if fresh.any():
            reset = phys[fresh]
            sim.reset_from_noise(reset)
            phys[fresh] = reset
            carry[fresh] = sim.spec.reset_carry(reset[:, sim.qpos], reset[:, sim.qvel])
        action = np.ascontiguousarray(packed[rows, n:]).view(np.float32)
        (new, new_carry), obs, reward, terminated = sim.step((phys, carry), action)
        # rows: a slice while every particle runs (the usual case): no fancy indexing.
        out[rows, :2 * sim.nphys] = to_bits(new)
        out[rows, 2 * sim.nphys:n - 1] = to_bits(new_carry)
        out[rows, n:n + od] = obs.astype(np.float32).view(np.uint32)
        out[rows, n + od] = reward.astype(np.float32).view(np.uint32)
        out[rows, n + od + 1] = terminated
        return out.reshape(lead + (-1,))
