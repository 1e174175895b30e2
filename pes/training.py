"""The outer loop: an estimator's gradients fed to any optax optimizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes.estimators._particles import EstimateInfo, check_positive_int, theta_spec
from pes.system import PyTree, check_theta, evaluate


class Record(NamedTuple):
    """One outer step of training.

    step: outer steps taken so far (0 for the evaluation before training).
    inner_steps: inner ``system.step`` calls so far, burn-in included.
    loss: the window's mean per-step loss (None at step 0).
    meta_objective: the evaluation at this step, None when not evaluated.
    nonfinite: particles left out of this step's estimate for a NaN/inf loss (policy 'drop').
    """

    step: int
    inner_steps: int
    loss: float | None
    meta_objective: float | None
    nonfinite: int = 0


class History(list):
    """The list of Records of a run, with ``column(name)`` as a float numpy array (None->nan)."""

    def column(self, name: str) -> np.ndarray:
        if name not in Record._fields:
            raise KeyError(f"{name!r} is not a Record field; fields are {Record._fields}")
        return np.array([np.nan if (v := getattr(r, name)) is None else v for r in self],
                        dtype=float)

    def evaluated(self) -> list[Record]:
        return [r for r in self if r.meta_objective is not None]


class TrainResult(NamedTuple):
    theta: PyTree
    history: History


class TrainState(NamedTuple):
    """Everything the outer loop needs to continue exactly where it stopped.

    theta, opt_state: outer parameters and optimizer state; estimator_state: every particle's
    inner state and noise; step: outer steps done; inner_steps: inner steps done.
    The key of outer step i is fold_in(key, i), so (state, key) determines the rest of a run.
    """

    theta: PyTree
    opt_state: PyTree
    estimator_state: PyTree
    step: int
    inner_steps: int


NONFINITE_POLICIES = ("raise", "drop")


class NonFiniteGradientError(FloatingPointError):
    """A NaN or inf loss or gradient; theta was not updated with it.

    Attributes: step (the outer step that failed, 1-based), theta (the last good theta),
    loss (that window's loss), particle and inner_step (the first particle whose loss was
    non-finite and the step of its episode, None if the losses were finite), state (the last
    good TrainState, for a checkpoint).
    """

    def __init__(self, message, step, theta, loss, particle=None, inner_step=None, state=None):
        super().__init__(message)
        self.step, self.theta, self.loss = step, theta, loss
        self.particle, self.inner_step, self.state = particle, inner_step, state


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _nonfinite_error(step: int, good: TrainState, loss: float, bad: int, particle: int,
                     t: int) -> NonFiniteGradientError:
    """The error for outer step ``step`` (``bad`` particles with a NaN/inf loss, the first
    being ``particle`` at inner step ``t``; or, with bad == 0, a non-finite gradient)."""
    where = (f"particle {particle} at inner step {t} of its episode produced a non-finite loss"
             if bad else "the losses were finite")
    return NonFiniteGradientError(
        f"non-finite {'loss' if bad else 'gradient'} at outer step {step}: {where} "
        f"({bad} particles affected, window loss {loss}); theta was not updated and holds the "
        "value from the step before",
        step, good.theta, loss, particle if bad else None, t if bad else None, good,
    )


def train(
    estimator: Any,
    theta: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    key: jax.Array,
    eval_every: int | None = None,
    callback: Callable[[Record, PyTree], Any] | None = None,
    evaluate_fn: Callable[[PyTree, jax.Array], Any] | None = None,
    eval_episodes: int = 1,
    eval_steps: int | None = None,
    nonfinite: str = "raise",
    resume: TrainState | None = None,
    on_state: Callable[[TrainState], Any] | None = None,
    steps_per_call: int = 1,
    loggers: Sequence[Any] = (),
) -> TrainResult:
    """Minimise the mean per-step loss: theta <- optimizer(estimator's gradient), num_steps times.

    Args:
      estimator: any pes estimator (``init(key, theta)``, ``estimate(state, theta, key)``).
      theta: initial outer parameters, a pytree of float arrays.
      optimizer: an optax GradientTransformation (it receives the gradient of a loss).
      num_steps: outer steps (one estimate each).
      key: PRNG key; the run is a deterministic function of it.
      eval_every: evaluate the meta-objective before training, every this many steps and at the
        end; None never evaluates.
      callback: called as ``callback(record, theta)`` after every outer step; returning True
        stops training early.
      evaluate_fn: ``(theta, key) -> scalar`` used for evaluation; by default
        ``pes.evaluate(estimator.system, theta, key, eval_episodes, eval_steps)``.
      nonfinite: 'raise' stops at the first NaN/inf loss; 'drop' leaves the particles that
        produced one out of the estimate (the ES family) and counts them in the record.
      resume: a TrainState from ``on_state`` of an earlier run with the same key: the run
        continues from it exactly (the history then holds the steps after it).
      on_state: called with the TrainState after every outer step (e.g. to checkpoint it).
      steps_per_call: run up to this many outer steps in one compiled loop (a
        ``lax.while_loop`` of estimate + update) and read their records back to the host once,
        instead of a dispatch and a host read per step. The run is the same: theta, history
        and records equal those of ``steps_per_call=1`` for the same key up to float rounding
        (compiled into one program, a multiply and an add may become one fused multiply-add
        or stop being one; with FMA off, ``XLA_FLAGS=--xla_cpu_max_isa=AVX``, the runs checked
        matched bit for bit).
        A chunk ends at every evaluation step and at the first step that must not be applied
        (a NaN/inf), which raises as above. What changes: the callback is called for each
        step of a chunk after the whole chunk ran, with theta as a pytree of NumPy arrays (the
        values after that step), so a callback's True stops training at the end of its chunk
        (the chunk's later steps are still taken, recorded and passed to the callback; a bad
        step among them ends the run there without an error, as stopping first would); and
        ``on_state`` is called at chunk ends only. ``estimator.estimate`` must be traceable
        (every pes estimator is). Pays off when an outer step is cheap (small tasks, many
        steps); 1 (the default) runs one step per call.
      loggers: experiment trackers (:class:`pes.loggers.Logger`: TensorBoard, W&B, MLflow or
        your own) whose ``log_metrics(step, metrics, inner_steps)`` gets every record
        (``loss``, ``meta_objective`` when evaluated, ``nonfinite``), step 0 included; only
        on process 0 of a multi-process run. train does not close them.

    Returns TrainResult(theta, history). Raises NonFiniteGradientError (naming the outer step,
    the particle and its inner step) instead of applying a NaN or inf gradient.
    """
    num_steps = check_positive_int("num_steps", num_steps)
    steps_per_call = check_positive_int("steps_per_call", steps_per_call)
    if eval_every is not None:
        eval_every = check_positive_int("eval_every", eval_every)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer={optimizer!r} must be an optax.GradientTransformation, "
            "e.g. optax.adam(1e-2)"
        )
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r} must be one of {NONFINITE_POLICIES}")
    theta = check_theta(theta)
    if evaluate_fn is None:
        system = estimator.system

        def evaluate_fn(theta, key):
            return evaluate(system, theta, key, num_episodes=eval_episodes, eval_steps=eval_steps)

    def apply(theta, opt_state, grad):
        finite = _all_finite(grad)
        updates, new_opt_state = optimizer.update(grad, opt_state, theta)
        new_theta = optax.apply_updates(theta, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        return (jax.tree_util.tree_map(keep, new_theta, theta),
                jax.tree_util.tree_map(keep, new_opt_state, opt_state), finite)

    update = jax.jit(apply)

    k_init, k_train, k_eval = jax.random.split(key, 3)
    if resume is None:
        state = estimator.init(k_init, theta)
        opt_state = optimizer.init(theta)
        start, inner_steps = 0, 0
    else:
        theta, opt_state, state = resume.theta, resume.opt_state, resume.estimator_state
        start, inner_steps = int(resume.step), int(resume.inner_steps)
        if hasattr(estimator, "_spec"):  # lets estimate() check theta as after init
            estimator._spec = theta_spec(check_theta(theta))
    history = History()

    def evaluation(step):
        return float(evaluate_fn(theta, jax.random.fold_in(k_eval, step)))

    if loggers and jax.process_index() == 0:
        callback = _logging_callback(callback, tuple(loggers))
    else:
        loggers = ()
    if eval_every is not None and start == 0:
        history.append(Record(0, 0, None, evaluation(0)))
        _log_record(loggers, history[-1])
    if steps_per_call > 1:
        return _train_in_chunks(
            estimator, apply, theta, opt_state, state, start, inner_steps, num_steps,
            k_train, steps_per_call, eval_every,
            lambda step, th: float(evaluate_fn(th, jax.random.fold_in(k_eval, step))),
            callback, nonfinite, on_state, history)
    for step in range(start + 1, num_steps + 1):
        good = TrainState(theta, opt_state, state, step - 1, inner_steps)
        grad, state, info = estimator.estimate(state, theta, jax.random.fold_in(k_train, step))
        theta, opt_state, finite = update(theta, opt_state, grad)
        loss = float(info.loss)
        bad = int(info.num_nonfinite)
        if not bool(finite) or (bad and nonfinite == "raise"):
            raise _nonfinite_error(step, good, loss, bad, int(info.nonfinite_particle),
                                   int(info.nonfinite_step))
        inner_steps += int(info.inner_steps)
        meta = None
        if eval_every is not None and (step % eval_every == 0 or step == num_steps):
            meta = evaluation(step)
        record = Record(step, inner_steps, loss, meta, bad)
        history.append(record)
        if on_state is not None:
            on_state(TrainState(theta, opt_state, state, step, inner_steps))
        if callback is not None and callback(record, theta) is True:
            break
    return TrainResult(theta, history)


def _log_record(loggers: Sequence[Any], record: Record) -> None:
    metrics = {"loss": record.loss, "meta_objective": record.meta_objective,
               "nonfinite": record.nonfinite if record.nonfinite else None}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    for logger in loggers:
        logger.log_metrics(record.step, metrics, record.inner_steps)


def _logging_callback(callback, loggers):
    """``callback`` that first sends the record to ``loggers``."""

    def logged(record, theta):
        _log_record(loggers, record)
        return None if callback is None else callback(record, theta)

    return logged


class _ChunkOut(NamedTuple):
    """Per-step outputs of one chunk, leaves [steps_per_call, ...] (rows past the steps run
    are zeros): each step's EstimateInfo, the update's finiteness and, when a callback wants
    them, theta after each step."""

    info: EstimateInfo
    finite: jax.Array
    thetas: PyTree


def _chunk_runner(estimator, apply, k_train, steps_per_call, stop_on_nonfinite_loss,
                  keep_thetas):
    """A jitted ``run(theta, opt_state, state, first, count)``: outer steps first, ...,
    first + count - 1 (count <= steps_per_call) in one ``lax.while_loop``, each exactly the
    unchunked loop's step (key fold_in(k_train, step), estimate, apply). It stops after the
    first step that must not be applied (a non-finite gradient, or with
    ``stop_on_nonfinite_loss`` a NaN/inf loss); that step's carry is then returned as computed
    (the caller re-runs the steps before it). Returns (theta, opt_state, state, steps run,
    stopped, _ChunkOut)."""
    M = steps_per_call

    def rows(x):  # an array or a ShapeDtypeStruct
        return jnp.zeros((M,) + jnp.shape(x), x.dtype)

    def run(theta, opt_state, state, first, count):
        probe = jax.eval_shape(estimator.estimate, state, theta, k_train)[2]
        out = _ChunkOut(jax.tree_util.tree_map(rows, probe), rows(jnp.bool_(True)),
                        jax.tree_util.tree_map(rows, theta) if keep_thetas else ())

        def body(carry):
            i, theta, opt_state, state, _, out = carry
            key = jax.random.fold_in(k_train, first + i)
            grad, state, info = estimator.estimate(state, theta, key)
            theta, opt_state, finite = apply(theta, opt_state, grad)
            stop = ~finite
            if stop_on_nonfinite_loss:
                stop = stop | (info.num_nonfinite > 0)
            put = lambda buf, x: buf.at[i].set(x)
            out = _ChunkOut(
                jax.tree_util.tree_map(put, out.info, info), put(out.finite, finite),
                jax.tree_util.tree_map(put, out.thetas, theta) if keep_thetas else ())
            return i + 1, theta, opt_state, state, stop, out

        def cond(carry):
            i, stop = carry[0], carry[4]
            return (i < count) & ~stop

        i, theta, opt_state, state, stopped, out = jax.lax.while_loop(
            cond, body, (jnp.zeros((), jnp.int32), theta, opt_state, state,
                         jnp.zeros((), bool), out))
        return theta, opt_state, state, i, stopped, out

    return jax.jit(run)


def _train_in_chunks(estimator, apply, theta, opt_state, state, start, inner_steps, num_steps,
                     k_train, steps_per_call, eval_every, evaluation, callback, nonfinite,
                     on_state, history):
    """train's loop with ``steps_per_call`` outer steps per compiled call (see train).

    A chunk ends at the next evaluation step, at num_steps, or after steps_per_call steps;
    its per-step records come back in one read. When a step must not be applied, the chunk is
    run again up to the step before it (the same program on the same inputs: the same
    result), which gives the last good state for the error."""
    run = _chunk_runner(estimator, apply, k_train, steps_per_call, nonfinite == "raise",
                        callback is not None)
    step = start
    stop_requested = False
    while step < num_steps and not stop_requested:
        end = min(step + steps_per_call, num_steps)
        if eval_every is not None:
            end = min(end, (step // eval_every + 1) * eval_every)
        first, count = step + 1, end - step
        new_theta, new_opt_state, new_state, ran, stopped, out = run(
            theta, opt_state, state, first, count)
        ran, stopped, out = jax.device_get((ran, stopped, out))
        ran, stopped = int(ran), bool(stopped)
        good = ran - 1 if stopped else ran
        if stopped and good > 0:
            new_theta, new_opt_state, new_state, *_ = run(theta, opt_state, state, first, good)
        if good > 0:
            theta, opt_state, state = new_theta, new_opt_state, new_state
        for i in range(good):
            step = first + i
            inner_steps += int(out.info.inner_steps[i])
            last = i == good - 1
            meta = None
            if (last and not stopped and eval_every is not None
                    and (step % eval_every == 0 or step == num_steps)):
                meta = evaluation(step, theta)
            record = Record(step, inner_steps, float(out.info.loss[i]), meta,
                            int(out.info.num_nonfinite[i]))
            history.append(record)
            if last and on_state is not None:
                on_state(TrainState(theta, opt_state, state, step, inner_steps))
            if callback is not None:
                theta_i = jax.tree_util.tree_map(lambda x, i=i: x[i], out.thetas)
                if callback(record, theta_i) is True:
                    stop_requested = True
        if stopped and not stop_requested:
            b = ran - 1
            raise _nonfinite_error(
                first + b, TrainState(theta, opt_state, state, first + b - 1, inner_steps),
                float(out.info.loss[b]), int(out.info.num_nonfinite[b]),
                int(out.info.nonfinite_particle[b]), int(out.info.nonfinite_step[b]))
        if stopped:
            break
    return TrainResult(theta, history)
