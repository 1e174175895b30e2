"""TextLSTM: System contract, the three sequences, one step by hand, loss at init ~ log V."""

import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pes.system import check_step_output, check_system, unroll
from pes.tasks.text_lstm import LSTMState, TextLSTM, load_text, vocabulary

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def task():
    return TextLSTM("text", sequence_length=50)


def test_text_ships_with_the_package():
    raw = importlib.resources.files("pes.tasks").joinpath("data", "pride_and_prejudice.txt")
    assert raw.is_file()
    text = load_text()
    assert len(text) >= 1001 and text.startswith("It is a truth universally acknowledged")
    assert vocabulary() == "".join(sorted(set(text))) and len(vocabulary()) == 43


def test_system_contract(task):
    assert check_system(task) == 50 and task.horizon == 50
    theta = task.init_theta(KEY)
    assert theta.shape == (task.num_params,) and theta.dtype == jnp.float32
    assert task.num_params == 4 * 5 * (43 + 5 + 1) + 6 * 43
    check_step_output(task, theta, KEY)
    s0 = task.init(KEY)
    assert isinstance(s0, LSTMState) and s0.h.shape == (5,) and s0.c.shape == (5,)
    s1, loss = jax.jit(task.step)(s0, theta, jnp.int32(0), KEY)
    assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s0)
    assert s1.pos == 1 and loss.shape == () and loss.dtype == jnp.float32
    # Two episodes: the state restarts at position 0 after T steps (the second episode
    # repeats the first and ends at position T again).
    final, losses = unroll(task, theta, KEY, 2 * task.horizon)
    assert final.pos == task.horizon and losses.shape == (100,)
    np.testing.assert_allclose(losses[:50], losses[50:], rtol=1e-6)
    defaults = task.defaults()
    assert defaults.initial_theta().shape == (task.num_params,)


def test_step_matches_a_hand_written_lstm(task):
    theta = np.asarray(task.init_theta(KEY), np.float64)
    p = jax.tree_util.tree_map(np.asarray, task.unflatten(theta))
    rng = np.random.default_rng(0)
    h, c = rng.normal(size=5), rng.normal(size=5)
    state = LSTMState(jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32), jnp.float32(3))
    new, loss = jax.jit(task.step)(state, jnp.asarray(theta, jnp.float32), jnp.int32(3), KEY)
    x, y = task.tokens[3], task.tokens[4]
    sig = lambda v: 1 / (1 + np.exp(-v))
    z = p.W_x[x] + h @ p.W_h + p.b
    i, f, g, o = np.split(z, 4)
    c2 = sig(f) * c + sig(i) * np.tanh(g)
    h2 = sig(o) * np.tanh(c2)
    logits = h2 @ p.W_out + p.b_out
    expected = np.log(np.exp(logits).sum()) - logits[y]
    np.testing.assert_allclose(new.h, h2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.c, c2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_variants_produce_the_intended_sequences():
    vocab = vocabulary()
    text = TextLSTM("text", sequence_length=1000)
    assert text.tokens.shape == (1001,)
    assert "".join(vocab[i] for i in text.tokens) == load_text()[:1001]
    rand = TextLSTM("random", sequence_length=1000)
    assert rand.tokens.min() >= 0 and rand.tokens.max() < 43
    counts = np.bincount(rand.tokens, minlength=43)
    assert counts.min() > 5 and counts.max() < 50  # ~23 each
    np.testing.assert_array_equal(rand.tokens, TextLSTM("random", sequence_length=1000).tokens)
    assert not np.array_equal(rand.tokens, TextLSTM("random", 1000, seed=1).tokens)
    rep = TextLSTM("repeat", sequence_length=1000)
    assert np.all(rep.tokens == vocab.index(" "))
    assert np.all(TextLSTM("repeat", 10, repeat_char="e").tokens == vocab.index("e"))


def test_loss_at_random_init_is_about_log_vocab():
    for variant in ("text", "random", "repeat"):
        task = TextLSTM(variant, sequence_length=200)
        evaluate = jax.jit(task.evaluate)
        for seed in range(3):
            out = evaluate(task.init_theta(jax.random.PRNGKey(seed)), KEY)
            assert abs(float(out["meta_loss"]) - np.log(43)) < 0.1, (variant, out)
            np.testing.assert_allclose(out["bits_per_char"], out["meta_loss"] / np.log(2),
                                       rtol=1e-6)


def test_gradient_is_finite_and_nonzero(task):
    theta = task.init_theta(KEY)
    g = jax.grad(lambda th: unroll(task, th, KEY, task.horizon)[1].mean())(theta)
    assert np.all(np.isfinite(g)) and float(jnp.linalg.norm(g)) > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "poem"}, "variant"),
    ({"sequence_length": 1199}, "shipped text has 1199"),
    ({"sequence_length": 0}, "sequence_length"),
    ({"variant": "repeat", "repeat_char": "Z"}, "repeat_char"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextLSTM(**kwargs)


def test_bad_theta_shape_is_refused(task):
    with pytest.raises(ValueError, match="flat vector"):
        task.unflatten(jnp.zeros((3,)))
