"""pes.TrainingLoop: a user's optax training loop as a System (pytree, Equinox and Flax NNX
models), its objectives, loss cap, hyperparameter helpers and error messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pes

RNG = np.random.default_rng(0)
X = RNG.normal(size=(200, 5)).astype(np.float32)
Y = (X @ RNG.normal(size=5) > 0).astype(np.int32)
XV, YV = X[:60] + 0.1, Y[:60]


def init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": 0.5 * jax.random.normal(k1, (5, 8)), "b1": jnp.zeros(8),
            "w2": 0.5 * jax.random.normal(k2, (8, 2)), "b2": jnp.zeros(2)}


def apply(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def loss(p, batch, key):
    return xent(apply(p, batch[0]), batch[1])


def make(objective="train_loss", horizon=12, **kw):
    args = dict(init=init, loss=loss, batches=pes.batches_from_arrays(X, Y, batch_size=16),
                optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
                hyperparameters=lambda theta, t: {"learning_rate": jnp.exp(theta[0])},
                horizon=horizon, objective=objective)
    args.update(kw)
    return pes.TrainingLoop(**args)


def test_step_is_one_sgd_step_on_the_keys_minibatch():
    system = make()
    theta = jnp.array([math.log(0.3)])
    key = jax.random.PRNGKey(3)
    state = system.init(jax.random.PRNGKey(0))
    new, l0 = system.step(state, theta, jnp.int32(0), key)
    batch = pes.batches_from_arrays(X, Y, batch_size=16)(key, 0)
    want_loss, g = jax.value_and_grad(loss)(init(jax.random.PRNGKey(0)), batch, None)
    np.testing.assert_allclose(l0, want_loss, rtol=1e-6)
    for name in g:
        want = init(jax.random.PRNGKey(0))[name] - 0.3 * g[name]
        np.testing.assert_allclose(new.params[name], want, rtol=1e-5, atol=1e-6)
    assert float(new.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.3, rel=1e-6)
    # The step keeps every leaf's shape and dtype (a lax.scan carry).
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), new) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state)


def test_learning_rate_from_theta_changes_the_meta_objective():
    system = make(horizon=30)
    key = jax.random.PRNGKey(1)
    slow = pes.evaluate(system, jnp.array([math.log(1e-4)]), key, num_episodes=2)
    good = pes.evaluate(system, jnp.array([math.log(0.5)]), key, num_episodes=2)
    assert good < slow - 0.1, (slow, good)


@pytest.mark.parametrize("every", [3, "final"])
def test_validation_every_n_is_n_times_the_validation_loss_on_measured_steps(every):
    horizon = 12
    system = make(pes.Validation(XV, YV, batch_size=20, every=every), horizon=horizon)
    n = horizon if every == "final" else every
    theta = jnp.array([math.log(0.2)])
    _, losses = pes.unroll(system, theta, jax.random.PRNGKey(2), horizon)
    measured = (np.arange(horizon) + 1) % n == 0
    assert np.all(np.asarray(losses)[~measured] == 0)
    # Rebuild the measured values by hand: the updated model on the validation minibatch.
    state = system.init(jax.random.split(jax.random.PRNGKey(2))[0])
    k_steps = jax.random.split(jax.random.PRNGKey(2))[1]
    vals = []
    step = jax.jit(system.step)
    for t in range(horizon):
        k = pes.system.step_key(k_steps, jnp.int32(t))[0]
        state, _ = step(state, theta, jnp.int32(t), k)
        if measured[t]:
            vb = system.objective.sample(jax.random.fold_in(k, 2), t)
            vals.append(float(loss(state.params, vb, None)))
    np.testing.assert_allclose(np.asarray(losses)[measured], n * np.array(vals), rtol=1e-5)
    np.testing.assert_allclose(float(losses.mean()), np.mean(vals), rtol=1e-5)


def test_loss_cap_bounds_diverging_runs():
    raw = make(horizon=20)
    capped = make(horizon=20, loss_cap=5.0)
    theta = jnp.array([math.log(1e4)])  # diverges
    _, raw_losses = pes.unroll(raw, theta, jax.random.PRNGKey(0), 20)
    _, capped_losses = pes.unroll(capped, theta, jax.random.PRNGKey(0), 20)
    assert not np.all(np.isfinite(raw_losses)) or float(np.max(raw_losses)) > 1e3
    assert np.all(np.isfinite(capped_losses)) and float(np.max(capped_losses)) == 5.0
    fine = jnp.array([math.log(0.1)])
    np.testing.assert_array_equal(pes.unroll(raw, fine, jax.random.PRNGKey(0), 20)[1],
                                  pes.unroll(capped, fine, jax.random.PRNGKey(0), 20)[1])


@pytest.mark.slow
def test_pes_gradient_points_toward_a_better_learning_rate():
    """At a too-small learning rate the PES estimate of d meta-loss / d log lr is negative
    in every one of 5 seeds (a sign-flipped estimate would fail)."""
    system = make(horizon=20, loss_cap=10.0)
    est = pes.PES(system, num_particles=16, sigma=0.2, truncation_length=5)
    theta = jnp.array([math.log(1e-2)])
    for seed in range(5):
        state = est.init(jax.random.PRNGKey(seed), theta)
        total = 0.0
        for i in range(4):
            g, state, _ = est.estimate(state, theta, jax.random.PRNGKey(100 + 10 * seed + i))
            total += float(g[0])
        assert total < 0, (seed, total)


def test_schedules_and_per_layer_rates():
    T = 100
    assert float(pes.log_linear(math.log(1.0), math.log(1e-2), 0, T)) == pytest.approx(1.0)
    assert float(pes.log_linear(math.log(1.0), math.log(1e-2), 50, T)) == pytest.approx(0.1,
                                                                                      rel=1e-5)
    assert float(pes.inverse_time(math.log(0.1), math.log(2.0), T, T)) == pytest.approx(0.025,
                                                                                     rel=1e-5)
    # Per-layer rates: leaf i moves by scales[i] * lr * g_i.
    n = 4
    system = make(optimizer=optax.chain(
        optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
        optax.inject_hyperparams(pes.scale_by_layer)(scales=jnp.ones(n))),
        hyperparameters=lambda theta, t: {"scales": jnp.exp(theta)})
    assert set(system.hyperparameter_names) == {"learning_rate", "scales"}
    theta = jnp.log(jnp.array([0.1, 0.0001, 0.2, 0.0001]))
    state = system.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(5)
    new, _ = system.step(state, theta, jnp.int32(0), key)
    batch = pes.batches_from_arrays(X, Y, batch_size=16)(key, 0)
    g = jax.grad(loss)(state.params, batch, None)
    names = [k for k in sorted(g)]  # tree_leaves order of a dict: sorted keys
    for i, name in enumerate(names):
        want = state.params[name] - float(jnp.exp(theta[i])) * g[name]
        np.testing.assert_allclose(new.params[name], want, rtol=1e-5, atol=1e-7)


def test_clear_errors():
    theta = jnp.array([0.0])
    bad_key = make(hyperparameters=lambda theta, t: {"lr": jnp.exp(theta[0])})
    with pytest.raises(ValueError, match=r"\['lr'\].*optimizer does not have.*learning_rate"):
        pes.unroll(bad_key, theta, jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match=r"\['learning_rate'\] has shape \(2,\)"):
        pes.unroll(make(hyperparameters=lambda theta, t: {"learning_rate": jnp.ones(2)}),
                   theta, jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match=r"loss\(model, batch, key\) must return a float scalar"):
        make(loss=lambda p, b, k: jnp.sum(apply(p, b[0]), axis=1))
    with pytest.raises(TypeError, match="inject_hyperparams"):
        make(optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="every=5 must divide horizon=12"):
        make(pes.Validation(XV, YV, batch_size=8, every=5))
    with pytest.raises(ValueError, match="same non-empty first axis"):
        pes.batches_from_arrays(X, Y[:10], batch_size=4)
    with pytest.raises(TypeError, match="init=.*must be callable"):
        make(init=None)
    with pytest.raises(ValueError, match="no floating-point arrays"):
        make(init=lambda key: {"steps": jnp.zeros(3, jnp.int32)})


def _mlp_checks(system, apply_model):
    """Shared by the Equinox and Flax tests: the model round-trips, PES gives a finite
    gradient, and the trained model from episode() is better than the initial one."""
    theta = jnp.array([math.log(0.3)])
    state = system.init(jax.random.PRNGKey(0))
    assert all(jnp.issubdtype(x.dtype, jnp.floating)
               for x in jax.tree_util.tree_leaves(state.params))
    est = pes.PES(system, num_particles=4, sigma=0.1, truncation_length=4)
    g, _, info = est.estimate(est.init(jax.random.PRNGKey(1), theta), theta, jax.random.PRNGKey(2))
    assert np.all(np.isfinite(g)) and np.isfinite(info.loss)
    final, losses = system.episode(theta, jax.random.PRNGKey(3))
    before = xent(apply_model(system.model(system.init(jax.random.PRNGKey(4))), X), Y)
    after = xent(apply_model(system.model(final), X), Y)
    assert after < before - 0.05, (before, after)


@pytest.mark.slow
def test_equinox_model():
    eqx = pytest.importorskip("equinox")
    system = make(init=lambda key: eqx.nn.MLP(5, 2, 8, 1, key=key),
                  loss=lambda m, b, k: xent(jax.vmap(m)(b[0]), b[1]), horizon=40)
    _mlp_checks(system, lambda m, x: jax.vmap(m)(x))


@pytest.mark.slow
def test_flax_nnx_model():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    system = make(init=lambda key: MLP(nnx.Rngs(params=key)),
                  loss=lambda m, b, k: xent(m(b[0]), b[1]), horizon=40)
    _mlp_checks(system, lambda m, x: m(x))
