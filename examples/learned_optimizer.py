"""Train a fresh MLP with a meta-trained learned optimizer, next to Adam and SGD.

The optimizer file comes from ``pes run learned-optimizer --estimator pes`` (its run directory
holds ``learned_optimizer.npz``); by default this script uses the one meta-trained by PES that
ships inside the package (``pes.learned_optimizer.pretrained_path()``; its results are in
docs/results/learned-optimizer). The learned optimizer is an ordinary optax transformation, so
the training loop below is the usual optax loop; only ``update`` needs the params.

    python examples/learned_optimizer.py [OPTIMIZER.npz] [--steps 200] [--out plot.png]

It trains the same freshly initialised 64-32-32-32-10 MLP on Fashion-MNIST downsampled to 8x8
(the task family the optimizer was meta-trained on) with each optimizer, on the same
minibatches, and plots the training loss (smoothed, log scale) and the final test accuracy.
The default 200 steps is the horizon the shipped optimizer was meta-trained for (T of
`--size cpu`); a learned optimizer is only trained for what it saw (--steps 1000 shows how
this one does beyond it: level with Adam). Adam's and
SGD's learning rates are the ones `pes compare learned-optimizer` tuned (its results.json),
or 1e-2 and 0.3 without one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes.learned_optimizer
from pes import data

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "learned-optimizer"


def mlp_init(key, sizes):
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True):
        params.append({"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a),
                       "b": jnp.zeros(b)})
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logp = jax.nn.log_softmax(mlp_apply(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def train(tx, params, x_train, y_train, batches):
    """Plain optax training; returns (final params, training loss per step)."""

    @jax.jit
    def step(carry, idx):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), batches)
    return params, np.asarray(losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimizer", nargs="?",
                        default=str(pes.learned_optimizer.pretrained_path()))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS / "fresh_mlp.png"))
    args = parser.parse_args()

    ds = data.load("fashion-mnist", args.data_dir)
    x_train = jnp.asarray(data.downsample(ds.train_images, 8))
    x_test = jnp.asarray(data.downsample(ds.test_images, 8))
    y_train, y_test = jnp.asarray(ds.train_labels), jnp.asarray(ds.test_labels)

    rates = {"sgd": 0.3, "adam": 1e-2}
    tuned = RESULTS / "results.json"
    if tuned.is_file():
        baselines = json.loads(tuned.read_text())["baselines"]
        rates = {name: baselines[name]["learning_rate"] for name in rates}
    optimizers = {
        "learned (meta-trained by PES)": pes.learned_optimizer.load(args.optimizer),
        f"Adam, lr {rates['adam']:.3g}": optax.adam(rates["adam"]),
        f"SGD, lr {rates['sgd']:.3g}": optax.sgd(rates["sgd"]),
    }
    key_init, key_data = jax.random.split(jax.random.PRNGKey(args.seed))
    params0 = mlp_init(key_init, (64, 32, 32, 32, 10))
    batches = jax.random.randint(key_data, (args.steps, args.batch_size), 0, len(y_train))
    curves = {}
    for name, tx in optimizers.items():
        params, losses = train(tx, params0, x_train, y_train, batches)
        acc = float(jnp.mean(jnp.argmax(mlp_apply(params, x_test), 1) == y_test))
        curves[name] = (losses, acc)
        print(f"{name}: mean training loss {losses.mean():.4f}, last 100 steps "
              f"{losses[-100:].mean():.4f}, test accuracy {acc:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    window = 20
    for (name, (losses, acc)), color in zip(curves.items(), ("tab:red", "tab:blue", "k"),
                                            strict=True):
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(losses)), smooth, color=color,
                label=f"{name} (test accuracy {acc:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss ({window}-step moving average)")
    ax.set_title("A fresh 64-32-32-32-10 MLP on Fashion-MNIST 8x8, same init and batches",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
