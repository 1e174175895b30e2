"""Tuning 29 hyperparameters of a deep MLP on Fashion-MNIST (PES paper, experiment 4).

Inner problem (:class:`pes.tasks.mlp.MLPSystem`): a 784-100-100-100-100-100-10 ReLU MLP (5
hidden layers), batch 100, T = 1000 steps of SGD with momentum whose hyperparameters are all in
theta, a flat float32 vector laid out as

    theta[0:12]   log learning rate of each tensor   (W1, b1, W2, b2, ..., W6, b6)
    theta[12:24]  momentum of each tensor through a sigmoid: mu_i = sigmoid(theta[12 + i])
    theta[24:29]  keep probability of each hidden layer through a sigmoid (inverted dropout:
                  a unit is kept with probability p and scaled by 1/p; the Bernoulli masks
                  are drawn from the step key, so theta acts through a discrete effect that
                  has no gradient: only ES-type estimators see it)

(for H hidden layers: 2 (H + 1) + 2 (H + 1) + H entries; 29 for H = 5). The learning rates and
momenta are constant over the episode; the keep probabilities only act during training steps,
never when measuring validation loss or accuracy.

Objective: by default ``'valid_loss'`` (mean over the run of the updated network's loss on a
validation minibatch per step). The paper's text does not say which; on the training loss,
dropout can only hurt, so a validation objective is what makes the keep fractions meaningful.
``'loss'`` (training loss) and ``'accuracy'`` (minus validation accuracy) are available.

Random initial hyperparameters come from :meth:`ManyHyperparameters.sample_theta` (the prior
random search draws from too), each entry independent and uniform:

    log lr   in [log 1e-4, log 0.3]      (lr from 1e-4 to 0.3)
    momentum logit in [-2, 3]            (mu from 0.12 to 0.95)
    keep logit in [0, 4]                 (keep from 0.5 to 0.98)

(The paper's code drew PES's start from lr in [1e-4, 1e-2], mu in [0.01, 0.9] and unit
fractions in [0.2, 0.8], and random search from a much wider box, lr in [1e-8, 10] and mu and
fractions in [0.01, 0.999]. Here both use one prior; its keep range is narrower because our
keep fractions act as dropout on every layer, which at 0.2 to 0.8 in five layers stalls
training, where the code's masks switched off a fixed fraction of units.)
``defaults().theta0`` is ``sample_theta(PRNGKey(0))`` so a default run is reproducible.

Sizes: ``'paper'``: T = 1000, K = 10, N = 10, sigma = 0.3, Adam 1e-2, 50000 outer steps (the
code's command; its figure shows the first 3e6 inner steps, 30000 outer steps). ``'cpu'``: the
same network, data, T, K, N, sigma and Adam with 1500 outer steps (155k inner steps of PES, the
cost of 155 random-search episodes). Each PES outer step costs N K inner steps whatever T is,
and Adam moves theta by about its learning rate per step, so shortening T would not make PES
cheaper; it would only give random search more episodes per outer step than the paper's
T / (N K) = 10.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pes.tasks.base import OptimizerSpec, TaskDefaults
from pes.tasks.mlp import Hyperparameters, MLPSystem
from pes.tasks.mnist_lr_schedule import OBJECTIVE_NAMES, resolve_data

PRIOR_LOG_LR = (math.log(1e-4), math.log(0.3))
PRIOR_MOMENTUM_LOGIT = (-2.0, 3.0)
PRIOR_KEEP_LOGIT = (0.0, 4.0)


@dataclass(frozen=True)
class Size:
    hidden_sizes: tuple[int, ...]
    batch_size: int
    horizon: int
    num_particles: int
    sigma: float
    truncation_length: int
    outer_learning_rate: float
    num_steps: int


SIZES = {
    "paper": Size(hidden_sizes=(100,) * 5, batch_size=100, horizon=1000, num_particles=10,
                  sigma=0.3, truncation_length=10, outer_learning_rate=1e-2, num_steps=50000),
    "cpu": Size(hidden_sizes=(100,) * 5, batch_size=100, horizon=1000, num_particles=10,
                sigma=0.3, truncation_length=10, outer_learning_rate=1e-2, num_steps=1500),
    # For tests and smoke runs (seconds): 2 hidden layers of 8 (theta: 14 numbers).
    "tiny": Size(hidden_sizes=(8, 8), batch_size=10, horizon=20, num_particles=4, sigma=0.3,
                 truncation_length=5, outer_learning_rate=1e-2, num_steps=4),
}


class ManyHyperparameters(MLPSystem):
    """theta: float32 [4 (H + 1) + H] (29 for the paper's H = 5 hidden layers); see the module
    docstring for its layout.

    Args:
      objective: 'valid_loss' (default), 'loss' (training loss) or 'accuracy' (minus
        validation accuracy).
      dataset, data_dir, data: as for MnistLRSchedule ('fashion-mnist' by default).
      size: 'cpu' (default) or 'paper', or a Size.
      horizon, hidden_sizes, batch_size: override the size's values.
    """

    def __init__(self, objective: str = "valid_loss", dataset: str = "fashion-mnist",
                 data_dir: str | os.PathLike | None = None, size: str | Size = "cpu", *,
                 data: Any = None, horizon: int | None = None,
                 hidden_sizes: tuple[int, ...] | None = None, batch_size: int | None = None):
        if objective not in OBJECTIVE_NAMES:
            raise ValueError(f"objective={objective!r} must be one of {tuple(OBJECTIVE_NAMES)}")
        if isinstance(size, str) and size not in SIZES:
            raise ValueError(f"size={size!r} must be one of {tuple(SIZES)}")
        self.size = SIZES[size] if isinstance(size, str) else size
        self.size_name = size if isinstance(size, str) else "custom"
        self.objective_name = objective
        super().__init__(
            resolve_data(data, dataset, data_dir),
            hidden_sizes=hidden_sizes or self.size.hidden_sizes,
            batch_size=batch_size or self.size.batch_size,
            horizon=horizon or self.size.horizon,
            objective=OBJECTIVE_NAMES[objective],
        )

    @property
    def num_hyperparameters(self) -> int:
        return 2 * self.num_tensors + self.num_hidden

    def theta_names(self) -> tuple[str, ...]:
        tensors = self.tensor_names()
        return (tuple(f"log lr {n}" for n in tensors)
                + tuple(f"momentum logit {n}" for n in tensors)
                + tuple(f"keep logit h{i + 1}" for i in range(self.num_hidden)))

    def unpack(self, theta) -> dict[str, jax.Array]:
        """{'learning_rates': [2(H+1)], 'momenta': [2(H+1)], 'keep': [H]} (not logs/logits)."""
        theta = jnp.asarray(theta)
        if theta.shape != (self.num_hyperparameters,):
            raise ValueError(f"theta has shape {theta.shape}; this task needs "
                             f"({self.num_hyperparameters},)")
        n = self.num_tensors
        return {"learning_rates": jnp.exp(theta[:n]),
                "momenta": jax.nn.sigmoid(theta[n:2 * n]),
                "keep": jax.nn.sigmoid(theta[2 * n:])}

    def hyperparameters(self, theta, t) -> Hyperparameters:
        del t  # constant over the episode
        hp = self.unpack(theta)
        n, h = self.num_tensors, self.num_hidden
        return Hyperparameters(
            learning_rates=tuple(hp["learning_rates"][i] for i in range(n)),
            momenta=tuple(hp["momenta"][i] for i in range(n)),
            keep=tuple(hp["keep"][i] for i in range(h)),
        )

    def sample_theta(self, key: jax.Array) -> jax.Array:
        """One draw from the prior of the module docstring, float32 [num_hyperparameters]."""
        n, h = self.num_tensors, self.num_hidden
        lo = np.concatenate([np.full(n, PRIOR_LOG_LR[0]), np.full(n, PRIOR_MOMENTUM_LOGIT[0]),
                             np.full(h, PRIOR_KEEP_LOGIT[0])]).astype(np.float32)
        hi = np.concatenate([np.full(n, PRIOR_LOG_LR[1]), np.full(n, PRIOR_MOMENTUM_LOGIT[1]),
                             np.full(h, PRIOR_KEEP_LOGIT[1])]).astype(np.float32)
        return jax.random.uniform(key, lo.shape, jnp.float32, jnp.asarray(lo), jnp.asarray(hi))

    def defaults(self) -> TaskDefaults:
        """PAPER.md 4: K = 10, N = 10, sigma = 0.3, Adam 1e-2, from a random theta
        (sample_theta(PRNGKey(0))). TES, NRES and full ES use PES's N and sigma."""
        s = self.size
        es = {"num_particles": s.num_particles, "sigma": s.sigma}
        window = {"truncation_length": s.truncation_length}
        theta0 = tuple(float(v) for v in np.asarray(self.sample_theta(jax.random.PRNGKey(0))))
        return TaskDefaults(
            theta0=theta0,
            num_steps=s.num_steps,
            optimizer=OptimizerSpec("adam", s.outer_learning_rate),
            estimators={"pes": {**es, **window}, "tes": {**es, **window},
                        "nres": {**es, **window}, "full-es": dict(es)},
        )
