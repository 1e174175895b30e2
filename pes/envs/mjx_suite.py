"""The MuJoCo v5 suite in pure JAX, on MuJoCo's JAX port ``mujoco.mjx``.

:class:`MJX` is the System of :class:`pes.envs.mujoco_suite.MuJoCo` with its host call
replaced by ``mjx.step``: the same gymnasium model file, ``frame_skip``, v5 keywords and the
same :class:`~pes.envs.mujoco_suite.EnvSpec`, whose observation, reward and termination are
written once against an array module (NumPy on the C path, ``jax.numpy`` here). Resets are
drawn by the same function from the same key (:func:`~pes.envs.mujoco_suite.reset_noise`), so
both paths start the same episode for the same key. Everything is JAX: ``init``, ``step`` and
a whole PES estimate jit, vmap and run on an accelerator with no host call.

What differs from the C path. The state is float32 (float64 under ``jax_enable_x64``): qpos,
qvel and the constraint solver's warm start (carried, as MuJoCo's ``MjData`` carries it), plus
the spec's carry, the observation and a status word. MJX's physics is MuJoCo's, but in float32
and with its own collision and solver code: where nothing touches, steps agree with the C path
to float32 rounding; contacts make them differ more (docs/mujoco_suite.md has the measured
figures, tests/test_mjx_suite.py checks them).

:class:`MJXSim` is the simulator itself (one environment per call; vmap it), shared with the
swimmer task's MJX backend (:class:`pes.tasks.swimmer.SwimmerMJXSim`).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pes.envs.mujoco_suite import (
    ENDED,
    MAX_EPISODE_STEPS,
    RUNNING,
    SPECS,
    Frame,
    check_noise_scale,
    load_model,
    reset_noise,
)


def import_mjx(who: str = "the MJX path"):
    """``mujoco.mjx``, or an ImportError saying how to install it (the extra ``pes[mjx]``)."""
    try:
        # mujoco.mjx prints a line for its optional Warp implementation when warp-lang is
        # missing; pes uses the pure-JAX implementation only, so the line is noise here.
        with contextlib.redirect_stdout(io.StringIO()):
            from mujoco import mjx
    except ImportError as e:
        raise ImportError(
            f"{who} needs MuJoCo's JAX port: pip install 'pes[mjx]' (or "
            f"'mujoco-mjx>=3.17') ({e})") from None
    return mjx


def _field(data: Any, name: str) -> Any:
    # MJX >= 3.3 keeps implementation-specific fields (cfrc_ext, ...) in data._impl.
    impl = getattr(data, "_impl", None)
    if impl is not None and hasattr(impl, name):
        return getattr(impl, name)
    return getattr(data, name)


class MJXSim:
    """``mujoco.mjx`` (its pure-JAX implementation) on one MjModel, one environment per call.

    ``simulate(qpos [nq], qvel [nv], warm [nv], ctrl [nu])`` takes ``frame_skip`` ``mjx.step``
    calls holding the clipped control; every other Data field starts from ``make_data``'s at
    each environment step (time 0, no applied forces), as the C path's state rows do.
    """

    def __init__(self, model: Any, frame_skip: int, fields: tuple[str, ...] = (),
                 post_constraint: bool = False, who: str = "the MJX path"):
        mjx = import_mjx(who)
        self._step, self._post = mjx.step, mjx.rne_postconstraint
        self.model = mjx.put_model(model, impl="jax")
        self.data = mjx.make_data(self.model, impl="jax")
        self.dtype = self.data.qpos.dtype
        self.frame_skip, self.fields, self.post_constraint = frame_skip, fields, post_constraint
        self.nq, self.nv, self.nu = model.nq, model.nv, model.nu
        self.qpos0 = np.asarray(model.qpos0)
        self.ctrl_low = np.asarray(model.actuator_ctrlrange[:, 0])
        self.ctrl_high = np.asarray(model.actuator_ctrlrange[:, 1])

    def clip(self, ctrl: jax.Array) -> jax.Array:
        """ctrl [nu] clipped to the actuators' range, as MuJoCo's ctrllimited does."""
        return jnp.clip(ctrl, jnp.asarray(self.ctrl_low, ctrl.dtype),
                        jnp.asarray(self.ctrl_high, ctrl.dtype))

    def simulate(self, qpos: jax.Array, qvel: jax.Array, warm: jax.Array, ctrl: jax.Array):
        """-> (qpos, qvel, warm start, {field: value} of ``fields`` after the step).

        The warm start is carried from step to step, as a MuJoCo MjData carries it: in float32
        the constraint solver stops once its improvements fall below rounding, and restarting
        it from zero every environment step biases the constraint forces (the swimmer held at
        its joint limits lost 2.9 of its 41 return over an episode; carried, 0.16).
        """
        # Pinned to true float32: on GPUs/TPUs JAX's default float32 dot products round their
        # inputs to TF32/bfloat16, 1e-3 relative, far more than float32 rounding.
        with jax.default_matmul_precision("float32"):
            data = self.data.replace(
                qpos=jnp.asarray(qpos, self.dtype), qvel=jnp.asarray(qvel, self.dtype),
                qacc_warmstart=jnp.asarray(warm, self.dtype),
                ctrl=jnp.asarray(self.clip(ctrl), self.dtype))
            data = jax.lax.fori_loop(0, self.frame_skip,
                                     lambda _, d: self._step(self.model, d), data)
            if self.post_constraint:
                data = self._post(self.model, data)
        return (data.qpos, data.qvel, data.qacc_warmstart,
                {f: _field(data, f) for f in self.fields})


class MJXState(NamedTuple):
    """One environment's state on the MJX path (float32; float64 under jax_enable_x64).

    qpos [nq], qvel [nv], qacc_warmstart [nv]: the physics; carry [ncarry]: the spec's values
    from the previous step (Ant's torso x, y); obs float32 [obs_dim]: the observation the policy
    acts on next; status int32: 0 running, 1 ended (stepping it is a no-op: loss 0, done).
    """

    qpos: jax.Array
    qvel: jax.Array
    qacc_warmstart: jax.Array
    carry: jax.Array
    obs: jax.Array
    status: jax.Array


class MJX:
    """A suite environment in pure JAX as a ``pes`` System: ``MJX("Hopper-v5", policy=...)``.

    policy: a JAX function ``(theta, obs float32 [obs_dim]) -> action [nu]``; the action is
      handed to the simulator clipped to the control range and the control cost is charged on
      it as given (as on the C path and in gymnasium).
    max_episode_steps: the time limit (``horizon``; gymnasium's 1000).
    step returns ``(state, loss, done)``: loss = -reward (float32), done = terminated.
    Other keyword arguments are the environment's v5 keywords (e.g. ``ctrl_cost_weight``), as
    :class:`pes.envs.mujoco_suite.MuJoCo` takes them.
    """

    def __init__(self, env_id: str, policy: Any, *,
                 max_episode_steps: int = MAX_EPISODE_STEPS, **kwargs: Any):
        if not callable(policy):
            raise TypeError(f"policy={policy!r} must be a function (theta, obs) -> action")
        if env_id not in SPECS:
            raise ValueError(f"{env_id!r} has no MJX path; the suite has {', '.join(SPECS)}")
        self.env_id, self.policy = env_id, policy
        model = load_model(env_id)
        self.spec = spec = SPECS[env_id](model, **kwargs)
        self.sim = MJXSim(model, spec.p["frame_skip"], spec.fields, spec.post_constraint,
                          who=f"{env_id}'s MJX path")
        self.horizon = int(max_episode_steps)
        self.dtype = self.sim.dtype
        self.action_dim, self.dt = model.nu, spec.dt
        self.action_low = self.sim.ctrl_low.astype(np.float32)
        self.action_high = self.sim.ctrl_high.astype(np.float32)
        self._scale = check_noise_scale(spec)
        self.obs_dim = int(jax.eval_shape(self.init, jax.random.PRNGKey(0)).obs.shape[0])

    def __repr__(self) -> str:
        return f"MJX({self.env_id!r}, policy={self.policy!r})"

    def init(self, key: jax.Array) -> MJXState:
        """A fresh episode: qpos = qpos0 + U(-s, s), qvel = U(-s, s) or s N(0, 1), drawn from
        ``key`` as :meth:`pes.envs.mujoco_suite.MuJoCo.init` draws it (the same start, in
        float32), no warm start; the first observation from it."""
        sim, spec = self.sim, self.spec
        noise_q, noise_v = reset_noise(key, spec, sim.nq, sim.nv, self._scale)
        # In float32 this is the C path's float64 qpos0 + noise rounded (qpos0 is float32-exact).
        qpos = (jnp.asarray(sim.qpos0, self.dtype) + noise_q.astype(self.dtype))[None]
        qvel = noise_v.astype(self.dtype)[None]
        obs = spec.observe(jnp, qpos, qvel, spec.reset_data(jnp, qpos, qvel))[0]
        carry = jnp.asarray(spec.reset_carry(qpos, qvel), self.dtype)[0]
        return MJXState(qpos[0], qvel[0], jnp.zeros((sim.nv,), self.dtype), carry,
                        obs.astype(jnp.float32), jnp.asarray(RUNNING, jnp.int32))

    def step(self, state: MJXState, theta: Any, t: jax.Array, key: jax.Array):
        """action = policy(theta, obs), then :meth:`transition` -> (state, -reward, done)."""
        del t, key  # deterministic given the state; resets are drawn in init
        return self.transition(state, self.policy(theta, state.obs))

    def transition(self, state: MJXState, action: Any):
        """One environment step holding ``action`` [nu] -> (state, loss, done): the spec's
        reward and termination on the frames before and after ``mjx.step``. An ended state
        stays as it is (loss 0, done)."""
        spec = self.spec
        action = jnp.asarray(action, jnp.float32).reshape(self.action_dim)
        qpos, qvel, warm, derived = self.sim.simulate(state.qpos, state.qvel,
                                                      state.qacc_warmstart, action)
        before = Frame(state.qpos[None], state.qvel[None], {}, state.carry[None])
        after = Frame(qpos[None], qvel[None], {f: v[None] for f, v in derived.items()},
                      state.carry[None])
        carry = jnp.asarray(spec.carry(after), self.dtype)
        after = after._replace(carry=carry)
        obs = spec.observe(jnp, after.qpos, after.qvel, after.data)[0].astype(jnp.float32)
        reward, terminated = spec.reward(jnp, before, after, action[None])
        ended = state.status == ENDED
        done = ended | terminated[0]
        new = MJXState(qpos, qvel, warm, carry[0], obs,
                       jnp.where(done, ENDED, RUNNING).astype(jnp.int32))
        new = jax.tree_util.tree_map(lambda old, x: jnp.where(ended, old, x), state, new)
        new = new._replace(status=jnp.where(done, ENDED, RUNNING).astype(jnp.int32))
        return new, jnp.where(ended, 0.0, -reward[0].astype(jnp.float32)), done
