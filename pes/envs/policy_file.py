"""A trained policy on disk: ``policy.npz``, and a NumPy callable that acts with it.

The file is a NumPy ``.npz`` archive (no pickles) holding

* ``format``: 'pes-policy/1';
* ``env_id``, ``make_kwargs`` (JSON): the environment it was trained on;
* ``kind``: 'linear', 'mlp' or 'custom'; ``hidden``: the MLP's hidden sizes (int array);
* ``obs_shape``; ``action_kind`` ('box' or 'discrete'), ``action_shape``, ``action_low``,
  ``action_high`` (float32, Box), ``action_n``, ``action_start`` (Discrete);
* ``theta/<path>``: theta's leaves (float32), path the keys from the root joined by '/'
  (Linear: ``theta/W`` [A, O], ``theta/b`` [A]; MLP: ``theta/layers/<i>/W``, ``.../b``);
* optionally ``obs_mean``, ``obs_var`` (float32 [*obs_shape]): an observation normalisation
  (augmented random search's), applied before the policy: it acts on
  (obs - obs_mean) / sqrt(obs_var + OBS_NORM_EPS).

``load_policy(path)`` rebuilds the policy and returns ``obs -> action`` that a plain gymnasium
loop can call: observation [*obs_shape] (or a batch [N, *obs_shape]) in, action out (a Box's
float32 array, clipped into its bounds; a Discrete action as an int).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pes.envs.errors import EnvError
from pes.envs.policies import (
    BUILTIN,
    MLP,
    OBS_NORM_EPS,  # noqa: F401 (re-exported: the file's normalisation constant)
    ActionSpec,
    Linear,
    fit_action,
    moments_norm,
    normalize_obs,
)

FORMAT = "pes-policy/1"


def _path(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _kind(policy: Any) -> str:
    if isinstance(policy, Linear):
        return "linear"
    if isinstance(policy, MLP):
        return "mlp"
    return "custom"


def _obs_norm_arrays(obs_norm: Any, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """{'obs_mean', 'obs_var'} of a (mean, var) pair of the observation's shape; {} for None."""
    if obs_norm is None:
        return {}
    try:
        mean, var = (np.asarray(x, np.float32) for x in obs_norm)
    except (TypeError, ValueError):
        raise EnvError("obs_norm must be a pair (mean, var) of arrays") from None
    if mean.shape != shape or var.shape != shape:
        raise EnvError(f"obs_norm's mean {mean.shape} and var {var.shape} must both have the "
                       f"observation's shape {shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
        raise EnvError("obs_norm's mean and var must be finite, var >= 0")
    return {"obs_mean": mean, "obs_var": var}


def save_policy(path: str | Path, system: Any, theta: Any, obs_norm: Any = None) -> Path:
    """Write ``policy.npz`` for a :class:`~pes.envs.Gymnasium` system's policy at theta.

    obs_norm: optional (mean, var), each [*observation_shape]: the policy was trained on
    (obs - mean) / sqrt(var + 1e-8), and :func:`load_policy`'s callable applies it. A system
    with ``obs_norm=True`` stores its theta's running statistics this way by itself (theta
    then holds them, flat or not; an explicit ``obs_norm`` takes precedence).
    Returns the path written. A custom policy function is saved as kind 'custom' (its
    leaves only); :func:`load_policy` then needs the function and a theta template back.
    """
    a: ActionSpec = system.action
    if getattr(system, "obs_norm", False):
        theta, stats = system.split_theta(theta)
        obs_norm = moments_norm(stats) if obs_norm is None else obs_norm
    elif hasattr(system.policy, "init") and getattr(theta, "ndim", None) == 1:
        theta = system.unflatten(theta)  # a flat theta (the command line's) -> its layout
    leaves = jax.tree_util.tree_flatten_with_path(theta)[0]
    arrays = {f"theta/{_path(p)}": np.asarray(x, np.float32) for p, x in leaves}
    if len(arrays) != len(leaves):
        raise EnvError("theta has two leaves with the same path; save_policy cannot store it")
    kind = _kind(system.policy)
    meta = {
        "format": np.array(FORMAT), "env_id": np.array(system.env_id),
        "make_kwargs": np.array(json.dumps(system.make_kwargs, sort_keys=True, default=str)),
        "kind": np.array(kind),
        "hidden": np.asarray(system.policy.hidden if kind == "mlp" else (), np.int64),
        "obs_shape": np.asarray(system.observation_shape, np.int64),
        "action_kind": np.array(a.kind), "action_shape": np.asarray(a.shape, np.int64),
        "action_low": np.asarray(a.low if a.low is not None else (), np.float32),
        "action_high": np.asarray(a.high if a.high is not None else (), np.float32),
        "action_n": np.asarray(a.n, np.int64), "action_start": np.asarray(a.start, np.int64),
        **_obs_norm_arrays(obs_norm, tuple(system.observation_shape)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to the name
        np.savez(f, **meta, **arrays)
    return path


class LoadedPolicy:
    """``obs -> action`` (NumPy) for a policy read by :func:`load_policy`.

    Attributes: env_id, make_kwargs, kind, policy (the JAX policy), theta, action (ActionSpec),
    observation_shape, obs_norm ((mean, var) applied to observations first, or None).
    """

    def __init__(self, env_id: str, make_kwargs: dict, kind: str, policy: Callable, theta: Any,
                 action: ActionSpec, observation_shape: tuple[int, ...],
                 obs_norm: tuple[np.ndarray, np.ndarray] | None = None):
        self.env_id, self.make_kwargs, self.kind = env_id, make_kwargs, kind
        self.policy, self.theta, self.action = policy, theta, action
        self.observation_shape, self.obs_norm = observation_shape, obs_norm
        # The statistics are arguments, not constants: the same compiled arithmetic as in
        # training (a folded constant may round differently).
        self._norm = None if obs_norm is None else tuple(jnp.asarray(x) for x in obs_norm)

        def act(theta, norm, obs):
            if norm is not None:
                obs = normalize_obs(obs, *norm)
            return fit_action(policy(theta, obs), action, who=f"the policy {policy}")

        self._one = jax.jit(act)
        self._many = jax.jit(jax.vmap(act, in_axes=(None, None, 0)))

    def __call__(self, obs: Any) -> Any:
        obs = np.asarray(obs, np.float32)
        shape = self.observation_shape
        if obs.shape == shape:
            out = np.asarray(self._one(self.theta, self._norm, obs))
        elif obs.shape[1:] == shape and obs.ndim == len(shape) + 1:
            out = np.asarray(self._many(self.theta, self._norm, obs))
        else:
            raise EnvError(f"observation of shape {obs.shape} does not fit this policy: it "
                           f"takes {shape} (or a batch [N, *{shape}])")
        if self.action.kind == "discrete":
            out = out.astype(np.int64) + self.action.start
            return int(out) if out.ndim == 0 else out
        return out

    def __repr__(self) -> str:
        return f"LoadedPolicy({self.env_id!r}, kind={self.kind!r})"


def _read(path: Path) -> dict:
    if not path.is_file():
        raise EnvError(f"policy file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise EnvError(f"policy file {str(path)!r} is not a readable .npz archive ({e})") from None
    if str(data.get("format", "")) != FORMAT:
        raise EnvError(f"policy file {str(path)!r} is not a pes policy (format "
                       f"{str(data.get('format', 'missing'))!r}, expected {FORMAT!r})")
    return data


def load_policy(path: str | Path, policy: Callable | None = None,
                like: Any = None) -> LoadedPolicy:
    """Read ``policy.npz`` (see the module docstring) -> a callable ``obs -> action``.

    For kind 'custom' pass the policy function and ``like``, a theta of the same structure
    (its leaves are replaced by the file's).
    """
    path = Path(path)
    d = _read(path)
    kind = str(d["kind"])
    a = ActionSpec(str(d["action_kind"]), tuple(int(x) for x in d["action_shape"]),
                   d["action_low"] if str(d["action_kind"]) == "box" else None,
                   d["action_high"] if str(d["action_kind"]) == "box" else None,
                   int(d["action_n"]), int(d["action_start"]))
    obs_shape = tuple(int(x) for x in d["obs_shape"])
    stored = {k[len("theta/"):]: v for k, v in d.items() if k.startswith("theta/")}
    if kind in BUILTIN:
        policy = Linear() if kind == "linear" else MLP(tuple(int(h) for h in d["hidden"]))
        like = policy.init(jax.random.PRNGKey(0), int(np.prod(obs_shape)), a)
    elif policy is None or like is None:
        raise EnvError(f"policy file {str(path)!r} holds a custom policy: pass policy= (the "
                       "function) and like= (a theta of its structure) to load_policy")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    values = []
    for p, leaf in leaves:
        name = _path(p)
        if name not in stored or stored[name].shape != tuple(jnp.shape(leaf)):
            got = stored[name].shape if name in stored else "missing"
            raise EnvError(f"policy file {str(path)!r}: theta/{name} is {got}, the policy "
                           f"needs shape {tuple(jnp.shape(leaf))}")
        values.append(jnp.asarray(stored[name]))
    theta = jax.tree_util.tree_unflatten(treedef, values)
    norm = None
    if "obs_mean" in d or "obs_var" in d:
        norm = _obs_norm_arrays((d.get("obs_mean"), d.get("obs_var")), obs_shape)
        norm = (norm["obs_mean"], norm["obs_var"])
    return LoadedPolicy(str(d["env_id"]), json.loads(str(d["make_kwargs"])), kind, policy,
                        theta, a, obs_shape, norm)
