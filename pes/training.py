"""The outer loop: an estimator's gradients fed to any optax optimizer."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pes.estimators._particles import EstimateInfo, check_positive_int
from pes.system import PyTree, check_theta, evaluate, merge_moments, running_stats


class Record(NamedTuple):
    """One outer step of training.

    step: outer steps taken so far (0 for the evaluation before training).
    inner_steps: inner ``system.step`` calls so far, burn-in included.
    loss: the window's mean per-step loss (None at step 0).
    meta_objective: the evaluation at this step, None when not evaluated.
    nonfinite: particles left out of this step's estimate for a NaN/inf loss (policy 'drop').
    The theta of an evaluated record is kept in ``History.thetas``.
    """

    step: int
    inner_steps: int
    loss: float | None
    meta_objective: float | None
    nonfinite: int = 0


class History(list):
    """The list of Records of a run, with ``column(name)`` as a float numpy array (None->nan).

    ``thetas`` maps each evaluated step to the theta evaluated there (step 0: the initial
    theta); :meth:`best` is the evaluated record with the lowest meta-objective.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.thetas: dict[int, PyTree] = {}

    def column(self, name: str) -> np.ndarray:
        if name not in Record._fields:
            raise KeyError(f"{name!r} is not a Record field; fields are {Record._fields}")
        return np.array([np.nan if (v := getattr(r, name)) is None else v for r in self],
                        dtype=float)

    def evaluated(self) -> list[Record]:
        return [r for r in self if r.meta_objective is not None]

    def best(self) -> Record:
        """The evaluated record with the lowest meta-objective (the earliest of equals; NaN
        never wins); ``thetas[best().step]`` is its theta. ValueError without evaluations."""
        scored = [r for r in self.evaluated() if np.isfinite(r.meta_objective)]
        if not scored:
            raise ValueError("no finite evaluation in this history: pass eval_every to "
                             "pes.train to evaluate (and keep) theta during training")
        return min(scored, key=lambda r: r.meta_objective)


class TrainResult(NamedTuple):
    """theta: the last theta; history: a Record per outer step (step 0 = before training).

    ``best_theta`` is the evaluated theta with the lowest meta-objective
    (``history.best().theta``), which is what to keep when the last steps got worse; it
    needs evaluations (``eval_every``). Lower is better: a meta-objective is a loss.
    """

    theta: PyTree
    history: History

    @property
    def best_theta(self) -> PyTree:
        return self.history.thetas[self.history.best().step]


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
    steps_per_call: int | str | None = None,
    loggers: Sequence[Any] = (),
    state_every: int | None = None,
) -> TrainResult:
    """Minimise the mean per-step loss: theta <- optimizer(estimator's gradient), num_steps times.

    Args:
      estimator: any pes estimator (``init(key, theta)``, ``estimate(state, theta, key)``).
      theta: initial outer parameters, a pytree of float arrays.
      optimizer: an optax GradientTransformation (it receives the gradient of a loss).
      num_steps: outer steps (one estimate each).
      key: PRNG key; the run is a deterministic function of it.
      eval_every: evaluate the meta-objective before training, every this many steps and at the
        end, keeping each evaluated theta (``history.thetas``; ``TrainResult.best_theta`` is
        the best of them); None never evaluates.
      callback: called as ``callback(record, theta)`` for the evaluation before training
        (step 0, when ``eval_every`` is set) and after every outer step; returning True
        stops training early.
      evaluate_fn: ``(theta, key) -> scalar`` used for evaluation; by default
        ``pes.evaluate(estimator.system, theta, key, eval_episodes, eval_steps)``.
      nonfinite: 'raise' stops at the first NaN/inf loss; 'drop' leaves the particles that
        produced one out of the estimate (the ES family) and counts them in the record. With
        'drop', a step in which every pair has a NaN/inf loss has no estimate left and still
        raises NonFiniteGradientError. Neither catches losses that are finite but huge (a
        diverging inner problem gives 1e21 without a NaN); the library's tasks cap their
        loss for that (a ``loss_cap`` option), and a System of yours should do the same.
      resume: a TrainState from ``on_state`` of an earlier run with the same key: the run
        continues from it exactly (the history then holds the steps after it).
      on_state: called with the TrainState after every outer step, or at chunk ends only
        when steps are chunked (below; e.g. to checkpoint it).
      steps_per_call: outer steps per compiled call. Every step is run by one compiled
        program (a ``lax.while_loop`` of estimate + update that runs a given count of steps),
        whatever this is, so the run does not depend on it: theta, history and records are
        bit for bit the same for every setting. It changes only how often control returns to
        Python: an int M runs up to M steps per call (at most MAX_STEPS_PER_CALL) and reads
        their records back once; 'auto' sizes calls from their measured time (about
        AUTO_CALL_S seconds each, 1 to MAX_STEPS_PER_CALL steps); None (the default) is
        'auto' when there is no callback and no on_state, else 1. A call ends at every
        evaluation step and at the first step that must not be applied (a NaN/inf), which
        raises as above. With more than one step per call, the callback is called for each
        step after the whole call ran, with theta as NumPy arrays (the values after that
        step), so its True stops training at the end of the call (the call's later steps
        are still taken, recorded and passed to it; a bad step among them ends the run
        there without an error, as stopping first would), and ``on_state`` comes at call
        ends only. ``estimator.estimate`` must be traceable (every pes estimator is).
      loggers: experiment trackers (:class:`pes.loggers.Logger`: TensorBoard, W&B, MLflow or
        your own) whose ``log_metrics(step, metrics, inner_steps)`` gets every record
        (``loss``, ``meta_objective`` when evaluated, ``nonfinite``), step 0 included; only
        on process 0 of a multi-process run. train does not close them.
      state_every: calls also end at every multiple of this many steps, so that ``on_state``
        sees those states (``pes run --checkpoint-every``).

    Running statistics in theta (:func:`pes.system.running_stats`, e.g. ``obs_norm=True``) are
    not the optimizer's: after each step they become theta's merged with ``info.observed``.

    Returns TrainResult(theta, history) (and ``best_theta``). Raises NonFiniteGradientError
    (naming the outer step, the particle and its inner step) instead of applying a NaN or inf
    gradient. ``estimate`` refuses a theta whose leaves do not match the estimator's.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, pes
        >>> class Quadratic:    # loss (theta - 3)^2 at every step
        ...     horizon = 5
        ...     def init(self, key):
        ...         return jnp.float32(0.0)
        ...     def step(self, s, theta, t, key):
        ...         return s, (theta - 3.0) ** 2
        >>> est = pes.PES(Quadratic(), num_particles=100, sigma=0.1, truncation_length=5)
        >>> theta, history = pes.train(est, jnp.float32(0.0), optax.sgd(0.1), num_steps=50,
        ...                            key=jax.random.PRNGKey(0), eval_every=25)
        >>> bool(abs(theta - 3.0) < 0.01), len(history)     # records of steps 0 to 50
        (True, 51)
        >>> [round(r.meta_objective, 3) for r in history.evaluated()]   # steps 0, 25, 50
        [9.0, 0.0, 0.0]
    """
    if loggers and jax.process_index() == 0:
        callback = _logging_callback(callback, tuple(loggers))
    loop, start = _setup(estimator, theta, optimizer, num_steps=num_steps, key=key,
                         eval_every=eval_every, callback=callback, evaluate_fn=evaluate_fn,
                         eval_episodes=eval_episodes, eval_steps=eval_steps,
                         nonfinite=nonfinite, resume=resume, on_state=on_state,
                         steps_per_call=steps_per_call, state_every=state_every)
    history, stop = _step_zero(loop, start, resume is not None)
    return TrainResult(start.theta, history) if stop else _train_in_chunks(loop, start, history)


def _step_zero(loop: _Loop, start: TrainState, resumed: bool) -> tuple[History, bool]:
    """A fresh history with the evaluation before training (with eval_every; a resumed run
    has its step 0 already), and whether the callback asked to stop there."""
    history = History()
    if loop.eval_every is not None and not resumed:
        record = Record(0, 0, None, loop.evaluation(0, start.theta))
        history.append(record)
        history.thetas[0] = start.theta
        if loop.callback is not None and loop.callback(record, start.theta) is True:
            return history, True
    return history, False


# Rows of a compiled call's per-step output buffers: the most steps one call runs.
MAX_STEPS_PER_CALL = 64
# steps_per_call='auto' aims at calls of about this many seconds (responsive callbacks and
# signals, a Python round trip per call amortised over many cheap steps).
AUTO_CALL_S = 0.1


class _Loop(NamedTuple):
    """What stays fixed during one ``train`` call (its arguments, checked, and what is made
    from them): ``run`` is the compiled chunk program (:func:`_chunk_runner`);
    ``evaluation(step, theta)`` is the meta-objective as a float; the key of outer step i is
    ``fold_in(k_train, i)``; steps_per_call is an int or 'auto'."""

    estimator: Any
    run: Callable
    k_train: jax.Array
    num_steps: int
    steps_per_call: int | str
    eval_every: int | None
    evaluation: Callable[[int, PyTree], float]
    callback: Callable[[Record, PyTree], Any] | None
    nonfinite: str
    on_state: Callable[[TrainState], Any] | None
    state_every: int | None = None

    def evaluates(self, step: int) -> bool:
        """Whether outer step ``step`` (>= 1) is evaluated: every eval_every steps and last."""
        return self.eval_every is not None and (step % self.eval_every == 0
                                                or step == self.num_steps)


def _check_steps_per_call(value: Any, callback: Any, on_state: Any) -> int | str:
    if value is None:
        return "auto" if callback is None and on_state is None else 1
    if value == "auto":
        return "auto"
    return min(check_positive_int("steps_per_call", value), MAX_STEPS_PER_CALL)


def _setup(estimator, theta, optimizer, *, num_steps, key, eval_every, callback, evaluate_fn,
           eval_episodes, eval_steps, nonfinite, resume, on_state,
           steps_per_call, state_every=None) -> tuple[_Loop, TrainState]:
    """train's arguments checked, and the state it starts from (fresh, or ``resume``)."""
    num_steps = check_positive_int("num_steps", num_steps)
    steps_per_call = _check_steps_per_call(steps_per_call, callback, on_state)
    if eval_every is not None:
        eval_every = check_positive_int("eval_every", eval_every)
    if state_every is not None:
        state_every = check_positive_int("state_every", state_every)
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

    k_init, k_train, k_eval = jax.random.split(key, 3)
    if resume is None:
        state = estimator.init(k_init, theta)
        opt_state = optimizer.init(theta)
        start, inner_steps = 0, 0
    else:
        theta, opt_state, state = resume.theta, resume.opt_state, resume.estimator_state
        start, inner_steps = int(resume.step), int(resume.inner_steps)

    def evaluation(step, theta):
        return float(evaluate_fn(theta, jax.random.fold_in(k_eval, step)))

    run = _chunk_runner(estimator, optimizer, nonfinite == "raise")
    loop = _Loop(estimator, run, k_train, num_steps, steps_per_call,
                 eval_every, evaluation, callback, nonfinite, on_state, state_every)
    return loop, TrainState(theta, opt_state, state, start, inner_steps)


def _applier(optimizer: optax.GradientTransformation) -> Callable:
    """``apply(theta, opt_state, grad) -> (theta, opt_state, finite)``: the optimizer's
    update, kept only where every leaf of ``grad`` is finite (else the inputs come back)."""

    def apply(theta, opt_state, grad):
        finite = _all_finite(grad)
        updates, new_opt_state = optimizer.update(grad, opt_state, theta)
        new_theta = optax.apply_updates(theta, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        return (jax.tree_util.tree_map(keep, new_theta, theta),
                jax.tree_util.tree_map(keep, new_opt_state, opt_state), finite)

    return apply


def _stats_merger(estimator: Any) -> Callable | None:
    """``merge(theta_new, theta_old, info, finite) -> theta``: with running statistics
    (:func:`pes.system.running_stats`), theta_new with its statistics replaced by the merge of
    theta_old's and the window's (``info.observed``), so the optimizer never moves them; kept
    at theta_old's where the update was not applied (not finite). None without them."""
    hook = running_stats(getattr(estimator, "system", None))
    if hook is None:
        return None

    def merge(new, old, info, finite):
        if getattr(info, "observed", None) is None:
            raise ValueError(f"{estimator!r} does not report the observations that the "
                             "system's running statistics need; use an ES estimator")
        before = hook.get(old)
        after = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b),
                                       merge_moments(before, info.observed), before)
        return hook.put(new, after)

    return merge


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
    """Per-step outputs of one chunk, leaves [MAX_STEPS_PER_CALL, ...] (rows past the steps
    run are zeros): each step's EstimateInfo, the update's finiteness and theta after each
    step."""

    info: EstimateInfo
    finite: jax.Array
    thetas: PyTree



# (estimator, optimizer, stop_on_nonfinite_loss) -> the jitted chunk loop of _chunk_runner.
_CHUNK_RUNNERS: dict[tuple, Any] = {}
_MAX_CHUNK_RUNNERS = 32

def _chunk_runner(estimator, optimizer, stop_on_nonfinite_loss):
    """A jitted ``run(theta, opt_state, state, k_train, first, count)``: outer steps first,
    ..., first + count - 1 (count <= MAX_STEPS_PER_CALL) in one ``lax.while_loop``, each
    the same step (key fold_in(k_train, step), estimate, optimizer update). The trip count is
    an argument, so one program runs every chunk size and a step's result never depends on
    how the run was chunked. It stops after the first step that must not be applied (a
    non-finite gradient, or with ``stop_on_nonfinite_loss`` a NaN/inf loss); that step's
    carry is then returned as computed (the caller re-runs the steps before it). Returns
    (theta, opt_state, state, steps run, stopped, _ChunkOut)."""
    # Reused by every train call with an equal estimator and the same optimizer (estimators
    # are immutable values): a fresh jit per call would compile the whole estimate again.
    cache_key = (estimator, optimizer, bool(stop_on_nonfinite_loss))
    try:
        return _CHUNK_RUNNERS[cache_key]
    except (KeyError, TypeError):  # TypeError: an unhashable optimizer, compiled per call
        pass
    apply = _applier(optimizer)
    merge = _stats_merger(estimator)
    M = MAX_STEPS_PER_CALL

    def rows(x):  # an array or a ShapeDtypeStruct
        return jnp.zeros((M,) + jnp.shape(x), x.dtype)

    def run(theta, opt_state, state, k_train, first, count):
        probe = jax.eval_shape(estimator.estimate, state, theta, k_train)[2]
        if merge is not None:
            probe = probe._replace(observed=None)  # merged into theta, not recorded per step
        out = _ChunkOut(jax.tree_util.tree_map(rows, probe), rows(jnp.bool_(True)),
                        jax.tree_util.tree_map(rows, theta))

        def body(carry):
            i, theta, opt_state, state, _, out = carry
            key = jax.random.fold_in(k_train, first + i)
            grad, state, info = estimator.estimate(state, theta, key)
            new_theta, opt_state, finite = apply(theta, opt_state, grad)
            if merge is None:
                theta = new_theta
            else:
                theta = merge(new_theta, theta, info, finite)
                info = info._replace(observed=None)
            stop = ~finite
            if stop_on_nonfinite_loss:
                stop = stop | (info.num_nonfinite > 0)
            put = lambda buf, x: buf.at[i].set(x)
            out = _ChunkOut(jax.tree_util.tree_map(put, out.info, info),
                            put(out.finite, finite), jax.tree_util.tree_map(put, out.thetas,
                                                                            theta))
            return i + 1, theta, opt_state, state, stop, out

        def cond(carry):
            i, stop = carry[0], carry[4]
            return (i < count) & ~stop

        i, theta, opt_state, state, stopped, out = jax.lax.while_loop(
            cond, body, (jnp.zeros((), jnp.int32), theta, opt_state, state,
                         jnp.zeros((), bool), out))
        return theta, opt_state, state, i, stopped, out

    compiled = jax.jit(run)
    try:
        if len(_CHUNK_RUNNERS) >= _MAX_CHUNK_RUNNERS:  # a sweep over many settings
            _CHUNK_RUNNERS.clear()
        _CHUNK_RUNNERS[cache_key] = compiled
    except TypeError:
        pass
    return compiled


class _Sizer:
    """Chunk sizes: a fixed steps_per_call, or 'auto': ``start`` (1 for a program not run
    before: its first call compiles), then about AUTO_CALL_S seconds' worth of steps, growing
    at most 4x per call. ``size`` is kept for the next train call with the same program."""

    def __init__(self, steps_per_call: int | str, start: int = 1):
        self.fixed = None if steps_per_call == "auto" else int(steps_per_call)
        self.size, self.calls = start, 0

    def next(self) -> int:
        return self.fixed if self.fixed is not None else self.size

    def measured(self, steps: int, seconds: float) -> None:
        self.calls += 1
        if self.fixed is not None or self.calls < 2 or steps < 1:
            return  # the first call's time is mostly compilation
        per_step = max(seconds / steps, 1e-7)
        want = int(AUTO_CALL_S / per_step)
        self.size = max(1, min(want, 4 * self.size, MAX_STEPS_PER_CALL))


def _chunk_end(loop: _Loop, step: int, size: int) -> int:
    end = min(step + size, loop.num_steps)
    for every in (loop.eval_every, loop.state_every):  # calls end at these multiples
        if every is not None:
            end = min(end, (step // every + 1) * every)
    return end


def _train_in_chunks(loop: _Loop, start: TrainState, history: History) -> TrainResult:
    """train's loop: chunks of steps, each one compiled call (see train).

    A chunk ends at the next evaluation step, at num_steps, or after the chunk size; its
    per-step records come back in one read. When a step must not be applied, the chunk is
    run again up to the step before it (the same program on the same inputs: the same
    result), which gives the last good state for the error."""
    run = loop.run
    theta, opt_state, state, step, inner_steps = start
    memory = getattr(run, "__dict__", {})
    sizer = _Sizer(loop.steps_per_call, memory.get("pes_auto_size", 1))
    stop_requested = False
    while step < loop.num_steps and not stop_requested:
        first, count = step + 1, _chunk_end(loop, step, sizer.next()) - step
        tic = time.perf_counter()
        new_theta, new_opt_state, new_state, ran, stopped, out = run(
            theta, opt_state, state, loop.k_train, first, count)
        ran, stopped, info = jax.device_get((ran, stopped, out.info))
        ran, stopped = int(ran), bool(stopped)
        sizer.measured(ran, time.perf_counter() - tic)
        if sizer.fixed is None and sizer.calls >= 2:
            memory["pes_auto_size"] = sizer.size
        good = ran - 1 if stopped else ran
        if stopped and good > 0:
            new_theta, new_opt_state, new_state, *_ = run(theta, opt_state, state,
                                                          loop.k_train, first, good)
        if good > 0:
            theta, opt_state, state = new_theta, new_opt_state, new_state
        thetas = out.thetas
        if loop.callback is not None and good > 1:
            thetas = jax.device_get(jax.tree_util.tree_map(lambda x, n=good: x[:n], thetas))
        for i in range(good):
            step = first + i
            inner_steps += int(info.inner_steps[i])
            last = i == good - 1
            meta = None
            if last and not stopped and loop.evaluates(step):
                meta = loop.evaluation(step, theta)
                history.thetas[step] = theta
            record = Record(step, inner_steps, float(info.loss[i]), meta,
                            int(info.num_nonfinite[i]))
            history.append(record)
            if last and loop.on_state is not None:
                loop.on_state(TrainState(theta, opt_state, state, step, inner_steps))
            if loop.callback is not None:
                theta_i = theta if last else jax.tree_util.tree_map(lambda x, i=i: x[i],
                                                                     thetas)
                if loop.callback(record, theta_i) is True:
                    stop_requested = True
        if stopped and not stop_requested:
            b = ran - 1
            raise _nonfinite_error(
                first + b, TrainState(theta, opt_state, state, first + b - 1, inner_steps),
                float(info.loss[b]), int(info.num_nonfinite[b]),
                int(info.nonfinite_particle[b]), int(info.nonfinite_step[b]))
        if stopped:
            break
    return TrainResult(theta, history)
