"""Tune your own training loop: the learning-rate schedule and weight decay of an Equinox MLP
on Fashion-MNIST (8x8), with PES, against truncated ES and random search at the same budget
of inner (optimizer) steps.

Your code is the block marked "your training loop" (15 lines): a model, a loss, the data, an
optax optimizer wrapped in ``optax.inject_hyperparams``, and ``hyperparameters(theta, t)``
mapping theta = (log lr at step 0, log lr at step T, log weight decay) to the optimizer's
values at step t. The rest of the file runs and compares the tuners.

    python examples/tune_training_loop.py            # the tutorial's size (minutes on 1 core)
    python examples/tune_training_loop.py --tiny     # seconds: the test's size

Fashion-MNIST comes from pes.data.load (Debian's dataset-fashion-mnist, or
``pes data download fashion-mnist``); without it the script uses synthetic data and says so.
"""

import argparse
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes
from pes import data as pes_data


def load_data(tiny: bool):
    """(x, y, xv, yv, xt, yt): 8x8 Fashion-MNIST images [n, 64] in [0, 1] and int labels."""
    try:
        d = pes_data.load("fashion-mnist")
        splits = [(pes_data.downsample(x[:n]), y[:n]) for (x, y), n in zip(
            (d.split("train"), d.split("valid"), d.split("test")),
            (2000, 1000, 1000) if tiny else (50000, 10000, 10000), strict=True)]
        print(f"data: Fashion-MNIST 8x8 from {d.source}")
    except pes_data.DatasetNotFoundError:
        from pes.tasks.mlp import synthetic_data

        s = synthetic_data(2000, 1000, 1000, dim=64)
        splits = [s.split(w) for w in ("train", "valid", "test")]
        print("data: Fashion-MNIST not found, using synthetic 64-d data")
    return [a for pair in splits for a in pair]


def make_system(x, y, xv, yv, T):
    # ---- your training loop (15 lines) -------------------------------------------------
    def loss(model, batch, key):
        logits = jax.vmap(model)(batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return pes.TrainingLoop(
        init=lambda key: eqx.nn.MLP(64, 10, width_size=64, depth=2, key=key),
        loss=loss,
        batches=pes.batches_from_arrays(x, y, batch_size=64),
        optimizer=optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0),
        hyperparameters=lambda theta, t: {
            "learning_rate": pes.log_linear(theta[0], theta[1], t, T),
            "weight_decay": jnp.exp(theta[2])},
        horizon=T,
        objective=pes.Validation(xv, yv, batch_size=128, every=10),
        loss_cap=2 * math.log(10.0))
    # -------------------------------------------------------------------------------------


THETA0 = (math.log(1e-4), math.log(1e-4), math.log(1e-4))  # slow learning, little decay
# Random search's box: lr in [1e-5, 1] at both ends, weight decay in [1e-6, 1].
LOW, HIGH = np.log([1e-5, 1e-5, 1e-6]), np.log([1.0, 1.0, 1.0])


def score(system, theta, xt, yt, seeds=4):
    """(mean validation loss over `seeds` fresh runs, mean test accuracy of their final
    models); the same keys for every tuner."""
    meta, acc = [], []
    for s in range(seeds):
        key = jax.random.PRNGKey(10_000 + s)
        state, losses = run_episode(system, theta, key)
        logits = jax.vmap(system.model(state))(xt)
        meta.append(float(losses.mean()))
        acc.append(float(jnp.mean(jnp.argmax(logits, 1) == yt)))
    return float(np.mean(meta)), float(np.mean(acc))


def run_episode(system, theta, key):
    fn = getattr(system, "_episode_jit", None)
    if fn is None:
        fn = system._episode_jit = jax.jit(system.episode)
    return fn(theta, key)


def tune_es(system, estimator, budget, outer_lr, seed):
    """Train theta with an ES estimator until `budget` inner steps are spent."""
    stop = lambda record, theta: record.inner_steps >= budget
    theta, history = pes.train(estimator, jnp.asarray(THETA0, jnp.float32),
                               optax.adam(outer_lr), num_steps=10**9,
                               key=jax.random.PRNGKey(seed), callback=stop)
    return theta, history[-1].inner_steps


def random_search(system, budget, seed):
    """Full runs at thetas uniform on [LOW, HIGH]; the best mean validation loss wins (one
    run each: budget // T of them)."""
    n = max(1, budget // system.horizon)
    key = jax.random.PRNGKey(seed)
    thetas = jax.random.uniform(key, (n, 3), minval=LOW, maxval=HIGH)
    keys = jax.random.split(jax.random.fold_in(key, 1), n)
    one = lambda a: system.episode(a[0], a[1])[1].mean()
    losses = jax.jit(lambda a: jax.lax.map(one, a, batch_size=50))((thetas, keys))
    return thetas[int(jnp.argmin(losses))], n * system.horizon


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="seconds-sized run (the test's)")
    p.add_argument("--horizon", type=int, default=300, help="T, optimizer steps per run")
    p.add_argument("--budget", type=int, default=120_000, help="inner steps per tuner")
    p.add_argument("--seeds", type=int, default=1, help="tuning seeds per tuner")
    args = p.parse_args(argv)
    T, budget = (20, 2000) if args.tiny else (args.horizon, args.budget)
    x, y, xv, yv, xt, yt = load_data(args.tiny)
    system = make_system(x, y, xv, yv, T)
    K, N = (5, 4) if args.tiny else (30, 16)
    estimators = {
        "PES": pes.PES(system, num_particles=N, sigma=0.1, truncation_length=K),
        "truncated ES": pes.TruncatedES(system, num_particles=N, sigma=0.1, truncation_length=K),
    }
    print(f"T={T} optimizer steps per run, budget {budget} inner steps per tuner; "
          f"N={N} particles, K={K} steps per truncation")
    theta0 = jnp.asarray(THETA0, jnp.float32)
    print(f"{'start':>14}: val loss {score(system, theta0, xt, yt)[0]:.4f}")
    rows = []
    for seed in range(args.seeds):
        for name in [*estimators, "random search"]:
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "random search":
                theta, used = random_search(system, budget, seed)
            else:
                theta, used = tune_es(system, estimators[name], budget, 0.05, seed)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            val, acc = score(system, theta, xt, yt)
            lr0, lr1, wd = np.exp(np.asarray(theta))
            rows.append((name, seed, val, acc))
            print(f"{name:>14} seed {seed}: val loss {val:.4f}  test acc {acc:.4f}  "
                  f"lr {lr0:.2e} -> {lr1:.2e}  wd {wd:.1e}  inner steps {used}  "
                  f"wall {wall:.0f} s (cpu {cpu:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
