"""Learning-rate schedule of an MLP on (Fashion-)MNIST (PES paper, experiment 3).

Inner problem: a 784-100-100-10 ReLU MLP trained with SGD, momentum 0.9, batch 100, for T steps
with the schedule

    lr_t = lr0 / (1 + t / T) ** decay,        theta = (log lr0, log decay),

from lr0 = 0.003, decay = 30, i.e. theta0 = (-5.809, 3.401). The paper has T = 5000 and
``t / 5000``; writing ``t / T`` keeps the schedule's shape, and so the (lr0, decay) landscape,
the same at the smaller CPU size. Objectives: ``'loss'``, the mean training loss over the run
(the paper's summed training loss, divided by T), or ``'accuracy'``, minus the mean accuracy
on validation minibatches (non-differentiable). ``'valid_loss'`` is there too.

The System is a :class:`pes.TrainingLoop` (``optax.inject_hyperparams(optax.sgd)`` with the
schedule's learning rate, :class:`pes.tasks.mlp.MLPSystem`'s network, initialisation and
minibatches); the state is a ``pes.training_loop.LoopState`` (params, buffers, optax state).
Its steps are bit for bit those of MLPSystem's own SGD-with-momentum step, which this task
used before (same keys, same minibatches, same float operations), so results did not change.

Sizes (:data:`SIZES`):

* ``'paper'``: T = 5000, K = 10, N = 1000 (500 antithetic pairs), sigma = 0.1, Adam 1e-2.
* ``'cpu'``: the same network, batch and data; T = 1000, N = 20, Adam 3e-2, 300 outer steps.
  On 2 cores an inner step of this network runs at about 2000-2700 steps/s, so a PES run
  (300 x 20 x 10 = 60k inner steps plus the stagger burn-in) takes about 1.5 minutes, a TES
  run about 2, and a 12 x 12 heatmap of full runs (144k steps) about 1: well under 30 minutes
  for both objectives. T = 1000 still spans 100 windows of K = 10, so the truncation
  (short-horizon) bias is as strong as at T = 5000; the larger outer learning rate lets 300
  steps cross the ~3 units of theta between the start and the good region (Adam moves each
  coordinate by at most about lr per step).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes import data as pes_data
from pes.tasks.base import OptimizerSpec, TaskDefaults
from pes.tasks.mlp import Hyperparameters, MLPSystem, accuracy, apply_mlp, cross_entropy
from pes.training_loop import TrainingLoop

THETA0 = (math.log(0.003), math.log(30.0))
THETA_NAMES = ("log lr0", "log decay")
# Rectangle of the (log lr0, log decay) heatmap and of sample_theta's uniform prior.
HEATMAP_RANGE = ((-8.0, 0.0), (-3.0, 4.0))
OBJECTIVE_NAMES = {"loss": "train_loss", "accuracy": "valid_accuracy",
                   "valid_loss": "valid_loss"}


@dataclass(frozen=True)
class Size:
    """One size of the task: the inner problem and the outer loop's settings."""

    hidden_sizes: tuple[int, ...]
    batch_size: int
    horizon: int
    num_particles: int
    sigma: float
    truncation_length: int
    outer_learning_rate: float
    num_steps: int
    heatmap_points: int


SIZES = {
    "paper": Size(hidden_sizes=(100, 100), batch_size=100, horizon=5000, num_particles=1000,
                  sigma=0.1, truncation_length=10, outer_learning_rate=1e-2, num_steps=5000,
                  heatmap_points=25),
    "cpu": Size(hidden_sizes=(100, 100), batch_size=100, horizon=1000, num_particles=20,
                sigma=0.1, truncation_length=10, outer_learning_rate=3e-2, num_steps=300,
                heatmap_points=12),
    # For tests and smoke runs (seconds): a small network and short episodes.
    "tiny": Size(hidden_sizes=(16,), batch_size=10, horizon=20, num_particles=4, sigma=0.1,
                 truncation_length=5, outer_learning_rate=3e-2, num_steps=4, heatmap_points=3),
}


def resolve_size(size: str | Size) -> Size:
    if isinstance(size, Size):
        return size
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {tuple(SIZES)}")
    return SIZES[size]


def resolve_data(data: Any, dataset: str, data_dir: str | os.PathLike | None) -> Any:
    """``data`` when given (a pes.data.Dataset or look-alike), else pes.data.load(...)."""
    return data if data is not None else pes_data.load(dataset, data_dir)


class MnistLRSchedule(MLPSystem):
    """theta = (log lr0, log decay), shape (2,) float32.

    Args:
      objective: 'loss' (training loss), 'accuracy' (minus validation accuracy) or
        'valid_loss'.
      dataset: 'fashion-mnist' (default) or 'mnist', found by pes.data.load(dataset, data_dir).
      data_dir: folder searched first (``--data-dir``).
      size: 'cpu' (default) or 'paper', or a Size.
      data: an already loaded pes.data.Dataset (tests use small synthetic ones).
      horizon, hidden_sizes, batch_size: override the size's values.
    """

    def __init__(self, objective: str = "loss", dataset: str = "fashion-mnist",
                 data_dir: str | os.PathLike | None = None, size: str | Size = "cpu", *,
                 data: Any = None, horizon: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None, batch_size: int | None = None):
        if objective not in OBJECTIVE_NAMES:
            raise ValueError(f"objective={objective!r} must be one of {tuple(OBJECTIVE_NAMES)}")
        self.size = resolve_size(size)
        self.size_name = size if isinstance(size, str) else "custom"
        self.objective_name = objective
        super().__init__(
            resolve_data(data, dataset, data_dir),
            hidden_sizes=hidden_sizes or self.size.hidden_sizes,
            batch_size=batch_size or self.size.batch_size,
            horizon=horizon or self.size.horizon,
            objective=OBJECTIVE_NAMES[objective],
        )
        self.loop = self._training_loop()

    momentum = 0.9

    def _training_loop(self) -> TrainingLoop:
        """The task as a pes.TrainingLoop: MLPSystem's init and minibatches (``draw`` on the
        step's key), SGD with momentum from optax, the objective on the updated network."""
        loss = lambda params, batch, key: cross_entropy(apply_mlp(params, batch[0]), batch[1])

        def valid(params, t, key):
            idx = self.draw(key).valid_idx
            logits = apply_mlp(params, self.valid_images[idx])
            labels = self.valid_labels[idx]
            if self.objective == "valid_loss":
                return cross_entropy(logits, labels)
            return jnp.where(jnp.all(jnp.isfinite(logits)), -accuracy(logits, labels), 0.0)

        return TrainingLoop(
            init=lambda key: MLPSystem.init(self, key).params, loss=loss,
            batches=lambda key, t: self.minibatch(key),
            optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.0,
                                                          momentum=self.momentum),
            hyperparameters=lambda theta, t: {"learning_rate": self.learning_rate(theta, t)},
            horizon=self.horizon,
            objective="train_loss" if self.objective == "train_loss" else valid,
            loss_cap=self.loss_cap)

    def init(self, key: jax.Array):
        """He-normal weights and zero biases (as MLPSystem.init), a fresh optax state."""
        return self.loop.init(key)

    def step(self, state, theta, t, key):
        """One SGD-with-momentum step (pes.TrainingLoop) and the objective at it."""
        return self.loop.step(state, theta, t, key)

    def learning_rate(self, theta: jax.Array, t: jax.Array) -> jax.Array:
        """lr0 / (1 + t / T) ** decay."""
        lr0, decay = jnp.exp(theta[0]), jnp.exp(theta[1])
        return lr0 * jnp.exp(-decay * jnp.log1p(t / self.horizon))

    def hyperparameters(self, theta, t) -> Hyperparameters:
        lr = self.learning_rate(theta, t)
        mu = jnp.float32(self.momentum)
        n = self.num_tensors
        return Hyperparameters((lr,) * n, (mu,) * n)

    def sample_theta(self, key: jax.Array) -> jax.Array:
        """Uniform on HEATMAP_RANGE: log lr0 in [-8, 0], log decay in [-3, 4]."""
        lo = jnp.asarray([r[0] for r in HEATMAP_RANGE], jnp.float32)
        hi = jnp.asarray([r[1] for r in HEATMAP_RANGE], jnp.float32)
        return jax.random.uniform(key, (2,), jnp.float32, lo, hi)

    def heatmap_axes(self, points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Grid axes over HEATMAP_RANGE, ``points`` (default: the size's) per axis."""
        n = points or self.size.heatmap_points
        return tuple(np.linspace(lo, hi, n, dtype=np.float32)  # type: ignore[return-value]
                     for lo, hi in HEATMAP_RANGE)

    def surface(self, log_lr0: Any, log_decay: Any, key: jax.Array,
                chunk_size: int = 8) -> dict[str, np.ndarray]:
        """evaluate() of full runs on the grid: ``out[m][i, j]`` at theta = (log_lr0[i],
        log_decay[j]), every run with the same key (same init and minibatches)."""
        a = np.asarray(log_lr0, np.float32)
        b = np.asarray(log_decay, np.float32)
        thetas = np.stack(np.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
        out = self.evaluate_many(thetas, key, chunk_size=chunk_size)
        return {k: v.reshape(len(a), len(b)) for k, v in out.items()}

    def defaults(self) -> TaskDefaults:
        """PAPER.md 3 at 'paper' size: theta0 = (log 0.003, log 30), K = 10, N = 1000,
        sigma = 0.1, Adam 1e-2. TES, NRES and full ES use PES's N and sigma (not in the
        paper); TBPTT only for the differentiable objectives."""
        s = self.size
        es = {"num_particles": s.num_particles, "sigma": s.sigma}
        window = {"truncation_length": s.truncation_length}
        estimators = {"pes": {**es, **window}, "tes": {**es, **window},
                      "nres": {**es, **window}, "full-es": dict(es)}
        if self.objective != "valid_accuracy":
            estimators["tbptt"] = dict(window)
        return TaskDefaults(
            theta0=THETA0,
            num_steps=s.num_steps,
            optimizer=OptimizerSpec("adam", s.outer_learning_rate),
            estimators=estimators,
        )
