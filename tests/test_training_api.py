"""pes.train's researcher-facing API: the best evaluated theta, the step-0 callback, and
chunking that never changes a run (bit for bit) and compiles once per estimator/optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes
from pes import training


class Drift:
    """s' = s + theta (reset every 4 steps), loss |s' - 1|^2."""

    horizon = 4

    def init(self, key):
        return jnp.zeros(2)

    def step(self, s, theta, t, key):
        s = s + theta + 0.01 * jax.random.normal(key, (2,))
        return s, jnp.sum((s - 1.0) ** 2)


EST = pes.PES(Drift(), num_particles=6, sigma=0.1, truncation_length=2)
SGD = optax.sgd(0.1)  # one optimizer object: the compiled program is reused across calls


def _estimator():
    return EST


def test_best_theta_is_the_evaluated_theta_with_the_lowest_meta_objective():
    est = _estimator()
    # A learning rate so large that training overshoots: the last theta is not the best.
    result = pes.train(est, jnp.zeros(2), optax.sgd(0.5), num_steps=12,
                       key=jax.random.PRNGKey(0), eval_every=3,
                       evaluate_fn=lambda th, k: jnp.sum((th - 0.3) ** 2))
    evaluated = result.history.evaluated()
    assert [r.step for r in evaluated] == [0, 3, 6, 9, 12] == sorted(result.history.thetas)
    best = result.history.best()
    assert best.meta_objective == min(r.meta_objective for r in evaluated)
    np.testing.assert_array_equal(result.best_theta, result.history.thetas[best.step])
    for r in evaluated:  # each kept theta is the one that was evaluated
        assert float(jnp.sum((result.history.thetas[r.step] - 0.3) ** 2)) == \
            pytest.approx(r.meta_objective, rel=1e-6)
    np.testing.assert_array_equal(result.history.thetas[0], jnp.zeros(2))
    unevaluated = pes.train(est, jnp.zeros(2), SGD, num_steps=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="eval_every"):
        _ = unevaluated.best_theta


def test_callback_sees_the_step_0_evaluation_and_can_stop_there():
    est = _estimator()
    seen = []
    result = pes.train(est, jnp.zeros(2), SGD, num_steps=3, key=jax.random.PRNGKey(0),
                       eval_every=2, callback=lambda r, th: seen.append((r.step, r.loss,
                                                                         r.meta_objective)))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] is None and seen[0][2] == result.history[0].meta_objective
    stopped = pes.train(est, jnp.zeros(2), SGD, num_steps=3,
                        key=jax.random.PRNGKey(0), eval_every=2, callback=lambda r, th: True)
    assert [r.step for r in stopped.history] == [0]


def test_every_chunking_gives_the_same_run_bit_for_bit():
    est = pes.PES(Drift(), num_particles=6, sigma=0.1, truncation_length=2)
    opt = optax.adam(0.05)
    runs = {m: pes.train(est, jnp.array([0.2, -0.1]), opt, num_steps=23,
                         key=jax.random.PRNGKey(5), eval_every=5, steps_per_call=m)
            for m in (1, 4, 64, "auto", None)}
    base = runs[1]
    for m, run in runs.items():
        np.testing.assert_array_equal(run.theta, base.theta, err_msg=str(m))
        assert list(run.history) == list(base.history), m  # exact float equality
    # One compiled program for all of them: made once, reused by every call.
    assert sum(k[0] == est for k in training._CHUNK_RUNNERS) == 1


def test_steps_per_call_default_is_chunked_only_without_per_step_hooks(monkeypatch):
    from pes import training

    calls = []
    real = training._Sizer

    class Spy(real):
        def __init__(self, steps_per_call, *args):
            calls.append(steps_per_call)
            super().__init__(steps_per_call, *args)

    monkeypatch.setattr(training, "_Sizer", Spy)
    est = _estimator()
    kwargs = dict(num_steps=2, key=jax.random.PRNGKey(0))
    pes.train(est, jnp.zeros(2), SGD, **kwargs)
    pes.train(est, jnp.zeros(2), SGD, callback=lambda r, th: None, **kwargs)
    pes.train(est, jnp.zeros(2), SGD, on_state=lambda s: None, **kwargs)
    pes.train(est, jnp.zeros(2), SGD, steps_per_call=1000, **kwargs)
    assert calls == ["auto", 1, 1, pes.training.MAX_STEPS_PER_CALL]


def test_state_every_ends_calls_at_its_multiples():
    """on_state comes at call ends only; state_every makes its multiples call ends (pes run's
    --checkpoint-every), whatever the chunk size, and the run stays the same."""
    steps = []
    kwargs = dict(num_steps=11, key=jax.random.PRNGKey(0))
    result = pes.train(EST, jnp.zeros(2), SGD, steps_per_call=64, state_every=4,
                       on_state=lambda s: steps.append(s.step), **kwargs)
    assert steps == [4, 8, 11]
    plain = pes.train(EST, jnp.zeros(2), SGD, steps_per_call=1, **kwargs)
    assert list(result.history) == list(plain.history)
    with pytest.raises(ValueError, match="state_every=0"):
        pes.train(EST, jnp.zeros(2), SGD, state_every=0, **kwargs)


def test_the_step_check_is_traced_once_per_system_and_theta_shape():
    """Every estimator init (so every pes.train call) checks the system's step by tracing it;
    the check is remembered for the same system and theta shapes (that trace cost more than
    a whole call of cheap outer steps), and a new shape is checked afresh."""
    from pes.system import check_step_output

    traces = []

    class Counted(Drift):
        def step(self, s, theta, t, key):
            traces.append(t)
            return super().step(s, theta, t, key)

    system, key = Counted(), jax.random.PRNGKey(0)
    assert check_step_output(system, jnp.zeros(2), key) is False
    assert check_step_output(system, jnp.ones(2), jax.random.PRNGKey(1)) is False
    assert len(traces) == 1
    with pytest.raises((TypeError, ValueError)):  # another theta shape: checked afresh
        check_step_output(system, jnp.zeros(3), key)
    assert len(traces) == 2
