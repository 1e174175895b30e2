"""Policies for environment Systems: JAX functions ``(theta, obs) -> action``.

An action space is described by :class:`ActionSpec` (a Box of shape S with bounds, or
Discrete(n)). A policy's raw output is fitted to the space by :func:`fit_action`:

* Box: an array of S's size (any shape with that many elements), float; it is clipped into
  ``[low, high]`` (infinite bounds leave it free);
* Discrete(n): n float logits, the action is their argmax; or an integer scalar in [0, n).

Built in: :class:`Linear` and :class:`MLP`. Any function ``f(theta, obs)`` works as a policy
(theta any pytree of float arrays); :func:`from_equinox` and :func:`from_nnx` turn an Equinox or
Flax NNX model into such a function and its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pes.envs.errors import EnvError


class PolicyError(EnvError):
    """A policy that does not fit the environment (output shape, theta layout)."""


@dataclass(frozen=True)
class ActionSpec:
    """An environment's action space as the policies see it.

    kind: 'box' or 'discrete'.  shape: the Box's shape (() for discrete).
    low, high: float32 bounds of the Box's shape (None for discrete).  n: Discrete's size.
    start: Discrete's first action (gymnasium's ``start``, usually 0).
    """

    kind: str
    shape: tuple[int, ...] = ()
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    n: int = 0
    start: int = 0

    @property
    def size(self) -> int:
        """Outputs a built-in policy produces: prod(shape) for a Box, n for Discrete."""
        return int(math.prod(self.shape)) if self.kind == "box" else self.n

    def describe(self) -> str:
        if self.kind == "box":
            return f"Box of shape {self.shape}"
        return f"Discrete({self.n})"

    def dtype(self):
        """JAX dtype of a fitted action: float32 for Box, int32 for Discrete."""
        return jnp.float32 if self.kind == "box" else jnp.int32


def fit_action(raw: Any, space: ActionSpec, who: str = "the policy") -> jax.Array:
    """A policy's raw output -> the environment's action (Box: float32 of space.shape,
    clipped; Discrete: int32 scalar in [0, n)). Raises PolicyError naming the mismatch."""
    raw = jnp.asarray(raw)
    shape = tuple(raw.shape)
    if space.kind == "box":
        if jnp.issubdtype(raw.dtype, jnp.floating) and raw.size == space.size:
            a = raw.astype(jnp.float32).reshape(space.shape)
            return jnp.clip(a, jnp.asarray(space.low), jnp.asarray(space.high))
        raise PolicyError(
            f"{who} returned an array of shape {shape} and dtype {raw.dtype}, which does not "
            f"fit the action space {space.describe()}: it needs {space.size} float numbers")
    if jnp.issubdtype(raw.dtype, jnp.floating) and shape in ((space.n,), (1, space.n)):
        return jnp.argmax(raw.reshape(space.n)).astype(jnp.int32)
    if jnp.issubdtype(raw.dtype, jnp.integer) and raw.size == 1:
        return jnp.clip(raw.reshape(()), 0, space.n - 1).astype(jnp.int32)
    raise PolicyError(
        f"{who} returned an array of shape {shape} and dtype {raw.dtype}, which does not fit "
        f"the action space {space.describe()}: it needs {space.n} float logits (shape "
        f"({space.n},)) or one integer action")


def _get(theta: Any, path: str, policy: str) -> jax.Array:
    """theta's leaf at 'a/0/b' or a PolicyError naming the missing entry."""
    leaf = theta
    for part in path.split("/"):
        try:
            leaf = leaf[int(part)] if part.isdigit() else leaf[part]
        except (KeyError, IndexError, TypeError):
            raise PolicyError(f"theta has no entry {path!r}; {policy} expects theta laid out "
                              "as its init() returns it") from None
    return leaf


def _affine(theta: Any, prefix: str, x: jax.Array, policy: str) -> jax.Array:
    """W x + b for theta[prefix + 'W'] [n, len(x)], theta[prefix + 'b'] [n]."""
    W, b = _get(theta, prefix + "W", policy), _get(theta, prefix + "b", policy)
    ws, bs = tuple(jnp.shape(W)), tuple(jnp.shape(b))
    if len(ws) != 2 or ws[1] != x.shape[0] or bs != ws[:1]:
        raise PolicyError(f"{policy}: theta[{prefix + 'W'!r}] of shape {ws} and "
                          f"theta[{prefix + 'b'!r}] of shape {bs} do not fit an input of size "
                          f"{x.shape[0]}: they need shapes (n, {x.shape[0]}) and (n,)")
    return W @ x + b


@dataclass(frozen=True)
class Linear:
    """a = W obs + b, fitted to the action space (clipped into a Box's bounds; argmax of the
    logits for Discrete).

    theta: {'W': float32 [A, O], 'b': float32 [A]}; O: the observation's size (flattened), A:
    ``ActionSpec.size`` (a Box's size, or n logits). :meth:`init` gives zeros, the usual start
    of random-search and ES methods for linear policies.
    """

    kind = "linear"

    def init(self, key: jax.Array, obs_dim: int, action: ActionSpec) -> dict:
        del key
        return {"W": jnp.zeros((action.size, obs_dim), jnp.float32),
                "b": jnp.zeros((action.size,), jnp.float32)}

    def sizes(self) -> dict:
        return {}

    def __call__(self, theta: Any, obs: jax.Array) -> jax.Array:
        return _affine(theta, "", jnp.ravel(obs).astype(jnp.float32), "Linear()")


@dataclass(frozen=True)
class MLP:
    """A tanh multilayer perceptron: h_0 = obs, h_{i+1} = tanh(W_i h_i + b_i), output
    W_L h_L + b_L, fitted to the action space like :class:`Linear`.

    theta: {'layers': [{'W': [h_1, O], 'b': [h_1]}, ..., {'W': [A, h_L], 'b': [A]}]}, float32.
    :meth:`init`: hidden weights N(0, 1/fan_in), biases and the output layer zero (the policy
    starts at action 0, as :class:`Linear` does).
    """

    hidden: tuple[int, ...] = (32, 32)
    kind = "mlp"

    def __post_init__(self) -> None:
        hidden = tuple(self.hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int | np.integer) or h < 1
                             for h in hidden):
            raise EnvError(f"MLP hidden={self.hidden!r} must be a non-empty tuple of ints >= 1")
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))

    def sizes(self) -> dict:
        return {"hidden": list(self.hidden)}

    def init(self, key: jax.Array, obs_dim: int, action: ActionSpec) -> dict:
        dims = (obs_dim,) + self.hidden
        keys = jax.random.split(key, len(self.hidden))
        layers = [{"W": jax.random.normal(k, (d_out, d_in), jnp.float32) / math.sqrt(d_in),
                   "b": jnp.zeros((d_out,), jnp.float32)}
                  for k, d_in, d_out in zip(keys, dims[:-1], dims[1:], strict=True)]
        layers.append({"W": jnp.zeros((action.size, dims[-1]), jnp.float32),
                       "b": jnp.zeros((action.size,), jnp.float32)})
        return {"layers": layers}

    def __call__(self, theta: Any, obs: jax.Array) -> jax.Array:
        name = f"MLP(hidden={self.hidden})"
        layers = _get(theta, "layers", name)
        if not isinstance(layers, list | tuple) or len(layers) != len(self.hidden) + 1:
            raise PolicyError(f"theta['layers'] must be a list of {len(self.hidden) + 1} layers "
                              f"for {name}")
        h = jnp.ravel(obs).astype(jnp.float32)
        for i in range(len(layers)):
            h = _affine(theta, f"layers/{i}/", h, name)
            if i < len(self.hidden):
                h = jnp.tanh(h)
        return h


BUILTIN = {"linear": Linear, "mlp": MLP}

# Added to the variance under the square root of an observation normalisation.
OBS_NORM_EPS = 1e-8


def normalize_obs(obs: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """(obs - mean) / sqrt(var + OBS_NORM_EPS): the policy's input under an observation
    normalisation (augmented random search's); the one formula of training and policy.npz."""
    return (jnp.asarray(obs, jnp.float32) - mean) / jnp.sqrt(var + OBS_NORM_EPS)


def moments_norm(stats: Any) -> tuple[jax.Array, jax.Array]:
    """(mean, var) that normalise observations, from running Moments (count, mean, m2): the
    population variance m2 / count, and 1 where it is 0 (no samples yet, or a constant
    entry: left unscaled rather than blown up by 1 / sqrt(1e-8))."""
    var = stats.m2 / jnp.maximum(stats.count, 1.0)
    return stats.mean, jnp.where(var > 0, var, jnp.ones_like(var))


def from_equinox(model: Any) -> tuple[Callable, Any]:
    """An Equinox module ``model(obs) -> output`` as a policy: returns (policy, theta0), theta0
    the module's float arrays (``eqx.partition(model, eqx.is_inexact_array)``), the rest held
    static by the policy."""
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def policy(theta, obs):
        return eqx.combine(theta, static)(obs)

    return policy, params


def from_nnx(model: Any) -> tuple[Callable, Any]:
    """A Flax NNX module ``model(obs) -> output`` as a policy: returns (policy, theta0), theta0
    its ``nnx.Param`` state as a pure dict of arrays, everything else static."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    theta0 = nnx.to_pure_dict(params)

    def policy(theta, obs):
        state = nnx.State(params)  # a copy of the structure; the values come from theta
        nnx.replace_by_pure_dict(state, theta)
        return nnx.merge(graphdef, state, rest)(obs)

    return policy, theta0
