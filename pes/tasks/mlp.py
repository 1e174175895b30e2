"""Training an MLP classifier with theta-dependent hyperparameters, as a pes.System.

The inner problem of PAPER.md experiments 3 and 4. One inner step is one minibatch of SGD with
momentum, fused into a single jittable function (forward, backward, update, objective)::

    x, y  = B examples drawn with replacement from the training set (indices from the step key)
    g     = grad of cross-entropy(MLP(params, x; dropout masks from the step key), y)
    m_i   <- mu_i m_i + g_i,    p_i <- p_i - lr_i m_i       (every parameter tensor i)

with ``lr_i``, ``mu_i`` and the keep probabilities of the dropout masks given by the subclass's
``hyperparameters(theta, t)``. The state is (params, momentum, step). The step's loss ``l_t`` is
the chosen objective measured at that step:

* ``'train_loss'``: the cross-entropy of the step's training minibatch (computed in the same
  forward pass as the gradient, before the update; with dropout, on the dropped-out network);
* ``'valid_loss'``: cross-entropy of the updated network (no dropout) on a validation minibatch
  of B examples drawn from the step key;
* ``'valid_accuracy'``: minus the accuracy of the updated network on that validation
  minibatch (non-differentiable: for ES-type estimators only).

So the meta-objective ``mean_t l_t`` is the mean training loss over the run, the mean
validation loss, or minus the mean validation accuracy. A run that diverges (inf/nan loss) is
scored ``loss_cap`` per step (cross-entropy objectives also never exceed it), keeping ES
estimates finite. Weights start He-normal (std sqrt(2 / fan_in)), biases and momentum at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pes.data import Dataset
from pes.system import step_key

OBJECTIVES = ("train_loss", "valid_loss", "valid_accuracy")


class Hyperparameters(NamedTuple):
    """What one inner step uses, from theta and t.

    learning_rates: one scalar per parameter tensor, in the order (W1, b1, W2, b2, ...).
    momenta: one scalar per parameter tensor, same order (0 = plain SGD).
    keep: one keep probability per hidden layer for inverted dropout, or None for no dropout.
    """

    learning_rates: tuple[jax.Array, ...]
    momenta: tuple[jax.Array, ...]
    keep: tuple[jax.Array, ...] | None = None


class MLPState(NamedTuple):
    """params, momentum: tuples (W1, b1, W2, b2, ...); W_i [fan_in, fan_out], b_i [fan_out].
    step: int32 scalar, inner steps taken in this episode."""

    params: tuple[jax.Array, ...]
    momentum: tuple[jax.Array, ...]
    step: jax.Array


class StepDraw(NamedTuple):
    """One step's random draws: train_idx [B], valid_idx [B] int32 row indices; mask_uniforms:
    per hidden layer [B, width] uniforms on [0, 1), or None without dropout."""

    train_idx: jax.Array
    valid_idx: jax.Array
    mask_uniforms: tuple[jax.Array, ...] | None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; logits [B, C] float, labels [B] int."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))


def apply_mlp(params: Sequence[jax.Array], x: jax.Array,
              masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """Logits of the ReLU MLP. params (W1, b1, ...); x [B, d]; masks: per hidden layer [B, h]
    multipliers (already divided by the keep probability) or None."""
    num_layers = len(params) // 2
    h = x
    for i in range(num_layers - 1):
        h = jax.nn.relu(h @ params[2 * i] + params[2 * i + 1])
        if masks is not None:
            h = h * masks[i]
    return h @ params[-2] + params[-1]


class MLPSystem:
    """Base class: an MLP trained by SGD with momentum on (images, labels) arrays.

    Subclasses define ``hyperparameters(theta, t) -> Hyperparameters`` (and usually
    ``defaults``, ``sample_theta``). The data are held as jnp arrays (closed over by jitted
    code, so build one task object and reuse it).

    Args:
      data: a pes.data.Dataset (train_images/labels, valid_images/labels, test_images/labels;
        images float32 [n, d], labels int32 [n]).
      hidden_sizes: widths of the hidden layers; the input width comes from the data, the
        output width is ``num_classes``.
      batch_size: B, examples per training (and validation) minibatch.
      horizon: T, inner steps per episode.
      objective: one of OBJECTIVES (see the module docstring).
      loss_cap: per-step score of a diverged run, and upper clip of cross-entropy objectives.
    """

    def __init__(self, data: Any, *, hidden_sizes: Sequence[int], batch_size: int = 100,
                 horizon: int = 1000, objective: str = "train_loss",
                 loss_cap: float = 2 * math.log(10.0)):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
        for name, value in (("batch_size", batch_size), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={hidden_sizes!r} must be a non-empty list of "
                             "positive widths")
        self.objective = objective
        self.batch_size = int(batch_size)
        self.horizon = int(horizon)
        self.loss_cap = float(loss_cap)
        self.data_name = getattr(data, "name", "custom")
        arrays = {}
        for split in ("train", "valid", "test"):
            x = np.asarray(getattr(data, f"{split}_images"), np.float32)
            y = np.asarray(getattr(data, f"{split}_labels"), np.int32)
            if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
                raise ValueError(f"data.{split}_images {x.shape} / {split}_labels {y.shape}: "
                                 "need [n, d] images and [n] labels, n > 0")
            arrays[split] = (x, y)
        self.num_classes = int(getattr(data, "num_classes", 10))
        for split, (_, y) in arrays.items():
            if y.min() < 0 or y.max() >= self.num_classes:
                raise ValueError(f"data.{split}_labels must lie in 0..{self.num_classes - 1}; "
                                 f"found {y.min()}..{y.max()}")
        arrays = {k: (jnp.asarray(x), jnp.asarray(y)) for k, (x, y) in arrays.items()}
        self.train_images, self.train_labels = arrays["train"]
        self.valid_images, self.valid_labels = arrays["valid"]
        self.test_images, self.test_labels = arrays["test"]
        self.layer_sizes = (int(self.train_images.shape[1]), *map(int, hidden_sizes),
                            self.num_classes)
        self._eval_one = jax.jit(self._evaluate)
        self._eval_many = jax.jit(jax.vmap(self._evaluate))

    # ------------------------------------------------------------------ subclass interface

    def hyperparameters(self, theta: jax.Array, t: jax.Array) -> Hyperparameters:
        raise NotImplementedError

    @property
    def num_tensors(self) -> int:
        """Parameter tensors (a weight and a bias per layer)."""
        return 2 * (len(self.layer_sizes) - 1)

    @property
    def num_hidden(self) -> int:
        return len(self.layer_sizes) - 2

    def tensor_names(self) -> tuple[str, ...]:
        return tuple(f"{kind}{i + 1}" for i in range(len(self.layer_sizes) - 1)
                     for kind in ("W", "b"))

    # ------------------------------------------------------------------------- the System

    def init(self, key: jax.Array) -> MLPState:
        """He-normal weights (std sqrt(2 / fan_in)) from one normal draw, zero biases and
        momentum, step 0."""
        shapes = list(zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True))
        z = jax.random.normal(key, (sum(a * b for a, b in shapes),), jnp.float32)
        params, start = [], 0
        for fan_in, fan_out in shapes:
            w = z[start:start + fan_in * fan_out].reshape(fan_in, fan_out)
            params += [w * math.sqrt(2.0 / fan_in), jnp.zeros((fan_out,), jnp.float32)]
            start += fan_in * fan_out
        params = tuple(params)
        momentum = tuple(jnp.zeros_like(p) for p in params)
        return MLPState(params, momentum, jnp.zeros((), jnp.int32))

    def draw(self, key: jax.Array, dropout: bool = False) -> StepDraw:
        """All of one step's randomness from one call to the generator (one threefry hash,
        which keeps compile and run times down): minibatch indices into the training and
        validation sets, drawn uniformly with replacement (``bits % n``: the bias, n / 2^32,
        is below 1e-5), and with ``dropout`` the uniforms of the masks."""
        b = self.batch_size
        widths = self.layer_sizes[1:-1]
        n_bits = b * (2 + (sum(widths) if dropout else 0))
        bits = jax.random.bits(key, (n_bits,), jnp.uint32)
        train_idx = (bits[:b] % jnp.uint32(self.train_images.shape[0])).astype(jnp.int32)
        valid_idx = (bits[b:2 * b] % jnp.uint32(self.valid_images.shape[0])).astype(jnp.int32)
        uniforms = None
        if dropout:
            # The top 23 bits as the mantissa of a float in [1, 2), minus 1: uniform on [0, 1).
            u = jax.lax.bitcast_convert_type((bits[2 * b:] >> 9) | jnp.uint32(0x3F800000),
                                             jnp.float32) - 1.0
            cuts = np.cumsum((0,) + tuple(widths)) * b
            uniforms = tuple(u[lo:hi].reshape(b, w) for lo, hi, w in
                             zip(cuts[:-1], cuts[1:], widths, strict=True))
        return StepDraw(train_idx, valid_idx, uniforms)

    def minibatch(self, key: jax.Array, split: str = "train") -> tuple[jax.Array, jax.Array]:
        """The (images [B, d], labels [B]) of ``split`` that a step with ``key`` uses."""
        draw = self.draw(key)
        if split == "train":
            return self.train_images[draw.train_idx], self.train_labels[draw.train_idx]
        if split == "valid":
            return self.valid_images[draw.valid_idx], self.valid_labels[draw.valid_idx]
        raise ValueError(f"split={split!r} must be 'train' or 'valid'")

    def _score(self, loss: jax.Array) -> jax.Array:
        return jnp.where(jnp.isfinite(loss), jnp.minimum(loss, self.loss_cap), self.loss_cap)

    def step(self, state: MLPState, theta, t, key) -> tuple[MLPState, jax.Array]:
        """One fused SGD-with-momentum step and the objective measured at it."""
        hp = self.hyperparameters(theta, t)
        draw = self.draw(key, dropout=hp.keep is not None)
        x, y = self.train_images[draw.train_idx], self.train_labels[draw.train_idx]
        masks = None
        if hp.keep is not None:
            masks = [(u < p).astype(jnp.float32) / p
                     for u, p in zip(draw.mask_uniforms, hp.keep, strict=True)]
        train_loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(apply_mlp(p, x, masks), y))(state.params)
        momentum = tuple(mu * m + g for mu, m, g in
                         zip(hp.momenta, state.momentum, grads, strict=True))
        params = tuple(p - lr * m for lr, p, m in
                       zip(hp.learning_rates, state.params, momentum, strict=True))
        new_state = MLPState(params, momentum, state.step + 1)
        if self.objective == "train_loss":
            return new_state, self._score(train_loss)
        xv, yv = self.valid_images[draw.valid_idx], self.valid_labels[draw.valid_idx]
        logits = apply_mlp(params, xv)
        if self.objective == "valid_loss":
            return new_state, self._score(cross_entropy(logits, yv))
        acc = accuracy(logits, yv)
        return new_state, jnp.where(jnp.all(jnp.isfinite(logits)), -acc, 0.0)

    # ------------------------------------------------------------------------- evaluation

    def _full_metrics(self, params, x, y, chunk: int = 2000) -> tuple[jax.Array, jax.Array]:
        """Loss and accuracy of ``params`` on a whole split, in chunks of ``chunk`` rows."""
        n = x.shape[0]
        losses, correct = [], []
        for start in range(0, n, chunk):
            logits = apply_mlp(params, x[start:start + chunk])
            yy = y[start:start + chunk]
            logp = jax.nn.log_softmax(logits)
            losses.append(-jnp.sum(jnp.take_along_axis(logp, yy[:, None], axis=1)))
            correct.append(jnp.sum(jnp.argmax(logits, axis=1) == yy))
        loss = sum(losses) / n
        acc = sum(correct) / n
        finite = jnp.isfinite(loss)
        return self._score(loss), jnp.where(finite, acc, 0.0).astype(jnp.float32)

    def episode(self, theta, key: jax.Array) -> tuple[MLPState, jax.Array]:
        """One unperturbed episode of T steps: (final state, losses [T]).

        Same keys, hence the same losses, as ``pes.unroll(self, theta, key, T)``, but the
        final state is the trained network (unroll resets it to a fresh one at t = T).
        """
        k_init, k_steps = jax.random.split(key)

        def body(state, t):
            k_step, _ = step_key(k_steps, t)
            return self.step(state, theta, t, k_step)

        return jax.lax.scan(body, self.init(k_init), jnp.arange(self.horizon, dtype=jnp.int32))

    def _evaluate(self, theta, key) -> dict[str, jax.Array]:
        state, losses = self.episode(theta, key)
        valid_loss, valid_acc = self._full_metrics(state.params, self.valid_images,
                                                   self.valid_labels)
        test_loss, test_acc = self._full_metrics(state.params, self.test_images,
                                                 self.test_labels)
        return {
            "meta_loss": losses.mean(),
            "final_valid_loss": valid_loss,
            "final_valid_accuracy": valid_acc,
            "final_test_loss": test_loss,
            "final_test_accuracy": test_acc,
        }

    def evaluate(self, theta, key: jax.Array) -> dict[str, jax.Array]:
        """One full unperturbed episode (T steps from init) at theta.

        Returns float scalars: 'meta_loss' (mean per-step objective, the meta-objective the
        estimators minimise), 'final_valid_loss' / 'final_valid_accuracy' and
        'final_test_loss' / 'final_test_accuracy' of the final network on the whole split.
        """
        return self._eval_one(jnp.asarray(theta, jnp.float32), key)

    def evaluate_many(self, thetas, keys: jax.Array, *,
                      chunk_size: int = 8) -> dict[str, np.ndarray]:
        """evaluate() for each row of ``thetas`` [n, ...], ``chunk_size`` runs vmapped at once.

        keys: one PRNG key shared by every run (the same initialisation and minibatches:
        common random numbers, smooth heatmaps), or a stack of n keys, one per run.
        Returns numpy arrays [n] per metric.
        """
        thetas = jnp.asarray(thetas, jnp.float32)
        n = thetas.shape[0]
        if n == 0:
            raise ValueError("thetas is empty")
        keys = jnp.asarray(keys)
        one_key_ndim = 0 if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) else 1
        if keys.ndim == one_key_ndim:
            keys = jnp.broadcast_to(keys, (n,) + keys.shape)
        elif keys.shape[0] != n:
            raise ValueError(f"keys has {keys.shape[0]} rows for {n} thetas")
        chunk_size = max(1, min(int(chunk_size), n))
        out: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, chunk_size):
            th, ks = thetas[start:start + chunk_size], keys[start:start + chunk_size]
            rows = th.shape[0]
            if rows < chunk_size:  # pad to keep one compiled shape
                th = jnp.concatenate([th, jnp.repeat(th[-1:], chunk_size - rows, axis=0)])
                ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], chunk_size - rows, axis=0)])
            for name, value in self._eval_many(th, ks).items():
                out.setdefault(name, []).append(np.asarray(value)[:rows])
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(data={self.data_name!r}, layers={self.layer_sizes}, "
                f"batch_size={self.batch_size}, horizon={self.horizon}, "
                f"objective={self.objective!r})")


def synthetic_data(num_train: int = 1000, num_valid: int = 200, num_test: int = 200,
                   dim: int = 784, num_classes: int = 10, noise: float = 1.0,
                   seed: int = 0) -> Any:
    """A small learnable stand-in for a pes.data.Dataset (for tests and demos without data):
    Gaussian clusters around random class means, squashed into [0, 1]."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (num_classes, dim))

    def make(n):
        y = rng.integers(0, num_classes, n).astype(np.int32)
        x = means[y] + noise * rng.normal(0.0, 1.0, (n, dim))
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32), y

    (xt, yt), (xv, yv), (xs, ys) = make(num_train), make(num_valid), make(num_test)
    return Dataset("synthetic", xt, yt, xv, yv, xs, ys, source=None,  # type: ignore[arg-type]
                   image_shape=(dim, 1), num_classes=num_classes)
