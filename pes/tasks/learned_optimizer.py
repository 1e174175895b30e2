"""Meta-training a learned optimizer on small MLP classifiers (PES paper, experiment 5).

theta is the flat weight vector of a :class:`pes.learned_optimizer.LearnedOptimizer` (a
per-parameter MLP; see that module). One episode is one inner problem: an MLP classifier with
its own He-normal initialisation (from the episode's init key) trained for T steps by the
learned optimizer on minibatches drawn from the step keys (its own data order). The state is
(classifier params, learned-optimizer state, step) and one inner step is::

    x, y        = B training examples (indices from the step key)
    l_t, g      = cross-entropy(MLP(params, x), y) and its gradient
    u, opt      = learned_optimizer(theta).update(g, opt, params)
    params      <- params + u

The step's loss is the training loss ``l_t`` (before the update; a diverged run scores
``loss_cap``), so the meta-objective is the mean training loss over the T steps.
``evaluate(theta, key)`` is the meta-test loss: the same mean over ``eval_problems`` fresh
inner problems (keys split from ``key``), with the final networks' test loss and accuracy.

Images are area-averaged to ``image_size`` x ``image_size`` (8 for the follow-up's task; 28
keeps Fashion-MNIST's full resolution).

Sizes (:data:`SIZES`):

* ``'paper'``: the follow-up's setting (PAPER.md 5): Fashion-MNIST at 8x8, MLP 32-32-32,
  batch 128, T = 1000, N = 100, sigma = 0.01, Adam 3e-4; K = 10 and 5000 outer steps are our
  choice (the source does not give them).
* ``'full'``: the same at 28x28.
* ``'cpu'``: the same network and data with T = 200, N = 16, sigma = 0.01, K = 10 and 300
  outer steps of Adam, its rate multiplied by 0.3 at half and again at three quarters of the
  steps (48k inner steps per PES/TES/NRES run, 15-25 s on 2 cores), so the four estimators
  over three seeds take about 4 minutes and over twelve 15; full ES gets the same inner
  steps (15 outer steps of whole episodes, its rate decayed at the same fractions). Each
  estimator has its own Adam rate (``learning_rates``: 5.6e-3 for PES and NRES, 1e-2 for
  TES, 3.2e-2 for full ES), chosen by examples/tune_learned_optimizer_lr.py on tuning seeds
  100-105 and the comparison's tuning problems. A first tuning on two seeds had chosen 1e-2
  for PES and NRES, at the edge of stability: one seed in six then stalled or diverged. The
  first comparisons used 3e-3 for all four, which left full ES's 15 updates near the
  untrained optimizer. With N = 8 and a constant 3e-3 (400 steps), PES and NRES first
  improved fastest and then lost it again or diverged.
* ``'tiny'``: seconds, for tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes import data as pes_data
from pes.learned_optimizer import LearnedOptimizer, LearnedOptimizerState
from pes.system import step_key
from pes.tasks.base import OptimizerSpec, TaskDefaults
from pes.tasks.mlp import MLPSystem, apply_mlp, cross_entropy


@dataclass(frozen=True)
class Size:
    """One size of the task: the inner problems, the learned optimizer and the outer loop."""

    image_size: int
    hidden_sizes: tuple[int, ...]
    batch_size: int
    horizon: int
    optimizer_hidden: tuple[int, ...]
    num_particles: int
    sigma: float
    truncation_length: int
    outer_learning_rate: float
    num_steps: int
    eval_problems: int
    # Adam's rate is multiplied by each scale from that fraction of the outer steps on.
    lr_decay: tuple[tuple[float, float], ...] = ()
    # ((estimator, rate), ...): an estimator's own Adam rate instead of outer_learning_rate.
    learning_rates: tuple[tuple[str, float], ...] = ()

    def learning_rate(self, estimator: str) -> float:
        """The outer (Adam) learning rate of ``estimator`` at this size."""
        return dict(self.learning_rates).get(estimator, self.outer_learning_rate)

    def schedule(self, num_steps: int) -> tuple[tuple[int, float], ...]:
        """lr_decay as OptimizerSpec's ((boundary, scale), ...) for a run of num_steps."""
        out: list[tuple[int, float]] = []
        for frac, scale in self.lr_decay:
            boundary = max(1, round(frac * num_steps))
            if not out or boundary > out[-1][0]:
                out.append((boundary, scale))
        return tuple(out)


SIZES = {
    "paper": Size(image_size=8, hidden_sizes=(32, 32, 32), batch_size=128, horizon=1000,
                  optimizer_hidden=(32, 32), num_particles=100, sigma=0.01,
                  truncation_length=10, outer_learning_rate=3e-4, num_steps=5000,
                  eval_problems=8),
    "full": Size(image_size=28, hidden_sizes=(32, 32, 32), batch_size=128, horizon=1000,
                 optimizer_hidden=(32, 32), num_particles=100, sigma=0.01,
                 truncation_length=10, outer_learning_rate=3e-4, num_steps=5000,
                 eval_problems=8),
    "cpu": Size(image_size=8, hidden_sizes=(32, 32, 32), batch_size=128, horizon=200,
                optimizer_hidden=(32, 32), num_particles=16, sigma=0.01, truncation_length=10,
                outer_learning_rate=1e-2, num_steps=300, eval_problems=4,
                lr_decay=((0.5, 0.3), (0.75, 0.3)),
                # examples/tune_learned_optimizer_lr.py, tuning seeds 100-105 (lr_tuning.md).
                learning_rates=(("pes", 5.6e-3), ("tes", 1e-2), ("nres", 5.6e-3),
                                ("full-es", 3.2e-2))),
    "tiny": Size(image_size=8, hidden_sizes=(8,), batch_size=8, horizon=12,
                 optimizer_hidden=(8,), num_particles=4, sigma=0.01, truncation_length=4,
                 outer_learning_rate=3e-3, num_steps=3, eval_problems=2),
}


class InnerState(NamedTuple):
    """params: the classifier's (W1, b1, ...); opt: the learned optimizer's state over them;
    step: int32, inner steps taken in this episode."""

    params: tuple[jax.Array, ...]
    opt: LearnedOptimizerState
    step: jax.Array


TaskState = InnerState


class _Images:
    """A Dataset look-alike with images area-averaged to size x size."""

    def __init__(self, data: Any, size: int):
        shape = tuple(getattr(data, "image_shape", ()))
        self.name = f"{getattr(data, 'name', 'custom')}-{size}x{size}"
        self.num_classes = int(getattr(data, "num_classes", 10))
        for split in ("train", "valid", "test"):
            x = np.asarray(getattr(data, f"{split}_images"), np.float32)
            if len(shape) != 2 or shape[0] != shape[1] or shape[0] * shape[1] != x.shape[1]:
                raise ValueError(f"image_size={size} needs square images; data "
                                 f"{getattr(data, 'name', '')!r} has image_shape {shape}")
            if shape != (size, size):
                x = pes_data.downsample(x, size, shape)
            setattr(self, f"{split}_images", x)
            setattr(self, f"{split}_labels", np.asarray(getattr(data, f"{split}_labels")))


_DOWNSAMPLED: dict[tuple[int, int], _Images] = {}


def _resize(data: Any, size: int | None) -> Any:
    if size is None:
        return data
    key = (id(data), size)
    hit = _DOWNSAMPLED.get(key)
    if hit is None or hit.source is not data:  # keep the source alive with the entry
        hit = _Images(data, size)
        hit.source = data
        if len(_DOWNSAMPLED) > 4:
            _DOWNSAMPLED.clear()
        _DOWNSAMPLED[key] = hit
    return hit


class LearnedOptimizerTask(MLPSystem):
    """theta: float32 [optimizer.num_weights], the learned optimizer's flat weights.

    Args:
      dataset, data_dir: as for the other image tasks ('fashion-mnist' by default, found by
        pes.data.load).
      size: 'cpu' (default), 'paper', 'full' or 'tiny', or a Size.
      data: an already loaded pes.data.Dataset (tests use small synthetic ones).
      image_size: side of the (square) images fed to the MLP; None keeps the data as it is
        (e.g. synthetic vectors). Default: the size's.
      horizon, hidden_sizes, batch_size, eval_problems: override the size's values.
      optimizer: the LearnedOptimizer architecture (default: the size's hidden widths with
        the module defaults).
    """

    def __init__(self, dataset: str = "fashion-mnist",
                 data_dir: str | os.PathLike | None = None, size: str | Size = "cpu", *,
                 data: Any = None, image_size: int | None | str = "size",
                 horizon: int | None = None, hidden_sizes: tuple[int, ...] | None = None,
                 batch_size: int | None = None, eval_problems: int | None = None,
                 optimizer: LearnedOptimizer | None = None):
        if isinstance(size, str) and size not in SIZES:
            raise ValueError(f"size={size!r} must be one of {tuple(SIZES)}")
        self.size = SIZES[size] if isinstance(size, str) else size
        self.size_name = size if isinstance(size, str) else "custom"
        if image_size == "size":
            image_size = self.size.image_size
        raw = data if data is not None else pes_data.load(dataset, data_dir)
        self.optimizer = optimizer or LearnedOptimizer(hidden_sizes=self.size.optimizer_hidden)
        self.eval_problems = int(eval_problems or self.size.eval_problems)
        if self.eval_problems < 1:
            raise ValueError(f"eval_problems={eval_problems!r} must be >= 1")
        super().__init__(
            _resize(raw, image_size),
            hidden_sizes=hidden_sizes or self.size.hidden_sizes,
            batch_size=batch_size or self.size.batch_size,
            horizon=horizon or self.size.horizon,
            objective="train_loss",
        )
        self._eval_one = jax.jit(self._evaluate_problems)
        self._eval_many = jax.jit(jax.vmap(self._evaluate_problems))
        self._optax_runs: dict[Any, Any] = {}

    # ------------------------------------------------------------------------- the System

    @property
    def num_weights(self) -> int:
        return self.optimizer.num_weights

    def init(self, key: jax.Array) -> TaskState:
        """A fresh classifier (He-normal weights from ``key``, zero biases), zero moments."""
        params = super().init(key).params
        return TaskState(params, self.optimizer.init_state(params), jnp.zeros((), jnp.int32))

    def _loss_and_grad(self, params, key):
        draw = self.draw(key)
        x, y = self.train_images[draw.train_idx], self.train_labels[draw.train_idx]
        return jax.value_and_grad(lambda p: cross_entropy(apply_mlp(p, x), y))(params)

    def step(self, state: TaskState, theta, t, key) -> tuple[TaskState, jax.Array]:
        """One minibatch step of the learned optimizer with weights theta; its training loss."""
        del t  # the optimizer counts its own steps (opt.step), which equals t in an episode
        weights = self.optimizer.unflatten(theta)
        loss, grads = self._loss_and_grad(state.params, key)
        updates, opt = self.optimizer.update(weights, grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        return TaskState(params, opt, state.step + 1), self._score(loss)

    # ------------------------------------------------------------------------- evaluation

    def _evaluate_problems(self, theta, key) -> dict[str, jax.Array]:
        keys = jax.random.split(key, self.eval_problems)
        out = jax.vmap(self._evaluate, in_axes=(None, 0))(theta, keys)
        return {k: v.mean() for k, v in out.items()}

    def evaluate(self, theta, key: jax.Array) -> dict[str, jax.Array]:
        """The meta-test loss of ``eval_problems`` fresh inner problems (keys
        ``split(key, eval_problems)``), each a full episode of T steps at theta.

        Returns float scalars, means over the problems: 'meta_loss' (mean training loss over
        the episode), 'final_valid_loss' / 'final_valid_accuracy', 'final_test_loss' /
        'final_test_accuracy' (the trained networks on the whole split).
        """
        return self._eval_one(jnp.asarray(theta, jnp.float32), key)

    def meta_test(self, theta, keys: jax.Array) -> dict[str, np.ndarray]:
        """Per-problem metrics of one episode for each key in ``keys`` [n] (not averaged):
        numpy arrays [n] of 'meta_loss', 'final_test_loss', ... (as :meth:`evaluate`)."""
        fn = self._optax_runs.get("theta")
        if fn is None:
            fn = self._optax_runs["theta"] = jax.jit(
                jax.vmap(self._evaluate, in_axes=(None, 0)))
        out = fn(jnp.asarray(theta, jnp.float32), jnp.asarray(keys))
        return {k: np.asarray(v) for k, v in out.items()}

    # ------------------------------------------------------------- hand-designed baselines

    def optax_episode(self, tx: optax.GradientTransformation, key: jax.Array
                      ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """One inner problem trained by ``tx`` instead of the learned optimizer: (final
        params, training losses [T]), with the same initialisation and minibatches as the
        learned optimizer's episode from ``key``."""
        k_init, k_steps = jax.random.split(key)
        params = self.init(k_init).params

        def body(carry, t):
            params, opt = carry
            loss, grads = self._loss_and_grad(params, step_key(k_steps, t)[0])
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), self._score(loss)

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)),
                                           jnp.arange(self.horizon, dtype=jnp.int32))
        return params, losses

    def optax_meta_test(self, tx: optax.GradientTransformation, keys: jax.Array
                        ) -> dict[str, np.ndarray]:
        """:meth:`meta_test` for an optax optimizer (one compiled function per ``tx``)."""
        fn = self._optax_runs.get(tx)
        if fn is None:
            def one(key):
                params, losses = self.optax_episode(tx, key)
                test_loss, test_acc = self._full_metrics(params, self.test_images,
                                                         self.test_labels)
                return {"meta_loss": losses.mean(), "final_test_loss": test_loss,
                        "final_test_accuracy": test_acc}

            fn = self._optax_runs[tx] = jax.jit(jax.vmap(one))
        return {k: np.asarray(v) for k, v in fn(jnp.asarray(keys)).items()}

    def grid_meta_losses(self, name: str, learning_rates, keys: jax.Array) -> np.ndarray:
        """Meta-losses of a hand-designed optimizer (``name``: 'sgd', plain p <- p - lr g, or
        'adam', optax.adam) with each constant learning rate on each inner problem:
        [len(learning_rates), len(keys)] (problems as in :meth:`meta_test`)."""
        makers = {"sgd": optax.sgd, "adam": optax.adam}
        if name not in makers:
            raise ValueError(f"name={name!r} must be one of {tuple(makers)}")
        fn = self._optax_runs.get(("grid", name))
        if fn is None:
            def one(lr, key):
                return self.optax_episode(makers[name](lr), key)[1].mean()

            fn = self._optax_runs[("grid", name)] = jax.jit(
                jax.vmap(jax.vmap(one, (None, 0)), (0, None)))
        return np.asarray(fn(jnp.asarray(learning_rates, jnp.float32), jnp.asarray(keys)))

    # ---------------------------------------------------------------------- defaults

    def initial_theta(self, key: jax.Array | None = None) -> jax.Array:
        """The untrained optimizer's flat weights (from PRNGKey(0) by default)."""
        key = jax.random.PRNGKey(0) if key is None else key
        return self.optimizer.flatten(self.optimizer.init_weights(key))

    def defaults(self) -> TaskDefaults:
        """N, sigma, K and Adam's rates of the size (each estimator's own where the size
        gives one); TES and NRES as PES; full ES (K = T) gets the outer steps that give it
        PES's inner steps: num_steps * K / T."""
        s = self.size
        es = {"num_particles": s.num_particles, "sigma": s.sigma}
        window = {"truncation_length": s.truncation_length}
        theta0 = tuple(float(v) for v in np.asarray(self.initial_theta()))
        full_steps = max(1, math.ceil(s.num_steps * s.truncation_length / self.horizon))
        steps = {"pes": s.num_steps, "tes": s.num_steps, "nres": s.num_steps,
                 "full-es": full_steps}
        return TaskDefaults(
            theta0=theta0,
            num_steps=s.num_steps,
            optimizer=OptimizerSpec("adam", s.outer_learning_rate,
                                    schedule=s.schedule(s.num_steps)),
            estimators={"pes": {**es, **window}, "tes": {**es, **window},
                        "nres": {**es, **window}, "full-es": dict(es)},
            num_steps_overrides={"full-es": full_steps},
            # Each estimator's own rate, decayed at the same fractions of its own steps.
            optimizer_overrides={est: OptimizerSpec("adam", s.learning_rate(est),
                                                    schedule=s.schedule(n))
                                 for est, n in steps.items()},
        )

    def __repr__(self) -> str:
        return (f"LearnedOptimizerTask(data={self.data_name!r}, layers={self.layer_sizes}, "
                f"batch_size={self.batch_size}, horizon={self.horizon}, "
                f"optimizer={self.optimizer})")


EXPORT_FILE = "learned_optimizer.npz"


def export_run(task: LearnedOptimizerTask, theta, run_dir) -> Any:
    """Save the learned optimizer with weights ``theta`` as ``run_dir/learned_optimizer.npz``
    (pes.learned_optimizer.load reads it), with the inner problems it was trained on as
    metadata. Returns the path."""
    from pathlib import Path

    from pes.learned_optimizer import save

    meta = {"task": "learned-optimizer", "size": task.size_name, "data": task.data_name,
            "layers": list(task.layer_sizes), "batch_size": task.batch_size,
            "horizon": task.horizon}
    return save(Path(run_dir) / EXPORT_FILE, task.optimizer, jnp.asarray(theta), meta)
