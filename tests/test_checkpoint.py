"""pes.runs.checkpoint: the complete TrainState of every estimator survives a write and a read
exactly (structure, dtypes, bits), and a write cut short never becomes the latest."""

import jax
import numpy as np
import pytest

import pes
from pes.runs import build
from pes.runs.checkpoint import TMP_SUFFIX, Checkpointer, abstract_state
from pes.runs.registry import ESTIMATOR_NAMES

ES = {"num_particles": 4}


def _assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# PES and RTRL in make test; the other six (20-60 s each under load) in the slow set.
@pytest.mark.parametrize("estimator", [
    n if n in ("pes", "rtrl") else pytest.param(n, marks=pytest.mark.slow)
    for n in ESTIMATOR_NAMES])
def test_checkpointed_state_continues_exactly(tmp_path, estimator):
    """Train 2 steps, checkpoint, restore into a fresh abstract state and train on: the same
    theta and records as 4 uninterrupted steps, for every estimator (adam state included)."""
    extra = ES if estimator in ("pes", "tes", "full-es", "nres") else {}
    s = build("toy-regression", estimator, optimizer="adam", **extra)
    key = jax.random.PRNGKey(5)
    states = []
    full_theta, full = pes.train(s.estimator, s.theta0, s.optimizer, num_steps=4, key=key,
                                 on_state=states.append)
    with Checkpointer(tmp_path / "ck", asynchronous=False) as ckpt:
        ckpt.save(states[1], key, {"note": "x"})
    with Checkpointer(tmp_path / "ck") as ckpt:
        state, key_data, meta = ckpt.restore(abstract_state(s.estimator, s.optimizer, s.theta0))
    _assert_same(state, states[1])
    assert (state.step, state.inner_steps) == (2, states[1].inner_steps)
    assert meta["note"] == "x" and meta["step"] == 2
    np.testing.assert_array_equal(key_data, key)
    theta, rest = pes.train(s.estimator, s.theta0, s.optimizer, num_steps=4, key=key_data,
                            resume=state)
    assert list(rest) == list(full)[2:]
    np.testing.assert_array_equal(theta, full_theta)


def test_sgd_state_with_empty_nodes_round_trips(tmp_path):
    s = build("influence-balancing", "tes", optimizer="sgd", num_particles=4)
    states = []
    pes.train(s.estimator, s.theta0, s.optimizer, num_steps=1, key=jax.random.PRNGKey(0),
              on_state=states.append)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(states[0], jax.random.PRNGKey(0))
        ckpt.wait()
        state, _, _ = ckpt.restore(abstract_state(s.estimator, s.optimizer, s.theta0))
    _assert_same(state, states[0])


def test_keeps_the_last_few_and_ignores_partial_writes(tmp_path):
    s = build("toy-regression", "tbptt")
    states = []
    key = jax.random.PRNGKey(0)
    pes.train(s.estimator, s.theta0, s.optimizer, num_steps=5, key=key, on_state=states.append)
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        for state in states:
            assert ckpt.save(state, key)
        assert not ckpt.save(states[-1], key)  # the same step again: nothing to do
    # A write cut short: orbax's temporary folder, never renamed into place.
    partial = tmp_path / f"6{TMP_SUFFIX}"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path) as ckpt:
        assert not partial.exists()  # removed on opening
        assert ckpt.steps() == [3, 4, 5] and ckpt.latest_step() == 5
        state, _, meta = ckpt.restore(abstract_state(s.estimator, s.optimizer, s.theta0))
        assert meta["step"] == 5
        _assert_same(state, states[-1])
        with pytest.raises(ValueError, match="already holds a later checkpoint"):
            ckpt.save(states[0], key)


def test_restoring_into_a_different_state_is_refused(tmp_path):
    s = build("toy-regression", "pes", num_particles=4)
    states = []
    key = jax.random.PRNGKey(0)
    pes.train(s.estimator, s.theta0, s.optimizer, num_steps=1, key=key, on_state=states.append)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(states[0], key)
    other = build("toy-regression", "pes", num_particles=6)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"holds \['estimator_state'\].inner as "
                           r"float32\[2, 2, 2\], but this run's state has float32\[3, 2, 2\]"):
            ckpt.restore(abstract_state(other.estimator, other.optimizer, other.theta0))
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(abstract_state(s.estimator, s.optimizer, s.theta0))
