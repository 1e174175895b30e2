"""Episode returns of a System whose steps may end an episode: what an RL user measures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pes.system import cached_program, check_positive_ints, check_system, check_theta, step_key

_CACHE: dict[tuple, tuple[Any, Callable]] = {}


def episode_returns(system: Any, theta: Any, key: jax.Array, episodes: int,
                    max_steps: int) -> tuple[jax.Array, jax.Array]:
    """Pure JAX (jittable): (returns float32 [E], lengths int32 [E]) of ``episodes`` fresh
    episodes, as :func:`evaluate_return` describes them."""

    # A System whose training loss is shifted (Gymnasium's survival_bonus_shift) steps here
    # with its true reward.
    step = getattr(system, "true_step", system.step)

    def one_step(state, t, key):
        out = step(state, theta, t, key)
        done = out[2] if len(out) == 3 else jnp.zeros((), bool)
        return out[0], out[1], done

    pairs = jax.vmap(jax.random.split)(jax.random.split(key, episodes))
    k_init, k_steps = pairs[:, 0], pairs[:, 1]

    def cond(carry):
        _, t, alive, _, _ = carry
        return (t < max_steps) & jnp.any(alive)

    def body(carry):
        s, t, alive, ret, length = carry
        k = jax.vmap(lambda kk: step_key(kk, t)[0])(k_steps)
        s, loss, done = jax.vmap(one_step, in_axes=(0, None, 0))(s, t, k)
        ret = ret - jnp.where(alive, loss, 0.0)
        length = length + alive.astype(jnp.int32)
        return s, t + 1, alive & ~done, ret, length

    start = (jax.vmap(system.init)(k_init), jnp.zeros((), jnp.int32),
             jnp.ones((episodes,), bool), jnp.zeros((episodes,), jnp.float32),
             jnp.zeros((episodes,), jnp.int32))
    _, _, _, ret, length = jax.lax.while_loop(cond, body, start)
    return ret, length


def evaluate_return(system: Any, theta: Any, key: jax.Array, episodes: int = 10,
                    max_steps: int | None = None) -> dict[str, Any]:
    """Returns of fresh, unperturbed episodes: each runs until its step reports ``done`` or
    ``max_steps`` (default: the horizon) steps, return_i = -sum_t l_t.

    Episode i starts from ``init(split(split(key, E)[i])[0])`` and its step t uses
    ``step_key(split(split(key, E)[i])[1], t)[0]``, as in ``pes.unroll``. A step after ``done``
    is not counted (environment Systems do not simulate it). The loop stops when every
    episode has ended.

    A System with a ``true_step`` (a :class:`~pes.envs.Gymnasium` whose training reward is
    shifted) is stepped by it, so the returns are the environment's true ones.

    Returns {'return': mean return, 'return_std': its spread across episodes (population std),
    'return_min', 'return_max', 'episode_length': mean steps, 'env_steps': total steps taken,
    'returns': float32 [E]} (floats and an int, plus the NumPy array).
    """
    horizon = check_system(system)
    if max_steps is None:
        if horizon is None:
            raise ValueError("max_steps is required for a system with horizon=None")
        max_steps = horizon
    check_positive_ints(episodes=episodes, max_steps=max_steps)
    theta = check_theta(theta)
    fn = cached_program(_CACHE, system, (episodes, max_steps), lambda: jax.jit(
        lambda th, k: episode_returns(system, th, k, episodes, max_steps)))
    ret, length = (np.asarray(x) for x in fn(theta, key))
    return {"return": float(ret.mean()), "return_std": float(ret.std()),
            "return_min": float(ret.min()), "return_max": float(ret.max()),
            "episode_length": float(length.mean()), "env_steps": int(length.sum()),
            "returns": ret}
