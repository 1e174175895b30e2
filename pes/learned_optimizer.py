"""A per-parameter MLP learned optimizer, as an optax transformation.

Every parameter element is updated by the same small MLP (the optimizer's weights, theta),
from features of that element's history. For a gradient tensor ``g`` and its parameter ``p``
at step ``t`` (counting from 0), with momenta ``m_k <- b_k m_k + (1 - b_k) g`` for each decay
``b_k`` in ``momentum_decays`` and a second moment ``v <- c v + (1 - c) g^2`` (``c`` =
``second_moment_decay``), the per-element inputs are::

    g, p, m_1 .. m_K, m_1 / sqrt(v + eps) .. m_K / sqrt(v + eps), 1 / sqrt(v + eps)

each divided by its root mean square over the tensor (so every feature is O(1) whatever the
scale of the problem), followed by ``tanh(t / s)`` for each time scale ``s`` in
``time_scales`` (the same for every element). The MLP (ReLU hidden layers, a linear output
layer plus a linear skip connection from the inputs) maps these F = 3 + 2K + len(time_scales)
inputs x to two outputs, a direction ``d`` and a log-magnitude ``a``::

    (d, a) = MLP(x) + x @ S,        u = d * exp(A tanh(a / A) * exp_scale) * step_scale

and ``u`` is added to ``p``. ``A`` = ``max_log_magnitude`` softly limits the log-magnitude
(about the identity for |a| well below A): without it a meta-trained MLP can extrapolate to
a ~ 20 on a few outlying elements, steps of 1e5 and more, and ES cannot recover from an
optimizer that makes every inner problem diverge (the capped meta-loss is flat there).
The initial weights (:meth:`LearnedOptimizer.init_weights`) are
random for the MLP, with a small output layer, and S sends minus the (normalised)
``m / sqrt(v)`` of the decay nearest 0.9 to ``d``: an untrained optimizer takes small Adam-like
steps of about ``step_scale`` per element, and meta-training decides their direction and
size. Without the skip's prior a random MLP's first improvement on classifiers is to shrink
every weight towards the uniform prediction (loss log 10), a plateau ES escapes slowly.

The optimizer's weights are a :class:`Weights` (``layers``: ``((W_1, b_1), ..., (W_L,
b_L))`` with ``W_i`` [fan_in, fan_out]; ``skip``: S [F, 2]); :meth:`LearnedOptimizer.flatten`
/ :meth:`unflatten` convert them to and from one float32 vector (the theta the estimators
see). :func:`save` writes the architecture
and weights to one ``.npz`` file and :func:`load` returns the ready optax transformation::

    tx = pes.learned_optimizer.load("learned_optimizer.npz")
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    params = optax.apply_updates(params, updates)

:func:`pretrained_path` is the file of the optimizer shipped with the package (meta-trained by
PES on 8x8 Fashion-MNIST classifiers; docs/results/learned-optimizer).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

FORMAT = "pes.learned_optimizer"
FORMAT_VERSION = 1
EPS = 1e-8
# The untrained output layer is this much smaller than LeCun's, so the random MLP adds only
# about 0.1 to the skip's Adam-like direction and log-magnitude.
OUTPUT_INIT_SCALE = 0.1


@dataclass(frozen=True)
class LearnedOptimizer:
    """The architecture (not the weights) of the learned optimizer.

    hidden_sizes: widths of the MLP's hidden layers.
    momentum_decays: decay rates b_k of the momenta fed to the MLP.
    second_moment_decay: decay c of the mean squared gradient v.
    time_scales: s of the step features tanh(t / s).
    step_scale, exp_scale: the constants of u = d * exp(A tanh(a / A) * exp_scale) *
      step_scale.
    max_log_magnitude: A, the soft limit of the log-magnitude; None: no limit.
    """

    hidden_sizes: tuple[int, ...] = (32, 32)
    momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99)
    second_moment_decay: float = 0.999
    time_scales: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
    step_scale: float = 3e-4
    exp_scale: float = 1.0
    max_log_magnitude: float | None = 4.0
    _shapes: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "momentum_decays", tuple(float(b) for b in self.momentum_decays))
        object.__setattr__(self, "time_scales", tuple(float(s) for s in self.time_scales))
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes={self.hidden_sizes} must be positive widths")
        if not self.momentum_decays or any(not 0.0 <= b < 1.0 for b in self.momentum_decays):
            raise ValueError(f"momentum_decays={self.momentum_decays} must be a non-empty list "
                             "of rates in [0, 1)")
        if not 0.0 <= self.second_moment_decay < 1.0:
            raise ValueError(f"second_moment_decay={self.second_moment_decay} must be in [0, 1)")
        a = self.max_log_magnitude
        if a is not None and not (isinstance(a, int | float) and math.isfinite(a) and a > 0):
            raise ValueError(f"max_log_magnitude={a!r} must be a finite number > 0 or None")
        if any(not s > 0 for s in self.time_scales):
            raise ValueError(f"time_scales={self.time_scales} must be positive")
        for name in ("step_scale", "exp_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")
        sizes = (self.num_features, *self.hidden_sizes, 2)
        object.__setattr__(self, "_shapes", tuple(
            ((a, b), (b,)) for a, b in zip(sizes[:-1], sizes[1:], strict=True)))

    # ------------------------------------------------------------------------- weights

    @property
    def num_features(self) -> int:
        """F: g, p, the momenta, the momenta over sqrt(v), 1/sqrt(v), the time features."""
        return 3 + 2 * len(self.momentum_decays) + len(self.time_scales)

    @property
    def skip_shape(self) -> tuple[int, int]:
        return (self.num_features, 2)

    @property
    def num_weights(self) -> int:
        """Length of the flat weight vector (theta)."""
        return sum(a * b + b for (a, b), _ in self._shapes) + 2 * self.num_features

    def init_weights(self, key: jax.Array) -> Weights:
        """LeCun-normal layers (std 1/sqrt(fan_in)), the output layer's scaled by
        OUTPUT_INIT_SCALE, zero biases; the skip sends -m_k / sqrt(v) (normalised, k the
        decay nearest 0.9) to the direction, so the untrained optimizer takes small Adam-like
        steps."""
        keys = jax.random.split(key, len(self._shapes))
        last = len(self._shapes) - 1
        layers = tuple((jax.random.normal(k, w, jnp.float32) / math.sqrt(w[0])
                        * (OUTPUT_INIT_SCALE if i == last else 1.0),
                        jnp.zeros(b, jnp.float32))
                       for i, (k, (w, b)) in enumerate(zip(keys, self._shapes, strict=True)))
        k = int(np.argmin([abs(b - 0.9) for b in self.momentum_decays]))
        skip = jnp.zeros(self.skip_shape, jnp.float32)
        skip = skip.at[self.feature_names().index(f"m{k}/sqrt(v)"), 0].set(-1.0)
        return Weights(layers, skip)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the F inputs, in order."""
        k = len(self.momentum_decays)
        return ("g", "p", *(f"m{i}" for i in range(k)), *(f"m{i}/sqrt(v)" for i in range(k)),
                "1/sqrt(v)", *(f"tanh(t/{s:g})" for s in self.time_scales))

    def flatten(self, weights: Weights) -> jax.Array:
        """Weights -> float32 [num_weights]: W_1, b_1, W_2, ..., b_L, S, each row-major."""
        weights = self._check_weights(weights)
        parts = [jnp.ravel(a) for layer in weights.layers for a in layer]
        return jnp.concatenate(parts + [jnp.ravel(weights.skip)]).astype(jnp.float32)

    def unflatten(self, theta) -> Weights:
        """float [num_weights] -> Weights, the inverse of :meth:`flatten`."""
        theta = jnp.asarray(theta)
        if theta.shape != (self.num_weights,):
            raise ValueError(f"theta has shape {theta.shape}; this learned optimizer has "
                             f"{self.num_weights} weights")
        out, start = [], 0
        for w, b in self._shapes:
            nw, nb = w[0] * w[1], b[0]
            out.append((theta[start:start + nw].reshape(w),
                        theta[start + nw:start + nw + nb]))
            start += nw + nb
        return Weights(tuple(out), theta[start:].reshape(self.skip_shape))

    def _check_weights(self, weights) -> Weights:
        try:
            layers, skip = weights
            shapes = tuple((tuple(np.shape(w)), tuple(np.shape(b))) for w, b in layers)
        except (TypeError, ValueError):
            raise ValueError("weights must be a Weights(layers=((W, b), ...), skip=S)") from None
        if shapes != self._shapes or tuple(np.shape(skip)) != self.skip_shape:
            raise ValueError(f"weights have layer shapes {shapes} and skip {np.shape(skip)}; "
                             f"this architecture needs {self._shapes} and {self.skip_shape}")
        return Weights(tuple(layers), skip)

    # ------------------------------------------------------------------------ the update

    def features(self, g: jax.Array, p: jax.Array, momenta, v: jax.Array,
                 t: jax.Array) -> jax.Array:
        """The MLP inputs of one tensor: [*g.shape, F] (see the module docstring)."""
        rs = jax.lax.rsqrt(v + EPS)
        per_element = [g, p, *momenta, *(m * rs for m in momenta), rs]
        x = jnp.stack(per_element, axis=-1)
        axes = tuple(range(g.ndim))
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + EPS)
        steps = jnp.asarray(t, jnp.float32)
        time = jnp.tanh(steps / jnp.asarray(self.time_scales, jnp.float32))
        time = jnp.broadcast_to(time, (*g.shape, len(self.time_scales)))
        return jnp.concatenate([x, time], axis=-1)

    def apply_mlp(self, weights: Weights, x: jax.Array) -> jax.Array:
        """Outputs [..., 2] (direction, log-magnitude) from inputs x [..., F]:
        MLP(x) + x @ S."""
        h = x
        for w, b in weights.layers[:-1]:
            h = jax.nn.relu(h @ w + b)
        w, b = weights.layers[-1]
        return h @ w + b + x @ weights.skip

    def tensor_update(self, weights, g, p, momenta, v, t) -> jax.Array:
        """u = d * exp(A tanh(a / A) * exp_scale) * step_scale for one tensor; shape g.shape."""
        out = self.apply_mlp(weights, self.features(g, p, momenta, v, t))
        a = out[..., 1]
        if self.max_log_magnitude is not None:
            a = self.max_log_magnitude * jnp.tanh(a / self.max_log_magnitude)
        return out[..., 0] * jnp.exp(a * self.exp_scale) * self.step_scale

    def init_state(self, params) -> LearnedOptimizerState:
        zeros = lambda: jax.tree_util.tree_map(
            lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        return LearnedOptimizerState(
            momenta=tuple(zeros() for _ in self.momentum_decays),
            second_moment=zeros(), step=jnp.zeros((), jnp.int32))

    def update(self, weights, grads, state: LearnedOptimizerState, params):
        """(updates, new state) for the gradient pytree ``grads`` at ``params``; the update
        of step t uses the moments including g_t and the time features of t."""
        if params is None:
            raise ValueError("the learned optimizer needs params: call "
                             "tx.update(grads, opt_state, params)")
        momenta = tuple(
            jax.tree_util.tree_map(lambda m, g, b=b: b * m + (1 - b) * g, ms, grads)
            for b, ms in zip(self.momentum_decays, state.momenta, strict=True))
        c = self.second_moment_decay
        v = jax.tree_util.tree_map(lambda v, g: c * v + (1 - c) * jnp.square(g),
                                   state.second_moment, grads)
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        m_leaves = [treedef.flatten_up_to(m) for m in momenta]
        v_leaves = treedef.flatten_up_to(v)
        updates = []
        for i, (g, p) in enumerate(zip(g_leaves, p_leaves, strict=True)):
            u = self.tensor_update(weights, jnp.asarray(g, jnp.float32),
                                   jnp.asarray(p, jnp.float32), [m[i] for m in m_leaves],
                                   v_leaves[i], state.step)
            updates.append(u.astype(jnp.result_type(g)))
        new_state = LearnedOptimizerState(momenta, v, state.step + 1)
        return jax.tree_util.tree_unflatten(treedef, updates), new_state

    def transformation(self, weights) -> optax.GradientTransformation:
        """The optax transformation with these weights (``update`` needs params)."""
        weights = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                         self._check_weights(weights))

        def update_fn(grads, state, params=None):
            return self.update(weights, grads, state, params)

        return optax.GradientTransformation(self.init_state, update_fn)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_shapes", None)
        return out


class Weights(NamedTuple):
    """layers: ((W_1, b_1), ..., (W_L, b_L)), W_i [fan_in, fan_out], the last layer with 2
    outputs; skip: S [F, 2], the linear map from the inputs to the outputs."""

    layers: tuple[tuple[Any, Any], ...]
    skip: Any


class LearnedOptimizerState(NamedTuple):
    """momenta: one pytree like params per momentum decay; second_moment: a pytree like
    params; step: int32 scalar, updates applied so far."""

    momenta: tuple[Any, ...]
    second_moment: Any
    step: jax.Array


# ------------------------------------------------------------------------------- files


class LearnedOptimizerFileError(ValueError):
    """A file that is not a readable learned optimizer of a supported version."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)


def save(path: str | os.PathLike, architecture: LearnedOptimizer, weights,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write a learned optimizer to ``path`` (.npz): a JSON header (format, version,
    architecture, your ``metadata``) and the arrays ``W0, b0, W1, b1, ...``.

    ``weights``: a Weights or the flat vector of :meth:`LearnedOptimizer.flatten`.
    """
    if isinstance(weights, jax.Array | np.ndarray) and np.ndim(weights) == 1:
        weights = architecture.unflatten(weights)
    weights = architecture._check_weights(weights)
    header = {"format": FORMAT, "version": FORMAT_VERSION,
              "architecture": architecture.to_dict(), "metadata": metadata or {}}
    arrays = {}
    for i, (w, b) in enumerate(weights.layers):
        arrays[f"W{i}"] = np.asarray(w, np.float32)
        arrays[f"b{i}"] = np.asarray(b, np.float32)
    arrays["skip"] = np.asarray(weights.skip, np.float32)
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise ValueError("the learned optimizer's weights are not all finite; not saving them")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, header=np.array(json.dumps(header)), **arrays)
    tmp.replace(path)
    return path


def read(path: str | os.PathLike) -> tuple[LearnedOptimizer, tuple, dict[str, Any]]:
    """(architecture, weights, metadata) from a file written by :func:`save`.

    Raises FileNotFoundError for a missing file and LearnedOptimizerFileError (naming the
    file and what is wrong) for anything else that is not such a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such learned-optimizer file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise LearnedOptimizerFileError(path, f"not a learned-optimizer .npz file ({e})") from None
    if "header" not in arrays:
        raise LearnedOptimizerFileError(path, "no header: not written by "
                                        "pes.learned_optimizer.save")
    try:
        header = json.loads(str(arrays.pop("header")))
    except json.JSONDecodeError as e:
        raise LearnedOptimizerFileError(path, f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LearnedOptimizerFileError(path, f"its header does not say format {FORMAT!r}")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise LearnedOptimizerFileError(
            path, f"format version {version!r}; this pes reads version {FORMAT_VERSION}")
    try:
        arch_fields = dict(header["architecture"])
        architecture = LearnedOptimizer(**arch_fields)
    except (KeyError, TypeError, ValueError) as e:
        raise LearnedOptimizerFileError(path, f"bad architecture in its header ({e})") from None
    weights = []
    for i, (w_shape, b_shape) in enumerate(architecture._shapes):
        w, b = arrays.get(f"W{i}"), arrays.get(f"b{i}")
        if w is None or b is None:
            raise LearnedOptimizerFileError(path, f"layer {i} is missing (W{i}/b{i})")
        if w.shape != w_shape or b.shape != b_shape:
            raise LearnedOptimizerFileError(
                path, f"layer {i} has shapes {w.shape}/{b.shape}; its architecture needs "
                f"{w_shape}/{b_shape}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise LearnedOptimizerFileError(path, f"layer {i} has non-finite weights")
        weights.append((jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
    skip = arrays.get("skip")
    if skip is None or skip.shape != architecture.skip_shape:
        raise LearnedOptimizerFileError(
            path, f"the skip weights are missing or not of shape {architecture.skip_shape}")
    if not np.isfinite(skip).all():
        raise LearnedOptimizerFileError(path, "the skip weights are not all finite")
    known = {f"{k}{i}" for i in range(len(weights)) for k in "Wb"} | {"skip"}
    extra = sorted(set(arrays) - known)
    if extra:
        raise LearnedOptimizerFileError(path, f"unexpected arrays {extra}")
    return (architecture, Weights(tuple(weights), jnp.asarray(skip, jnp.float32)),
            dict(header.get("metadata") or {}))


def load(path: str | os.PathLike) -> optax.GradientTransformation:
    """The learned optimizer in ``path`` as an optax.GradientTransformation.

    Its ``update(grads, state, params)`` needs params (they are one of its inputs). Raises as
    :func:`read`.
    """
    architecture, weights, _ = read(path)
    return architecture.transformation(weights)


def pretrained_path() -> Path:
    """The ``.npz`` of the learned optimizer shipped with pes, inside the installed package.

    PES meta-trained it (seed 12 of ``pes compare learned-optimizer`` at the CPU size: T = 200
    steps of 64-32-32-32-10 MLPs on 8x8 Fashion-MNIST; docs/results/learned-optimizer).

    Examples:
        >>> import pes
        >>> tx = pes.learned_optimizer.load(pes.learned_optimizer.pretrained_path())
        >>> pes.learned_optimizer.pretrained_path().name
        'learned_optimizer.npz'
    """
    return Path(str(importlib.resources.files("pes").joinpath("pretrained",
                                                              "learned_optimizer.npz")))


def learned_optimizer(weights, architecture: LearnedOptimizer | None = None
                      ) -> optax.GradientTransformation:
    """The optax transformation of ``weights`` (a Weights or a flat vector) under
    ``architecture`` (default: LearnedOptimizer())."""
    architecture = architecture or LearnedOptimizer()
    if isinstance(weights, jax.Array | np.ndarray) and np.ndim(weights) == 1:
        weights = architecture.unflatten(weights)
    return architecture.transformation(weights)
