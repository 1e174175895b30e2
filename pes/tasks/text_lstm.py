"""A tiny character-level LSTM language model (PES paper, variance study; PAPER.md exp. 7).

theta is the flat weight vector of an LSTM with ``hidden_size`` units (5 by default) over a
character vocabulary of V symbols. The inner state is the LSTM's (h, c) and the position p in
the sequence x_0 .. x_T; step p reads x_p and is charged the cross-entropy of predicting
x_{p+1}::

    z      = W_x[x_p] + W_h^T h + b                  (4H gate pre-activations: i, f, g, o)
    c'     = sigmoid(f) * c + sigmoid(i) * tanh(g),   h' = sigmoid(o) * tanh(c')
    l_p    = logsumexp(W_out^T h' + b_out) - (W_out^T h' + b_out)[x_{p+1}]

The episode is one pass over the sequence: horizon T = ``sequence_length`` steps (1000 by
default), from h = c = 0. The sequence is fixed (the step key is unused), so the system is
deterministic and its only randomness in an ES estimate is the perturbation of theta.

Variants (``variant``):

* ``'text'``: the first T + 1 characters of the opening of Jane Austen's *Pride and
  Prejudice* (1813, public domain; ``data/pride_and_prejudice.txt``, 1199 characters, 43
  distinct). Real text: the next character depends on the history.
* ``'random'``: T + 1 tokens drawn uniformly from the same vocabulary with ``seed``: the
  history tells nothing about the next token.
* ``'repeat'``: one token (``repeat_char``, a space by default) T + 1 times.

The vocabulary is always the text's 43 characters, so theta has the same size in every
variant: 4H(V + H + 1) + (H + 1)V = 1238 numbers for H = 5. At a random initialisation
(``init_theta``) the predicted distribution is close to uniform and the loss close to log V.

The training defaults (``defaults()``) are not from the paper, which only measured gradient
variance on this task; they are an untuned starting point for training.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pes.system import unroll
from pes.tasks.base import OptimizerSpec, TaskDefaults

TEXT_FILE = "pride_and_prejudice.txt"
VARIANTS = ("text", "random", "repeat")


@lru_cache(maxsize=1)
def load_text() -> str:
    """The shipped public-domain text (package data ``pes/tasks/data/pride_and_prejudice.txt``),
    with its final newline removed."""
    try:
        resource = importlib.resources.files("pes.tasks").joinpath("data", TEXT_FILE)
        text = resource.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"the text for the text-lstm task, pes/tasks/data/{TEXT_FILE}, is missing from the "
            "installed package (is it listed in pyproject's package-data?)"
        ) from err
    return text.rstrip("\n")


def vocabulary() -> str:
    """The sorted distinct characters of the shipped text (43 of them)."""
    return "".join(sorted(set(load_text())))


class LSTMState(NamedTuple):
    """h, c: the LSTM's hidden and cell state, shape (H,) float32. pos: the position p in the
    sequence, a float32 scalar holding an integer (float so that forward-mode estimators,
    RTRL and UORO, which need float states, accept the task; exact up to 2^24)."""

    h: jax.Array
    c: jax.Array
    pos: jax.Array


class LSTMParams(NamedTuple):
    """theta unflattened: W_x (V, 4H), W_h (H, 4H), b (4H,), W_out (H, V), b_out (V,)."""

    W_x: jax.Array
    W_h: jax.Array
    b: jax.Array
    W_out: jax.Array
    b_out: jax.Array


@dataclass(frozen=True)
class TextLSTM:
    """Character LSTM language model. theta: flat float32 vector of size ``num_params``.

    Args:
      variant: 'text', 'random' or 'repeat' (see the module docstring).
      sequence_length: T, predictions per episode (<= 1198 for 'text').
      hidden_size: H, LSTM units.
      seed: seed of the random-token sequence ('random').
      repeat_char: the repeated character ('repeat'); must be in the vocabulary.
    """

    variant: str = "text"
    sequence_length: int = 1000
    hidden_size: int = 5
    seed: int = 0
    repeat_char: str = " "
    tokens: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        for name in ("sequence_length", "hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        text, vocab = load_text(), vocabulary()
        n = self.sequence_length + 1
        if self.variant == "text":
            if n > len(text):
                raise ValueError(
                    f"sequence_length={self.sequence_length} needs {n} characters but the "
                    f"shipped text has {len(text)}: use sequence_length <= {len(text) - 1}"
                )
            tokens = np.array([vocab.index(ch) for ch in text[:n]], np.int32)
        elif self.variant == "random":
            rng = np.random.default_rng(self.seed)
            tokens = rng.integers(0, len(vocab), size=n).astype(np.int32)
        else:
            if len(self.repeat_char) != 1 or self.repeat_char not in vocab:
                raise ValueError(
                    f"repeat_char={self.repeat_char!r} must be one character of the "
                    f"vocabulary {vocab!r}"
                )
            tokens = np.full((n,), vocab.index(self.repeat_char), np.int32)
        tokens.setflags(write=False)
        object.__setattr__(self, "tokens", tokens)

    # ------------------------------------------------------------------------- shapes

    @property
    def horizon(self) -> int:
        return self.sequence_length

    @property
    def vocab_size(self) -> int:
        return len(vocabulary())

    def _shapes(self) -> list[tuple[int, ...]]:
        H, V = self.hidden_size, self.vocab_size
        return [(V, 4 * H), (H, 4 * H), (4 * H,), (H, V), (V,)]

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s) for s in self._shapes()))

    def unflatten(self, theta: jax.Array) -> LSTMParams:
        """Split the flat theta (num_params,) into the LSTM's weight matrices."""
        theta = jnp.asarray(theta)
        if theta.shape != (self.num_params,):
            raise ValueError(
                f"theta has shape {theta.shape}; this TextLSTM needs a flat vector of shape "
                f"({self.num_params},) (see init_theta)"
            )
        parts, start = [], 0
        for shape in self._shapes():
            size = int(np.prod(shape))
            parts.append(theta[start:start + size].reshape(shape))
            start += size
        return LSTMParams(*parts)

    def init_theta(self, key: jax.Array) -> jax.Array:
        """A random initialisation, flat float32 (num_params,): every weight uniform on
        [-1/sqrt(H), 1/sqrt(H)] (PyTorch's LSTM default), biases zero."""
        H = self.hidden_size
        scale = 1.0 / np.sqrt(H)
        shapes = self._shapes()
        keys = jax.random.split(key, len(shapes))
        parts = []
        for k, shape, is_bias in zip(keys, shapes, (False, False, True, False, True),
                                     strict=True):
            if is_bias:
                parts.append(jnp.zeros(shape, jnp.float32))
            else:
                parts.append(jax.random.uniform(k, shape, jnp.float32, -scale, scale))
        return jnp.concatenate([p.ravel() for p in parts])

    # ------------------------------------------------------------------------- System

    def init(self, key: jax.Array) -> LSTMState:
        del key  # deterministic start
        zeros = jnp.zeros((self.hidden_size,), jnp.float32)
        return LSTMState(h=zeros, c=zeros, pos=jnp.zeros((), jnp.float32))

    def _cell(self, state: LSTMState, p: LSTMParams) -> tuple[LSTMState, jax.Array]:
        """One step: the new state and the logits of the next token, shape (V,)."""
        tokens = jnp.asarray(self.tokens)
        pos = state.pos.astype(jnp.int32)
        z = p.W_x[tokens[pos]] + state.h @ p.W_h + p.b
        i, f, g, o = jnp.split(z, 4)
        c = jax.nn.sigmoid(f) * state.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        logits = h @ p.W_out + p.b_out
        return LSTMState(h=h, c=c, pos=state.pos + 1.0), logits

    def step(self, state: LSTMState, theta, t, key):
        del t, key
        p = self.unflatten(theta)
        new_state, logits = self._cell(state, p)
        target = jnp.asarray(self.tokens)[state.pos.astype(jnp.int32) + 1]
        loss = jax.nn.logsumexp(logits) - logits[target]
        return new_state, loss

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self, theta, key: jax.Array) -> dict[str, jax.Array]:
        """{'meta_loss': mean cross-entropy (nats per character) over the sequence,
        'bits_per_char': the same in bits}. Jittable."""
        _, losses = unroll(self, theta, key, self.horizon)
        mean = losses.mean()
        return {"meta_loss": mean, "bits_per_char": mean / jnp.log(2.0)}

    def defaults(self) -> TaskDefaults:
        """Not from the paper (it measured variance only): theta0 = init_theta(PRNGKey(0)),
        Adam 1e-2 for 1000 outer steps, ES with 100 particles, sigma 0.01, K = 10."""
        es = {"num_particles": 100, "sigma": 0.01, "truncation_length": 10}
        theta0 = np.asarray(self.init_theta(jax.random.PRNGKey(0)), np.float64)
        return TaskDefaults(
            theta0=tuple(float(x) for x in theta0),
            num_steps=1000,
            optimizer=OptimizerSpec("adam", 1e-2),
            estimators={
                "pes": dict(es),
                "nres": dict(es),
                "tes": dict(es),
                "full-es": {"num_particles": 100, "sigma": 0.01},
                "tbptt": {"truncation_length": 10},
                "full-bptt": {},
                "uoro": {"truncation_length": 10},
                "rtrl": {"truncation_length": 10},
            },
        )
