"""A user's own training loop (model, loss, minibatches, optax optimizer) as a pes.System.

One inner step is one optimizer step on one minibatch, with the optimizer's hyperparameters
set from theta::

    batch          = batches(key, t)                           # the step's key, unchanged
    l, g           = value_and_grad(loss)(params, batch, fold_in(key, 1))
    hp             = hyperparameters(theta, t)                 # e.g. {"learning_rate": ...}
    params, opt    = optimizer.update(g, opt with hp) applied to params
    l_t            = the objective at this step (below), capped by ``loss_cap``

The state is :class:`LoopState` (the trainable arrays, the other arrays, the optimizer state);
a step never changes the shapes or dtypes in it. ``init(key)`` builds the model with the
user's ``init(key)``: a pytree of arrays, an Equinox module or a Flax NNX module. What is not
an array (activation functions, an NNX graph definition) is split off once, at construction,
and put back around ``loss``; floating arrays (for NNX: the ``nnx.Param`` variables) are
trained, other arrays (integer buffers, NNX RNG state, batch statistics) are carried unchanged.

The objective, whose mean over the T steps of an episode is the meta-objective:

* ``"train_loss"``: ``l_t`` is the training minibatch's loss before the update.
* :class:`Validation` ``(x, y, batch_size, every=n)``: the loss of the updated parameters on a
  validation minibatch, measured after updates n, 2n, ..., T (``(t + 1) % n == 0``) and
  counted n times there, 0 on the other steps: ``l_t = n * val_t`` or ``0``. So
  ``mean_t l_t`` is the mean of the T / n validation losses (n must divide T).
  ``every="final"`` (n = T) makes it the final validation loss: ``l_t = where(t == T - 1,
  T * val, 0)``; a truncated estimator then sees the signal only in the last window.
* a callable ``objective(params, t, key)``: any scalar of the updated model (``key`` is the
  step's key, as ``batches`` got it).

``loss_cap``: a learning rate that makes training diverge gives huge but finite losses
(1e21-1e35 were seen), or inf/nan. With ``loss_cap=c`` every per-step objective is
``min(l_t, c)``, and ``c`` where it is not finite: a diverged run scores c per step and ES
estimates stay finite and bounded. Pick c above any loss a sane run has (the untrained
loss, e.g. 2 log 10 for 10 classes, is a good value); None (the default) keeps raw losses.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes.system import step_key

PyTree = Any

_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


class LoopState(NamedTuple):
    """params: the trainable arrays (the model's pytree with None at the other leaves);
    buffers: the other arrays, carried unchanged; opt_state: the optax state."""

    params: PyTree
    buffers: PyTree
    opt_state: PyTree


# --------------------------------------------------------------------------- data helpers


def batches_from_arrays(*arrays: Any, batch_size: int) -> Callable[[jax.Array, Any], tuple]:
    """``(key, t) -> tuple of minibatches``: ``batch_size`` rows drawn uniformly with
    replacement (the same rows of every array) from arrays with a common first axis n.

    ``batches_from_arrays(x, y, batch_size=64)(key, t)`` is ``(x[idx], y[idx])``, idx [64]
    from ``key`` only (t is ignored). The arrays are copied to the device once.
    """
    if not arrays:
        raise ValueError("batches_from_arrays needs at least one array")
    batch_size = _positive_int("batch_size", batch_size)
    data = tuple(jnp.asarray(a) for a in arrays)
    n = data[0].shape[0] if data[0].ndim else 0
    for i, a in enumerate(data):
        if a.ndim == 0 or a.shape[0] != n or n == 0:
            shapes = [tuple(a.shape) for a in data]
            raise ValueError(f"batches_from_arrays: array {i} has shape {tuple(a.shape)}; "
                             f"every array needs the same non-empty first axis (got {shapes})")

    def batches(key: jax.Array, t: Any = 0) -> tuple:
        idx = jax.random.randint(key, (batch_size,), 0, n)
        return tuple(a[idx] for a in data)

    batches.num_examples = n  # type: ignore[attr-defined]
    return batches


class Validation:
    """Objective: loss on validation minibatches of ``batch_size`` rows of (x, y) (drawn with
    replacement), after every ``every``-th update, or ``every="final"`` after the last one.

    See the module docstring for the per-step loss (``n * val`` on measured steps, 0 else).
    ``loss``: ``(params, batch, key) -> scalar`` used on the validation batch; default the
    training loop's ``loss``. The batch is ``(x[idx], y[idx])`` with idx from
    ``fold_in(step key, 2)``, independent of the training minibatch.
    """

    def __init__(self, x: Any, y: Any, batch_size: int = 128, every: int | str = 1,
                 loss: Callable | None = None):
        if every != "final":
            every = _positive_int("Validation every", every)
        self.every = every
        self.loss = loss
        self.sample = batches_from_arrays(x, y, batch_size=batch_size)

    def period(self, horizon: int) -> int:
        """n for a run of ``horizon`` steps; n must divide the horizon."""
        n = horizon if self.every == "final" else int(self.every)
        if horizon % n:
            raise ValueError(f"Validation every={n} must divide horizon={horizon}, so that the "
                             "mean per-step loss is the mean validation loss")
        return n

    def __repr__(self) -> str:
        return f"Validation(every={self.every!r}, examples={self.sample.num_examples})"


# ------------------------------------------------------------------- hyperparameter helpers


def log_linear(log_start: Any, log_end: Any, t: Any, horizon: int) -> jax.Array:
    """exp of the line from ``log_start`` (t = 0) to ``log_end`` (t = horizon):
    ``exp(a + (b - a) t / T)``, a geometric interpolation between the two values."""
    frac = jnp.asarray(t, jnp.float32) / horizon
    return jnp.exp(log_start + (log_end - log_start) * frac)


def inverse_time(log_lr0: Any, log_decay: Any, t: Any, horizon: int) -> jax.Array:
    """``lr0 / (1 + t / T) ** decay`` with ``lr0 = exp(log_lr0)``, ``decay = exp(log_decay)``
    (the PES paper's schedule; at t = T it is lr0 / 2**decay)."""
    lr0, decay = jnp.exp(log_lr0), jnp.exp(log_decay)
    return lr0 * jnp.exp(-decay * jnp.log1p(t / horizon))


def scale_by_layer(scales: Any) -> optax.GradientTransformation:
    """Multiply the update's i-th leaf (``jax.tree_util.tree_leaves`` order) by ``scales[i]``.

    For per-layer learning rates put it under ``optax.inject_hyperparams`` after a base
    optimizer with learning rate 1 and return ``{"scales": jnp.exp(theta[...])}`` (shape
    [number of trainable leaves]) from ``hyperparameters``::

        optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
                    optax.inject_hyperparams(pes.scale_by_layer)(scales=jnp.ones(n)))
    """

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        s = jnp.asarray(scales)
        if s.shape != (len(leaves),):
            raise ValueError(f"scale_by_layer: scales has shape {s.shape}; it needs one scale "
                             f"per trainable leaf, shape ({len(leaves)},)")
        leaves = [(s[i] * u).astype(u.dtype) for i, u in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ------------------------------------------------------------------------ model handling


def _is_nnx(model: Any) -> bool:
    if "flax" not in sys.modules:  # never import flax for a user who does not use it
        return False
    from flax import nnx

    return isinstance(model, nnx.Module)


class _Layout:
    """How to take a model apart into (params, buffers) arrays and put it back.

    Built from the model ``init`` returns while tracing; holds only static things (the tree
    structure, non-array leaves, an NNX graph definition)."""

    def __init__(self, model: Any):
        self.nnx = _is_nnx(model)
        if self.nnx:
            from flax import nnx

            self.graphdef, _, _ = nnx.split(model, nnx.Param, ...)
            return
        leaves, self.treedef = jax.tree_util.tree_flatten(model)
        self.kinds = tuple(_leaf_kind(x) for x in leaves)
        self.static = tuple(None if k != "static" else x for k, x in zip(self.kinds, leaves,
                                                                          strict=True))

    def split(self, model: Any) -> tuple[PyTree, PyTree]:
        if self.nnx:
            from flax import nnx

            _, params, buffers = nnx.split(model, nnx.Param, ...)
            return params, buffers
        leaves = jax.tree_util.tree_leaves(model)
        pick = lambda kind: jax.tree_util.tree_unflatten(self.treedef, [
            jnp.asarray(x) if k == kind else None
            for k, x in zip(self.kinds, leaves, strict=True)])
        return pick("param"), pick("buffer")

    def merge(self, params: PyTree, buffers: PyTree) -> Any:
        if self.nnx:
            from flax import nnx

            return nnx.merge(self.graphdef, params, buffers)
        none = lambda x: x is None
        p = jax.tree_util.tree_leaves(params, is_leaf=none)
        b = jax.tree_util.tree_leaves(buffers, is_leaf=none)
        leaves = [pi if k == "param" else bi if k == "buffer" else s
                  for k, pi, bi, s in zip(self.kinds, p, b, self.static, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _leaf_kind(x: Any) -> str:
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return "param" if jnp.issubdtype(x.dtype, jnp.inexact) else "buffer"
    return "static"


def _inject_states(opt_state: PyTree) -> list:
    return [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, _INJECT_STATES))
        if isinstance(s, _INJECT_STATES)]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


# ---------------------------------------------------------------------------- the System


class TrainingLoop:
    """A pes.System from a training loop; theta sets the optimizer's hyperparameters.

    Args:
      init: ``init(key) -> model``: a pytree of arrays, an Equinox module or a Flax NNX module.
      loss: ``loss(model, batch, key) -> scalar`` (float, shape ()).
      batches: ``batches(key, t) -> batch`` (any pytree), e.g. :func:`batches_from_arrays`.
      optimizer: an optax transformation built with ``optax.inject_hyperparams`` (alone or
        inside ``optax.chain``), e.g. ``optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)``;
        the values given there are placeholders for those ``hyperparameters`` returns.
      hyperparameters: ``hyperparameters(theta, t) -> {name: value}`` for step t (int32 scalar);
        every name must be an injected hyperparameter of the optimizer (names the optimizer has
        but the dict leaves out keep their constructor values). See :func:`log_linear`,
        :func:`inverse_time` and :func:`scale_by_layer` for schedules and per-layer rates.
      horizon: T, optimizer steps per episode (a fresh model after T steps).
      objective: ``"train_loss"``, a :class:`Validation`, or ``objective(model, t, key)``
        measured on the updated model (see the module docstring for the per-step losses).
      loss_cap: None, or c: per-step losses above c or not finite count as c.
    """

    def __init__(self, *, init: Callable, loss: Callable, batches: Callable,
                 optimizer: optax.GradientTransformation, hyperparameters: Callable,
                 horizon: int, objective: Any = "train_loss", loss_cap: float | None = None):
        for name, fn in (("init", init), ("loss", loss), ("batches", batches),
                         ("hyperparameters", hyperparameters)):
            if not callable(fn):
                raise TypeError(f"TrainingLoop {name}={fn!r} must be callable")
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"TrainingLoop optimizer={optimizer!r} must be an optax "
                            "GradientTransformation, e.g. "
                            "optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)")
        self.horizon = _positive_int("TrainingLoop horizon", horizon)
        if not (objective == "train_loss" or isinstance(objective, Validation)
                or callable(objective)):
            raise ValueError(f"TrainingLoop objective={objective!r} must be 'train_loss', a "
                             "pes.Validation or a callable objective(model, t, key)")
        self._period = (objective.period(self.horizon) if isinstance(objective, Validation)
                        else None)
        if loss_cap is not None and not (isinstance(loss_cap, int | float)
                                         and math.isfinite(loss_cap)):
            raise ValueError(f"TrainingLoop loss_cap={loss_cap!r} must be a finite number or "
                             "None")
        self._init, self._loss, self.batches = init, loss, batches
        self.optimizer, self.hyperparameters = optimizer, hyperparameters
        self.objective, self.loss_cap = objective, loss_cap
        self._probe()

    # ------------------------------------------------------------------ construction checks

    def _probe(self) -> None:
        """Trace init, the optimizer's init and one loss abstractly (nothing runs): keep the
        model's layout and the injected hyperparameters; reject a bad loss or optimizer."""
        box: dict[str, Any] = {}

        def build(key):
            model = self._init(key)
            box["layout"] = layout = _Layout(model)
            params, buffers = layout.split(model)
            if not jax.tree_util.tree_leaves(params):
                raise ValueError("TrainingLoop: the model init(key) returned has no "
                                 "floating-point arrays to train")
            opt_state = self.optimizer.init(params)
            box["names"] = sorted({k for s in _inject_states(opt_state) for k in s.hyperparams})
            out = self._loss(layout.merge(params, buffers), self.batches(key, 0), key)
            return params, buffers, opt_state, out

        key = jax.random.PRNGKey(0)
        _, _, opt_state, out = _traced("init(key), optimizer.init or loss", build, key)
        self._layout = box["layout"]
        self.hyperparameter_names = tuple(box["names"])
        if not self.hyperparameter_names:
            raise TypeError("TrainingLoop optimizer has no injected hyperparameters: build it "
                            "with optax.inject_hyperparams, e.g. "
                            "optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)")
        _check_scalar("loss(model, batch, key)", out)
        self._hp_template = {k: v for s in _inject_states(opt_state)
                             for k, v in s.hyperparams.items()}

    # ------------------------------------------------------------------------- the System

    def init(self, key: jax.Array) -> LoopState:
        """A fresh model from ``init(key)`` and a fresh optimizer state."""
        params, buffers = self._layout.split(self._init(key))
        return LoopState(params, buffers, self.optimizer.init(params))

    def model(self, state: LoopState) -> Any:
        """The user's model (pytree, Equinox or NNX module) held in ``state``."""
        return self._layout.merge(state.params, state.buffers)

    def step(self, state: LoopState, theta: PyTree, t: jax.Array,
             key: jax.Array) -> tuple[LoopState, jax.Array]:
        """One optimizer step on ``batches(key, t)`` and the objective measured at it."""
        opt_state = self._set_hyperparameters(state.opt_state, theta, t)
        batch = self.batches(key, t)
        train_loss, grads = jax.value_and_grad(
            lambda p: self._loss(self._layout.merge(p, state.buffers), batch,
                                 jax.random.fold_in(key, 1)))(state.params)
        _check_scalar("loss(model, batch, key)", train_loss)
        updates, opt_state = self.optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = LoopState(params, state.buffers, opt_state)
        if self.objective == "train_loss":
            return new_state, self._cap(train_loss)
        model = self._layout.merge(params, state.buffers)
        if not isinstance(self.objective, Validation):
            value = self.objective(model, t, key)
            _check_scalar("objective(model, t, key)", value)
            return new_state, self._cap(value)
        return new_state, self._validation(model, t, key)

    def _validation(self, model: Any, t: jax.Array, key: jax.Array) -> jax.Array:
        """n * (capped validation loss) after every n-th update, 0 on the other steps."""
        v, n = self.objective, self._period
        vloss = v.loss or self._loss
        k_val = jax.random.fold_in(key, 2)

        def measure():
            value = vloss(model, v.sample(k_val, t), jax.random.fold_in(k_val, 1))
            _check_scalar("Validation loss(model, batch, key)", value)
            return (n * self._cap(value)).astype(jnp.float32)

        return jax.lax.cond((t + 1) % n == 0, measure, lambda: jnp.zeros((), jnp.float32))

    def _cap(self, loss: jax.Array) -> jax.Array:
        if self.loss_cap is None:
            return loss
        cap = jnp.asarray(self.loss_cap, loss.dtype)
        return jnp.where(jnp.isfinite(loss), jnp.minimum(loss, cap), cap)

    def _set_hyperparameters(self, opt_state: PyTree, theta: PyTree, t: jax.Array) -> PyTree:
        hp = self.hyperparameters(theta, t)
        if not isinstance(hp, Mapping):
            raise TypeError(f"hyperparameters(theta, t) returned {type(hp).__name__}; it must "
                            f"return a dict of {list(self.hyperparameter_names)}")
        unknown = sorted(set(hp) - set(self.hyperparameter_names))
        if unknown:
            raise ValueError(f"hyperparameters(theta, t) returned {unknown}, which the optimizer "
                             f"does not have; its injected hyperparameters are "
                             f"{list(self.hyperparameter_names)}")
        values = {}
        for name, value in hp.items():
            like = self._hp_template[name]
            value = jnp.asarray(value)
            if value.shape != like.shape:
                raise ValueError(f"hyperparameters(theta, t)[{name!r}] has shape {value.shape}; "
                                 f"the optimizer's {name} has shape {like.shape}")
            values[name] = value.astype(like.dtype)

        def put(s):
            if not isinstance(s, _INJECT_STATES):
                return s
            return s._replace(hyperparams={k: values.get(k, v) for k, v in s.hyperparams.items()})

        return jax.tree_util.tree_map(put, opt_state,
                                      is_leaf=lambda s: isinstance(s, _INJECT_STATES))

    # --------------------------------------------------------------------------- results

    def episode(self, theta: PyTree, key: jax.Array) -> tuple[LoopState, jax.Array]:
        """One unperturbed episode of T steps: (final state, losses [T]); the same keys, hence
        the same losses, as ``pes.unroll(self, theta, key, T)``, but the final state is the
        trained model (``self.model(state)``) rather than a reset one."""
        k_init, k_steps = jax.random.split(key)

        def body(state, t):
            return self.step(state, theta, t, step_key(k_steps, t)[0])

        return jax.lax.scan(body, self.init(k_init), jnp.arange(self.horizon, dtype=jnp.int32))

    def __repr__(self) -> str:
        return (f"TrainingLoop(horizon={self.horizon}, objective={self.objective!r}, "
                f"hyperparameters={list(self.hyperparameter_names)}, loss_cap={self.loss_cap})")


def _traced(what: str, fn: Callable, *args: Any) -> Any:
    """jax.eval_shape(fn, *args), naming ``what`` when the user's code cannot be traced."""
    try:
        return jax.eval_shape(fn, *args)
    except (TypeError, ValueError) as err:
        if str(err).startswith("TrainingLoop"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise type(err)(f"TrainingLoop: tracing {what} failed: {first}") from err


def _check_scalar(what: str, value: Any) -> None:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"TrainingLoop: {what} must return a float scalar; got "
                         f"shape {shape} dtype {dtype}")
