"""``gym:ENV_ID`` on the command line: a gymnasium environment as a run's task.

``--backend mjx`` runs the MuJoCo suite's environments in pure JAX on ``mujoco.mjx``
(:class:`pes.envs.mjx_suite.MJX`; the default ``mujoco`` is MuJoCo in C).

The task is :class:`pes.envs.Gymnasium` with a built-in policy (``--policy linear`` or
``mlp``), trained as one flat theta vector (``Gymnasium.flatten``'s order); its evaluation is
the mean return of 10 fresh episodes (``return``, ``return_std``, ``env_steps``, and
``meta_loss = -return / horizon``), and a run leaves its final policy as ``policy.npz`` (read
it back with :func:`pes.envs.load_policy`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pes.runs.errors import ConfigError
from pes.tasks.base import OptimizerSpec, TaskDefaults

PREFIX = "gym:"
POLICIES = ("linear", "mlp")
POLICY_FILE = "policy.npz"


def is_gym_task(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


class GymTask:
    """A gymnasium environment with a built-in policy over a flat theta [D]."""

    def __init__(self, env_id: str, policy: str = "linear", survival_bonus_shift: bool = False,
                 backend: str = "mujoco", obs_norm: bool = False):
        from pes import envs

        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r} is not a known policy; valid policies: "
                              f"{', '.join(POLICIES)}", field="policy")
        try:
            self.system = envs.Gymnasium(
                env_id, policy=envs.Linear() if policy == "linear" else envs.MLP(),
                survival_bonus_shift=survival_bonus_shift, backend=backend, obs_norm=obs_norm)
        except envs.EnvError as e:
            if backend != "mujoco" and "mjx" in str(e):  # the backend, or mujoco-mjx missing
                raise ConfigError(f"task='{PREFIX}{env_id}' --backend {backend}: {e}",
                                  field="backend") from None
            field = ("survival_bonus_shift" if "survival bonus" in str(e)
                     else "obs_norm" if "obs_norm" in str(e) else "task")
            raise ConfigError(str(e), field=field) from None
        if self.system.horizon is None:
            raise ConfigError(f"task='{PREFIX}{env_id}' has no time limit "
                              "(max_episode_steps); pes needs episodes of bounded length",
                              field="task")
        self.env_id, self.policy, self.backend = env_id, policy, backend
        self.horizon = self.system.horizon
        # --obs-norm: the observation statistics' hook (pes.system.running_stats), theta flat.
        self.running_stats = self.system.running_stats

    def init(self, key: jax.Array) -> Any:
        return self.system.init(key)

    def step(self, state: Any, theta: jax.Array, t: jax.Array, key: jax.Array):
        return self.system.step(state, theta, t, key)

    def evaluate(self, theta: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        return self.system.evaluate(theta, key)

    def defaults(self) -> TaskDefaults:
        """Starting settings, not tuned per environment: 10 antithetic pairs, sigma 0.05,
        windows of K = 100, pairs staggered over the episode (so that windows keep finding
        live particles while others wait after an early end), Adam 0.1 (full ES: whole
        episodes).
        With them PES took InvertedPendulum-v5 (100-step episodes, a linear policy) from a
        return of 25.6 to 44.3 in 30 outer steps; dividing by the spread of the window
        losses with SGD 0.02 or 0.1 moved it to only 30."""
        theta0 = np.asarray(self.system.flatten(self.system.theta0()), float)
        es = {"num_particles": 20, "sigma": 0.05, "truncation_length": min(100, self.horizon),
              "stagger": True}
        return TaskDefaults(
            theta0=tuple(float(v) for v in theta0), theta_shape=(theta0.size,), num_steps=100,
            optimizer=OptimizerSpec("adam", 0.1),
            estimators={"pes": dict(es), "nres": dict(es), "tes": dict(es),
                        "full-es": {"num_particles": 20, "sigma": 0.05}})


@functools.cache
def make_gym_task(env_id: str, policy: str = "linear", survival_bonus_shift: bool = False,
                  backend: str = "mujoco", obs_norm: bool = False) -> GymTask:
    return GymTask(env_id, policy, survival_bonus_shift, backend, obs_norm)


def export_policy(task: GymTask, theta: Any, run_dir: Any) -> Path:
    """Write the run's final policy as ``policy.npz`` in its directory."""
    from pes.envs import save_policy

    return save_policy(Path(run_dir) / POLICY_FILE, task.system, jax.numpy.asarray(theta))


def outer_step_cap(estimator: str, settings: dict[str, Any], horizon: int,
                   env_steps: int) -> int:
    """Outer steps that surely spend ``env_steps`` environment steps: every member takes at
    least one step per episode slot (T steps: T / K windows, one estimate for full ES), however
    early its episodes end. The run stops sooner, once the budget is reached."""
    particles = int(settings.get("num_particles") or 1)
    members = particles + particles // 2 if estimator == "tes" else particles
    slots = -(-env_steps // members)
    if estimator == "full-es":
        return slots
    k = int(settings.get("truncation_length") or horizon)
    return slots * -(-horizon // k)
