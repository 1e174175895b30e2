"""MLP training as a System: the contract, the SGD-with-momentum step, the objectives,
evaluation, the two image tasks and random search. Tiny synthetic data keep it fast."""

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pes
from pes.paper.random_search import random_search, running_best
from pes.system import check_step_output, check_system
from pes.tasks.many_hyperparameters import ManyHyperparameters
from pes.tasks.mlp import Hyperparameters, MLPSystem, apply_mlp, cross_entropy, synthetic_data
from pes.tasks.mnist_lr_schedule import THETA0, MnistLRSchedule

KEY = jax.random.PRNGKey(0)
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
DATA = synthetic_data(num_train=256, num_valid=64, num_test=64, dim=20, noise=0.5)
SMALL = dict(data=DATA, horizon=12, hidden_sizes=(16,), batch_size=8)
GOOD = jnp.array([math.log(0.1), math.log(0.01)], jnp.float32)  # lr0 0.1, almost no decay


def momentum(state):
    """The SGD momentum buffers in MnistLRSchedule's state (a pes.TrainingLoop's optax
    state: inject_hyperparams around sgd = chain(trace, scale))."""
    return state.opt_state.inner_state[0].trace


def with_momentum(state, m):
    inner = state.opt_state.inner_state
    opt = state.opt_state._replace(inner_state=(inner[0]._replace(trace=m), *inner[1:]))
    return state._replace(opt_state=opt)


@pytest.fixture(scope="module")
def lr_task():
    return MnistLRSchedule("loss", **SMALL)


def test_system_contract(lr_task):
    assert check_system(lr_task) == 12
    theta = lr_task.defaults().initial_theta()
    np.testing.assert_allclose(theta, THETA0, rtol=1e-6)
    assert theta.shape == (2,) and theta.dtype == jnp.float32
    check_step_output(lr_task, theta, KEY)
    s0 = lr_task.init(KEY)
    assert [p.shape for p in s0.params] == [(20, 16), (16,), (16, 10), (10,)]
    assert all(float(jnp.abs(m).sum()) == 0 for m in momentum(s0))
    assert int(s0.opt_state.count) == 0
    s1, loss = jax.jit(lr_task.step)(s0, theta, jnp.int32(0), KEY)
    assert loss.shape == () and loss.dtype == jnp.float32 and int(s1.opt_state.count) == 1
    assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s0)
    assert lr_task.layer_sizes == (20, 16, 10) and lr_task.num_tensors == 4


def test_step_is_sgd_with_momentum(lr_task):
    theta = jnp.array([math.log(0.05), math.log(2.0)], jnp.float32)
    t = jnp.int32(6)
    lr = 0.05 / (1 + 6 / 12) ** 2.0
    np.testing.assert_allclose(lr_task.learning_rate(theta, t), lr, rtol=1e-5)
    state = lr_task.init(KEY)
    state = with_momentum(state, tuple(jnp.full_like(p, 0.01) for p in state.params))
    new, loss = jax.jit(lr_task.step)(state, theta, t, KEY)
    x, y = lr_task.minibatch(KEY)
    want_loss, grads = jax.jit(jax.value_and_grad(
        lambda p: cross_entropy(apply_mlp(p, x), y)))(state.params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for p, m, g, p1, m1 in zip(state.params, momentum(state), grads, new.params, momentum(new),
                               strict=True):
        np.testing.assert_allclose(m1, 0.9 * m + g, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(p1, p - lr * (0.9 * m + g), rtol=1e-5, atol=1e-7)


def test_minibatches_come_from_the_key(lr_task):
    a = lr_task.minibatch(jax.random.PRNGKey(1))
    b = lr_task.minibatch(jax.random.PRNGKey(1))
    c = lr_task.minibatch(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (8, 20) and a[1].shape == (8,)


def test_training_reduces_the_loss():
    task = MnistLRSchedule("loss", **{**SMALL, "horizon": 40})
    state, losses = jax.jit(task.episode)(GOOD, KEY)
    before = task._full_metrics(task.init(jax.random.split(KEY)[0]).params,
                                task.train_images, task.train_labels)[0]
    after = task._full_metrics(state.params, task.train_images, task.train_labels)[0]
    assert float(after) < 0.5 * float(before)
    assert float(losses[-10:].mean()) < float(losses[:5].mean())


def test_evaluate_matches_pes_evaluate(lr_task):
    out = lr_task.evaluate(GOOD, KEY)
    assert set(out) == {"meta_loss", "final_valid_loss", "final_valid_accuracy",
                        "final_test_loss", "final_test_accuracy"}
    assert all(np.isfinite(float(v)) for v in out.values())
    # The same episode keys as pes.unroll, so the meta-objective agrees with it.
    _, losses = jax.jit(lambda th: pes.unroll(lr_task, th, KEY, lr_task.horizon))(GOOD)
    np.testing.assert_allclose(out["meta_loss"], losses.mean(), rtol=1e-5)
    assert 0.0 <= float(out["final_valid_accuracy"]) <= 1.0


def test_evaluate_many_and_surface(lr_task):
    thetas = jnp.stack([GOOD, jnp.asarray(THETA0, jnp.float32), GOOD + 0.5])
    many = lr_task.evaluate_many(thetas, KEY, chunk_size=2)
    assert many["meta_loss"].shape == (3,)
    for i in range(3):
        np.testing.assert_allclose(many["meta_loss"][i],
                                   lr_task.evaluate(thetas[i], KEY)["meta_loss"], rtol=1e-4)
    keys = jax.random.split(KEY, 3)
    per_row = lr_task.evaluate_many(thetas, keys, chunk_size=2)
    np.testing.assert_allclose(per_row["meta_loss"][2],
                               lr_task.evaluate(thetas[2], keys[2])["meta_loss"], rtol=1e-4)
    a, b = np.array([-3.0, -2.0], np.float32), np.array([-4.0, 0.0, 1.0], np.float32)
    surf = lr_task.surface(a, b, KEY, chunk_size=2)
    assert surf["meta_loss"].shape == (2, 3)
    np.testing.assert_allclose(surf["meta_loss"][1, 2],
                               lr_task.evaluate(jnp.array([-2.0, 1.0]), KEY)["meta_loss"],
                               rtol=1e-4)
    assert [x.shape for x in lr_task.heatmap_axes(5)] == [(5,), (5,)]


def test_objectives():
    acc = MnistLRSchedule("accuracy", **{**SMALL, "horizon": 40})
    _, losses = jax.jit(acc.episode)(GOOD, KEY)
    assert bool(jnp.all((losses <= 0) & (losses >= -1)))
    assert float(losses[-10:].mean()) < float(losses[:5].mean()) - 0.2
    assert "tbptt" not in acc.defaults().estimators  # not differentiable
    valid = MnistLRSchedule("valid_loss", **SMALL)
    _, vl = jax.jit(valid.episode)(GOOD, KEY)
    assert bool(jnp.all(vl > 0))
    with pytest.raises(ValueError, match="objective"):
        MnistLRSchedule("error", **SMALL)
    with pytest.raises(ValueError, match="size"):
        MnistLRSchedule("loss", size="huge", data=DATA)


def test_divergence_is_capped(lr_task):
    _, losses = jax.jit(lr_task.episode)(jnp.array([8.0, -5.0], jnp.float32), KEY)
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert float(losses.max()) <= np.float32(lr_task.loss_cap)
    np.testing.assert_allclose(losses[-1], lr_task.loss_cap, rtol=1e-6)
    out = lr_task.evaluate(jnp.array([8.0, -5.0]), KEY)
    assert all(np.isfinite(float(v)) for v in out.values())


def test_defaults_and_sizes():
    d = MnistLRSchedule("loss", **SMALL).defaults()
    assert d.estimator_settings("pes") == {"num_particles": 20, "sigma": 0.1,
                                           "truncation_length": 10}
    assert d.optimizer.name == "adam"
    paper = MnistLRSchedule("loss", data=DATA, size="paper", hidden_sizes=(8,))
    pd = paper.defaults()
    assert paper.horizon == 5000 and paper.batch_size == 100
    assert pd.estimator_settings("pes") == {"num_particles": 1000, "sigma": 0.1,
                                            "truncation_length": 10}
    assert (pd.optimizer.name, pd.optimizer.learning_rate) == ("adam", 1e-2)


def test_pes_estimate_on_the_task(lr_task):
    est = pes.PES(lr_task, num_particles=4, sigma=0.1, truncation_length=4, stagger=False)
    state = est.init(KEY, GOOD)
    grad, state, info = est.estimate(state, GOOD, KEY)
    assert grad.shape == (2,) and bool(jnp.all(jnp.isfinite(grad)))
    assert np.isfinite(float(info.loss)) and int(info.inner_steps) > 0


@pytest.mark.slow
def test_on_real_fashion_mnist():
    if not DEBIAN.is_dir():
        reason = f"{DEBIAN} is absent (`apt-get install dataset-fashion-mnist`)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI must install it rather than skip this test")
        pytest.skip(reason)
    task = MnistLRSchedule("loss", horizon=30)  # Fashion-MNIST from its Debian folder
    assert task.layer_sizes == (784, 100, 100, 10) and task.data_name == "fashion-mnist"
    assert task.train_images.shape == (50000, 784) and task.valid_images.shape == (10000, 784)
    out = task.evaluate(jnp.array([math.log(0.05), math.log(0.1)]), KEY)
    assert float(out["final_valid_accuracy"]) > 0.55  # 30 steps of batch 100
    assert float(out["meta_loss"]) < 1.6


# --------------------------------------------------------------------- many hyperparameters


def test_many_hyperparameters_has_29_for_the_paper_network():
    task = ManyHyperparameters(data=synthetic_data(8, 4, 4, dim=784), size="paper")
    assert task.layer_sizes == (784, 100, 100, 100, 100, 100, 10)
    assert task.num_hyperparameters == 29 and len(task.theta_names()) == 29
    assert task.horizon == 1000
    d = task.defaults()
    assert len(d.theta0) == 29 and d.initial_theta().shape == (29,)
    assert d.estimator_settings("pes") == {"num_particles": 10, "sigma": 0.3,
                                           "truncation_length": 10}
    np.testing.assert_allclose(d.initial_theta(), task.sample_theta(jax.random.PRNGKey(0)))
    hp = task.unpack(d.initial_theta())
    assert hp["learning_rates"].shape == (12,) and hp["keep"].shape == (5,)
    assert bool(jnp.all((hp["learning_rates"] >= 1e-4 * 0.999) & (hp["learning_rates"] <= 0.3)))
    assert bool(jnp.all((hp["keep"] >= 0.5) & (hp["keep"] < 1)))


@pytest.fixture(scope="module")
def many_task():
    return ManyHyperparameters(data=DATA, horizon=10, hidden_sizes=(12, 12), batch_size=8)


def test_many_hyperparameters_step(many_task):
    assert many_task.num_hyperparameters == 2 * 6 + 2
    theta = many_task.sample_theta(KEY)
    assert theta.shape == (14,)
    check_step_output(many_task, theta, KEY)
    # Keep logits of +30 (keep = 1) make dropout the identity: the step is then plain
    # per-tensor SGD with momentum.
    n = many_task.num_tensors
    lrs = jnp.log(jnp.linspace(0.01, 0.06, n))
    theta = jnp.concatenate([lrs, jnp.full(n, 2.0), jnp.full(2, 30.0)])
    state = many_task.init(KEY)
    step = jax.jit(many_task.step)
    new, _ = step(state, theta, jnp.int32(0), KEY)
    x, y = many_task.minibatch(KEY)
    grads = jax.jit(jax.grad(lambda p: cross_entropy(apply_mlp(p, x), y)))(state.params)
    for i, (p, g, p1) in enumerate(zip(state.params, grads, new.params, strict=True)):
        np.testing.assert_allclose(p1, p - jnp.exp(lrs[i]) * g, rtol=1e-4, atol=1e-6)
    # Low keep probabilities change the step (a discrete, key-driven effect).
    dropped = theta.at[-2:].set(-1.0)
    new_d, _ = step(state, dropped, jnp.int32(0), KEY)
    assert not np.allclose(new_d.params[0], new.params[0])


def test_hyperparameters_must_be_defined():
    task = MLPSystem(DATA, hidden_sizes=(4,), horizon=3)
    with pytest.raises(NotImplementedError):
        task.step(task.init(KEY), jnp.zeros(1), jnp.int32(0), KEY)
    assert Hyperparameters((1.0,), (0.0,)).keep is None


# ---------------------------------------------------------------------------- random search


def test_random_search_best_so_far(many_task):
    res = random_search(many_task, 5, KEY, batch_size=2)
    assert res.thetas.shape == (5, 14) and res.meta_losses.shape == (5,)
    np.testing.assert_array_equal(res.inner_steps, [10, 20, 30, 40, 50])
    assert np.all(np.diff(res.best_so_far) <= 0)
    np.testing.assert_allclose(res.best_so_far, np.minimum.accumulate(res.meta_losses))
    i = int(res.best_index[-1])
    assert res.meta_losses[i] == res.best_so_far[-1]
    np.testing.assert_array_equal(res.best_theta, res.thetas[i])
    # Configurations come from the task's prior, row i from fold_in(k_sample, i).
    k_sample, k_eval = jax.random.split(KEY)
    np.testing.assert_allclose(res.thetas[3], many_task.sample_theta(jax.random.fold_in(
        k_sample, 3)))
    # Row i's episode uses fold_in(k_eval, i), whatever the chunking.
    keys = jnp.stack([jax.random.fold_in(k_eval, 3), jax.random.fold_in(k_eval, 0)])
    direct = many_task.evaluate_many(res.thetas[[3, 0]], keys, chunk_size=2)
    np.testing.assert_allclose(direct["meta_loss"], res.meta_losses[[3, 0]], rtol=1e-4)
    # A shorter search is a prefix of a longer one.
    shorter = random_search(many_task, 3, KEY, batch_size=2)
    np.testing.assert_allclose(shorter.meta_losses, res.meta_losses[:3], rtol=1e-4)
    assert np.all(np.isfinite(res.meta_losses)) and np.all(res.meta_losses > 0)
    np.testing.assert_allclose(res.best_at([5, 10, 29, 1000]),
                               [np.nan, res.best_so_far[0], res.best_so_far[1],
                                res.best_so_far[-1]])
    assert set(res.metrics) >= {"meta_loss", "final_valid_accuracy"}


def test_random_search_generic_task_and_errors():
    from pes.tasks import ToyRegression

    class Sampled(ToyRegression):
        def sample_theta(self, key):
            return jax.random.uniform(key, (2,), minval=-5.0, maxval=5.0)

    res = random_search(Sampled(), 3, KEY, batch_size=2, metric="meta_objective")
    assert res.inner_steps[-1] == 300 and np.all(np.diff(res.best_so_far) <= 0)
    with pytest.raises(TypeError, match="sample_theta"):
        random_search(ToyRegression(), 2, KEY)
    with pytest.raises(ValueError, match="num_configs"):
        random_search(Sampled(), 0, KEY)
    best, index = running_best([3.0, np.nan, 1.0, 2.0])
    np.testing.assert_array_equal(best, [3.0, 3.0, 1.0, 1.0])
    np.testing.assert_array_equal(index, [0, 0, 2, 2])
