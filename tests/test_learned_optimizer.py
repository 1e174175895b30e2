"""The learned optimizer as an optax transformation (update rule, files), the
learned-optimizer task as a System, and its command line (`pes run` writes the optimizer's
file, `pes compare` at --size tiny) on generated data."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_data import make_dataset_dir
from typer.testing import CliRunner

import pes
from pes import learned_optimizer as lo
from pes.cli import app
from pes.system import check_step_output, check_system
from pes.tasks.learned_optimizer import SIZES, LearnedOptimizerTask
from pes.tasks.mlp import synthetic_data

KEY = jax.random.PRNGKey(0)
ARCH = lo.LearnedOptimizer(hidden_sizes=(8,))
PARAMS = {"w": jax.random.normal(KEY, (5, 3)), "b": jnp.zeros((3,))}
GRADS = {"w": jax.random.normal(jax.random.PRNGKey(1), (5, 3)),
         "b": jax.random.normal(jax.random.PRNGKey(2), (3,))}


def test_update_shapes_and_small_adam_like_first_steps():
    tx = ARCH.transformation(ARCH.init_weights(KEY))
    state = tx.init(PARAMS)
    assert int(state.step) == 0 and len(state.momenta) == len(ARCH.momentum_decays)
    updates, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(PARAMS)
    for name in PARAMS:
        u = np.asarray(updates[name])
        assert u.shape == PARAMS[name].shape and u.dtype == np.float32
        # Small: a few step_scale per element, far below the parameters' O(1) scale.
        assert np.abs(u).max() < 10 * ARCH.step_scale
        # Descent: the untrained rule moves against the gradient (Adam-like prior).
        assert float(np.sum(u * np.asarray(GRADS[name]))) < 0
    assert int(state.step) == 1
    np.testing.assert_allclose(state.momenta[1]["w"], 0.1 * GRADS["w"], rtol=1e-6)
    np.testing.assert_allclose(state.second_moment["b"], 0.001 * GRADS["b"] ** 2, rtol=1e-5)


def test_update_rule_matches_its_formula():
    weights = ARCH.init_weights(jax.random.PRNGKey(3))
    g, p = GRADS["w"], PARAMS["w"]
    state = ARCH.init_state(p)
    u, _ = ARCH.update(weights, g, state, p)
    momenta = [(1 - b) * g for b in ARCH.momentum_decays]
    v = (1 - ARCH.second_moment_decay) * g**2
    x = ARCH.features(g, p, momenta, v, jnp.int32(0))
    assert x.shape == (5, 3, ARCH.num_features) == (5, 3, len(ARCH.feature_names()))
    # Per-tensor normalised features have unit mean square; the time features are tanh(0).
    np.testing.assert_allclose(jnp.mean(x[..., :-4] ** 2, axis=(0, 1)), 1.0, rtol=1e-3)
    np.testing.assert_allclose(x[..., -4:], 0.0)
    out = ARCH.apply_mlp(weights, x)
    a = 4.0 * jnp.tanh(out[..., 1] / 4.0)
    want = out[..., 0] * jnp.exp(a * ARCH.exp_scale) * ARCH.step_scale
    np.testing.assert_allclose(u, want, rtol=1e-5)
    # The soft limit: a huge log-magnitude gives at most exp(4) times the step scale.
    big = weights._replace(skip=weights.skip.at[0, 1].set(1e4))
    u_big, _ = ARCH.update(big, g, state, p)
    d = ARCH.apply_mlp(big, x)[..., 0]
    assert float(jnp.max(jnp.abs(u_big) / (jnp.abs(d) + 1e-12))) <= np.exp(4.0) * 3e-4 * 1.0001


def test_update_needs_params():
    tx = ARCH.transformation(ARCH.init_weights(KEY))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(GRADS, tx.init(PARAMS))


def test_flatten_round_trip_and_bad_shapes():
    weights = ARCH.init_weights(KEY)
    theta = ARCH.flatten(weights)
    assert theta.shape == (ARCH.num_weights,) and theta.dtype == jnp.float32
    back = ARCH.unflatten(theta)
    for a, b in zip(jax.tree_util.tree_leaves(weights), jax.tree_util.tree_leaves(back),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="weights"):
        ARCH.unflatten(theta[:-1])
    with pytest.raises(ValueError, match="this architecture needs"):
        lo.LearnedOptimizer(hidden_sizes=(4,)).flatten(weights)
    with pytest.raises(ValueError, match="momentum_decays"):
        lo.LearnedOptimizer(momentum_decays=(1.5,))


def test_save_load_round_trip(tmp_path):
    weights = ARCH.init_weights(jax.random.PRNGKey(7))
    path = lo.save(tmp_path / "opt.npz", ARCH, weights, {"note": "test"})
    arch, loaded, meta = lo.read(path)
    assert arch == ARCH and meta == {"note": "test"}
    tx, tx2 = ARCH.transformation(weights), lo.load(path)
    assert isinstance(tx2, optax.GradientTransformation)
    params, p2 = PARAMS, PARAMS
    s, s2 = tx.init(params), tx2.init(p2)
    for _ in range(3):  # the same trajectory, step by step
        u, s = tx.update(GRADS, s, params)
        u2, s2 = tx2.update(GRADS, s2, p2)
        params, p2 = optax.apply_updates(params, u), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # A flat theta saves the same file content.
    lo.save(tmp_path / "flat.npz", ARCH, ARCH.flatten(weights))
    np.testing.assert_array_equal(ARCH.flatten(lo.read(tmp_path / "flat.npz")[1]),
                                  ARCH.flatten(weights))


def _rewrite(src, dst, header=None, **arrays):
    with np.load(src) as d:
        data = {k: d[k] for k in d.files}
    if header is not None:
        data["header"] = np.array(json.dumps(header))
    data.update(arrays)
    data = {k: v for k, v in data.items() if v is not None}
    np.savez(dst, **data)
    return dst


def test_bad_files_raise_one_clear_error(tmp_path):
    good = lo.save(tmp_path / "good.npz", ARCH, ARCH.init_weights(KEY))
    header = json.loads(str(np.load(good)["header"]))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        lo.load(tmp_path / "missing.npz")
    text = tmp_path / "text.npz"
    text.write_text("not an npz")
    cases = [
        (text, "not a learned-optimizer .npz file"),
        (_rewrite(good, tmp_path / "v.npz", {**header, "version": 99}), "format version 99"),
        (_rewrite(good, tmp_path / "f.npz", {**header, "format": "other"}),
         "does not say format"),
        (_rewrite(good, tmp_path / "a.npz", {**header, "architecture": {"hidden_sizes": [0]}}),
         "bad architecture"),
        (_rewrite(good, tmp_path / "s.npz", W0=np.zeros((3, 3), np.float32)),
         "layer 0 has shapes"),
        (_rewrite(good, tmp_path / "n.npz", b1=np.full(2, np.nan, np.float32)),
         "layer 1 has non-finite"),
        (_rewrite(good, tmp_path / "k.npz", skip=None), "skip weights are missing"),
    ]
    no_header = tmp_path / "nh.npz"
    np.savez(no_header, W0=np.zeros(3))
    cases.append((no_header, "no header"))
    for path, message in cases:
        with pytest.raises(lo.LearnedOptimizerFileError, match=message) as info:
            lo.load(path)
        assert str(path) in str(info.value)


# ------------------------------------------------------------------------------- the task

DATA = synthetic_data(num_train=256, num_valid=64, num_test=64, dim=16, noise=0.5)
TINY = dict(data=DATA, image_size=None, size="tiny")


@pytest.fixture(scope="module")
def task():
    return LearnedOptimizerTask(**TINY)


def test_task_is_a_system(task):
    assert isinstance(task, pes.System) and check_system(task) == 12
    theta = task.defaults().initial_theta()
    assert theta.shape == (task.num_weights,) and theta.dtype == jnp.float32
    check_step_output(task, theta, KEY)
    s0, s0b = task.init(KEY), task.init(jax.random.PRNGKey(1))
    assert [p.shape for p in s0.params] == [(16, 8), (8,), (8, 10), (10,)]
    assert not np.allclose(s0.params[0], s0b.params[0])  # each episode its own init
    s1, loss = jax.jit(task.step)(s0, theta, jnp.int32(0), KEY)
    assert loss.shape == () and np.isfinite(loss) and int(s1.step) == 1
    assert int(s1.opt.step) == 1
    assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s0)
    d = task.defaults()
    assert d.estimator_settings("pes") == {"num_particles": 4, "sigma": 0.01,
                                           "truncation_length": 4}
    # Full ES gets PES's inner steps: num_steps * K / T outer steps.
    assert d.num_steps_for("full-es") == 1


def test_cpu_size_gives_each_estimator_its_own_rate():
    """Full ES makes T/K times fewer outer steps, so the CPU size gives each estimator the
    rate tuned for it, decayed at the same fractions of its own outer steps."""
    size = SIZES["cpu"]
    d = LearnedOptimizerTask(data=DATA, image_size=None, size="cpu").defaults()
    assert d.num_steps_for("full-es") == size.num_steps * size.truncation_length // size.horizon
    for est in ("pes", "tes", "nres", "full-es"):
        spec, steps = d.optimizer_for(est), d.num_steps_for(est)
        assert spec.learning_rate == size.learning_rate(est) == dict(size.learning_rates)[est]
        assert spec.schedule == ((round(steps / 2), 0.3), (round(3 * steps / 4), 0.3))
    assert size.learning_rate("full-es") > size.learning_rate("pes")


def test_task_episode_is_the_exported_optax_optimizer(task):
    """The task's inner step is exactly the saved optimizer used through optax."""
    theta = task.initial_theta(jax.random.PRNGKey(5))
    keys = jax.random.split(KEY, task.eval_problems)
    _, losses = jax.jit(task.episode)(theta, keys[1])
    tx = task.optimizer.transformation(task.optimizer.unflatten(theta))
    _, losses2 = jax.jit(lambda k: task.optax_episode(tx, k))(keys[1])
    np.testing.assert_allclose(losses, losses2, rtol=1e-5)
    np.testing.assert_allclose(losses.mean(), task.meta_test(theta, keys)["meta_loss"][1],
                               rtol=1e-5)


def test_evaluation_and_baselines(task):
    theta = task.initial_theta()
    ev = task.evaluate(theta, KEY)
    assert set(ev) >= {"meta_loss", "final_test_loss", "final_test_accuracy"}
    keys = jax.random.split(KEY, task.eval_problems)
    np.testing.assert_allclose(ev["meta_loss"], task.meta_test(theta, keys)["meta_loss"].mean(),
                               rtol=1e-5)
    grid = task.grid_meta_losses("sgd", [0.0, 0.5], keys)
    assert grid.shape == (2, task.eval_problems)
    assert (grid[1] < grid[0]).all()  # SGD with a real step learns; lr 0 does not
    with pytest.raises(ValueError, match="must be one of"):
        task.grid_meta_losses("rmsprop", [0.1], keys)


def test_images_are_downsampled():
    data = synthetic_data(num_train=64, num_valid=16, num_test=16, dim=784)
    data = type(data)(**{**data.__dict__, "image_shape": (28, 28)})
    task = LearnedOptimizerTask(data=data, size="tiny")
    assert task.layer_sizes[0] == 64 and task.train_images.shape == (64, 64)
    with pytest.raises(ValueError, match="square images"):
        LearnedOptimizerTask(data=DATA, size="tiny")  # 16 numbers with image_shape 784x1


# ------------------------------------------------------------------------ command line

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_dataset_dir(root / "fashion-mnist", num_train=10040, num_test=20, gz=False, seed=3)
    return root


def test_pes_run_writes_a_loadable_optimizer(tmp_path, data_dir):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["run", "learned-optimizer", "-e", "pes", "--size", "tiny",
                                 "--data-dir", str(data_dir), "--num-steps", "2", "--out",
                                 str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["outer_steps"] == 2
    arch, weights, meta = lo.read(out / "learned_optimizer.npz")
    assert meta["size"] == "tiny" and meta["layers"] == [64, 8, 10]
    np.testing.assert_allclose(arch.flatten(weights), summary["final_theta"], rtol=1e-6)
    tx = lo.load(out / "learned_optimizer.npz")
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.slow  # a whole tiny compare of four estimators: 75 s on 2 cores
def test_listed_and_compared(tmp_path, data_dir):
    listing = RUNNER.invoke(app, ["list"])
    assert listing.exit_code == 0
    lines = [line.split() for line in listing.output.splitlines()]
    assert sum(1 for words in lines if words and words[0] == "learned-optimizer") == 2
    out = tmp_path / "cmp"
    result = RUNNER.invoke(app, ["compare", "learned-optimizer", "--size", "tiny",
                                 "--data-dir", str(data_dir), "--seeds", "0", "--num-steps",
                                 "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "PES reaches a lower meta-test loss than TES in" in result.output
    res = json.loads((out / "results.json").read_text())
    row = res["per_seed"][0]
    assert set(row) == {"seed", "pes", "tes", "full-es", "nres"}
    # Full ES gets PES's window steps in whole episodes: 2 * K / T rounded up = 1 step.
    assert row["full-es"]["outer_steps"] == 1 and row["pes"]["outer_steps"] == 2
    assert res["baselines"]["sgd"]["learning_rate"] in res["baselines"]["sgd"]["grid"]
    for est in ("pes", "tes", "full-es", "nres"):
        assert (out / est / "seed-0" / "learned_optimizer.npz").is_file()
    assert (out / "meta_loss.png").stat().st_size > 1000
    assert "![meta-loss against inner steps](meta_loss.png)" in (out / "results.md").read_text()
    bad = RUNNER.invoke(app, ["compare", "learned-optimizer", "--objective", "loss",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--objective does not apply" in bad.output


def test_compare_runs_a_subset_of_estimators(tmp_path, data_dir):
    out = tmp_path / "cmp"
    result = RUNNER.invoke(app, ["compare", "learned-optimizer", "--size", "tiny",
                                 "--data-dir", str(data_dir), "--seeds", "0,1", "--num-steps",
                                 "2", "--estimators", "full-es,pes", "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["estimators"] == ["pes", "full-es"]  # the comparison's order
    assert all(set(row) == {"seed", "pes", "full-es"} for row in res["per_seed"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["full-es", "pes"]
    # Findings that need TES are not measured; the spread one is.
    assert res["pes_beats_tes_seeds"] is None and res["pes_beats_tes_in_most_seeds"] is None
    assert isinstance(res["pes_spread_smaller_than_full_es"], bool)
    assert "--estimators pes,full-es" in res["command"]
    md = (out / "results.md").read_text()
    assert "meta-test loss than TES" not in md and "Not run (--estimators): tes, nres" in md
    bad = RUNNER.invoke(app, ["compare", "learned-optimizer", "--estimators", "pes,tbptt",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'tbptt' is not in the learned-optimizer comparison" in \
        bad.output
