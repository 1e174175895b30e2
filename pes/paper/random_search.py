"""Random search over full episodes, with compute counted in inner steps.

The baseline of PAPER.md experiment 4: draw configurations from the task's prior (the same
``sample_theta`` a run's random initial theta comes from), run each for one full unperturbed
episode (``task.evaluate``: T inner steps), and track the best meta-objective found so far
against the inner steps spent. Configuration i is ``sample_theta(fold_in(k_sample, i))`` and
its episode uses ``fold_in(k_eval, i)`` (its own initialisation and minibatches), so a run is a
deterministic function of its key and a longer search extends a shorter one.

Several configurations are evaluated at once (``jit`` of a ``vmap``) in chunks of
``batch_size``; a task with ``evaluate_many(thetas, keys, chunk_size=...)`` (the MLP tasks)
does that itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RandomSearchResult(NamedTuple):
    """Everything as numpy arrays, one row per configuration in the order drawn.

    thetas: [n, ...] the configurations. metrics: name -> [n], every float entry of
    ``task.evaluate``. meta_losses: [n], the ranked metric (``metric``, 'meta_loss' by default).
    inner_steps: [n] total inner steps after configuration i ((i + 1) T).
    best_so_far: [n] min of meta_losses[: i + 1] (non-increasing; nan rows are skipped).
    best_index: [n] the configuration holding best_so_far[i] (-1 while none is finite).
    """

    thetas: np.ndarray
    metrics: dict[str, np.ndarray]
    meta_losses: np.ndarray
    inner_steps: np.ndarray
    best_so_far: np.ndarray
    best_index: np.ndarray

    @property
    def best_theta(self) -> np.ndarray:
        i = int(self.best_index[-1])
        if i < 0:
            raise ValueError("no configuration had a finite meta-objective")
        return self.thetas[i]

    def best_at(self, inner_steps: Any) -> np.ndarray:
        """best_so_far after spending at most ``inner_steps`` (array-like) inner steps; nan
        before the first configuration completes."""
        budget = np.asarray(inner_steps, dtype=np.int64)
        done = np.searchsorted(self.inner_steps, budget, side="right")
        padded = np.concatenate([[np.nan], self.best_so_far])
        return padded[done]


def running_best(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """(best_so_far, best_index) of a 1-D array, ignoring nan (best_index -1 until a finite
    value appears, best_so_far nan there)."""
    values = np.asarray(values, dtype=np.float64)
    best = np.full(values.shape, np.nan)
    index = np.full(values.shape, -1, dtype=np.int64)
    cur, cur_i = np.inf, -1
    for i, v in enumerate(values):
        if np.isfinite(v) and v < cur:
            cur, cur_i = v, i
        best[i] = cur if cur_i >= 0 else np.nan
        index[i] = cur_i
    return best, index


def random_search(
    task: Any,
    num_configs: int,
    key: jax.Array,
    *,
    batch_size: int = 8,
    metric: str = "meta_loss",
    callback: Any = None,
) -> RandomSearchResult:
    """Random search of ``num_configs`` configurations of ``task`` (lower ``metric`` is
    better).

    Args:
      task: a task with ``horizon``, ``sample_theta(key)`` and ``evaluate(theta, key)``
        (jittable; ``evaluate_many`` is used when the task has it).
      num_configs: configurations to try; each costs one episode of ``task.horizon`` steps.
      key: PRNG key; the search is a deterministic function of it.
      batch_size: configurations evaluated at once (vmapped); lower it if memory is short.
      metric: the ``evaluate`` entry ranked (minimised).
      callback: optional ``callback(done, result_so_far)`` after each chunk; True stops early.

    Returns a RandomSearchResult.
    """
    if isinstance(num_configs, bool) or not isinstance(num_configs, int) or num_configs < 1:
        raise ValueError(f"num_configs={num_configs!r} must be a positive int")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    sample = getattr(task, "sample_theta", None)
    if sample is None:
        raise TypeError(f"task {type(task).__name__} has no sample_theta(key): random search "
                        "needs a prior to draw configurations from")
    horizon = getattr(task, "horizon", None)
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"random search needs a finite task.horizon; got {horizon!r}")
    k_sample, k_eval = jax.random.split(key)
    thetas = jax.vmap(lambda i: sample(jax.random.fold_in(k_sample, i)))(
        jnp.arange(num_configs))

    metrics: dict[str, list[np.ndarray]] = {}
    done = 0
    result = None
    while done < num_configs:
        stop = min(num_configs, done + batch_size)
        # Configuration i's episode key is fold_in(k_eval, i): chunks reproduce one long search.
        keys = jax.vmap(lambda i: jax.random.fold_in(k_eval, i))(jnp.arange(done, stop))
        for name, value in _evaluate_rows(task, thetas[done:stop], keys, batch_size).items():
            metrics.setdefault(name, []).append(value)
        done = stop
        result = _result(np.asarray(thetas[:done]), metrics, metric, horizon)
        if callback is not None and callback(done, result):
            break
    assert result is not None
    return result


_RUNNERS: dict[int, tuple[Any, Any]] = {}


def _evaluate_rows(task: Any, thetas: jax.Array, keys: jax.Array, batch_size: int):
    """task.evaluate(thetas[i], keys[i]) for every row, as numpy arrays; vmapped in chunks of
    batch_size (through task.evaluate_many when the task has it)."""
    many = getattr(task, "evaluate_many", None)
    if many is not None:
        return many(thetas, keys, chunk_size=batch_size)
    hit = _RUNNERS.get(id(task))
    if hit is None or hit[0] is not task:
        # Holding the task keeps its id from being reused while the entry lives.
        hit = (task, jax.jit(jax.vmap(task.evaluate)))
        if len(_RUNNERS) > 16:
            _RUNNERS.clear()
        _RUNNERS[id(task)] = hit
    run = hit[1]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, thetas.shape[0], batch_size):
        th, ks = thetas[start:start + batch_size], keys[start:start + batch_size]
        n = th.shape[0]
        if n < batch_size:  # pad to one compiled shape
            th = jnp.concatenate([th, jnp.repeat(th[-1:], batch_size - n, axis=0)])
            ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], batch_size - n, axis=0)])
        for name, value in run(th, ks).items():
            parts.setdefault(name, []).append(np.asarray(value)[:n])
    return {name: np.concatenate(v) for name, v in parts.items()}


def _result(thetas, metrics, metric, horizon) -> RandomSearchResult:
    flat = {name: np.concatenate(parts) for name, parts in metrics.items()}
    if metric not in flat:
        raise KeyError(f"metric={metric!r} is not an entry of task.evaluate(); entries: "
                       f"{sorted(flat)}")
    values = flat[metric].astype(np.float64)
    best, index = running_best(values)
    n = len(values)
    return RandomSearchResult(
        thetas=thetas,
        metrics=flat,
        meta_losses=values,
        inner_steps=np.arange(1, n + 1, dtype=np.int64) * horizon,
        best_so_far=best,
        best_index=index,
    )
