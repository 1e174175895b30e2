"""Chunked training (``pes.train``'s steps_per_call) against one step per call.

Two problems, each with and without evaluations inside the run:

- toy regression: N = 100 particles, K = 10, Adam(1e-2), 400 outer steps (cheap steps:
  host round trips dominate one step per call);
- MLP: mnist-lr-schedule's MLP on Fashion-MNIST at a small size (784-32-10, batch 32,
  T = 200), N = 16, K = 10, Adam(3e-2), 100 outer steps (costly steps), the shape of the
  user problem that made steps_per_call=50 2.4x slower than one step per call;
- TrainingLoop MLP: the same network and sizes written as a user would, a pes.TrainingLoop
  (SGD with a log-linear learning-rate schedule from theta's two numbers).

Modes: ``1`` (one step per call), ``50`` (steps_per_call=50) and ``default`` (the
argument left out). Each mode's first pes.train call (which may compile) is reported on its
own; then the modes take turns, ``--repeats`` times, with the same estimator and optimizer
objects, and the table gives each mode's fastest repeat (on a shared machine a low quantile
is what a run costs when it runs) and the ratio one-step-per-call / mode (above 1: faster),
and the least CPU time (this process, all threads) of each mode, which other sessions' load
moves less than wall time.
``--quick`` (a smoke test) runs toy regression only, at a tiny size. Evaluations: eval_every=20
with a trivial evaluate_fn (the evaluation's own cost is not what is measured).

    .venv/bin/python benchmarks/chunking.py [--quick] [--only toy|mlp|trainingloop] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import pes


def problems(quick: bool):
    from pes.tasks import ToyRegression

    toy = pes.PES(ToyRegression(), num_particles=100, sigma=0.3, truncation_length=10)
    yield "toy regression", toy, jnp.array([-4.0, -4.0]), optax.adam(1e-2), 40 if quick else 400
    if quick:
        return
    try:
        from pes.tasks import MnistLRSchedule

        task = MnistLRSchedule(size="cpu", hidden_sizes=(32,), batch_size=32, horizon=200)
    except Exception as e:  # no dataset on this machine
        print(f"MLP skipped: {e}")
        return
    mlp = pes.PES(task, num_particles=16, sigma=0.1, truncation_length=10)
    theta0 = jnp.asarray(task.defaults().theta0, jnp.float32)
    yield "MLP", mlp, theta0, optax.adam(3e-2), 100
    loop = user_loop()
    yield ("TrainingLoop MLP", pes.PES(loop, num_particles=16, sigma=0.1, truncation_length=10),
           jnp.array([-2.0, -2.0]), optax.adam(3e-2), 100)


def user_loop():
    """A user's own loop (pes.TrainingLoop): a 784-32-10 MLP on Fashion-MNIST's training split,
    batch 32, SGD whose log learning rate goes linearly from theta[0] to theta[1] over T=200."""
    from pes import data

    images, labels = data.load("fashion-mnist").split("train")

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (784, 32)) * 784 ** -0.5, "b1": jnp.zeros(32),
                "w2": jax.random.normal(k2, (32, 10)) * 32 ** -0.5, "b2": jnp.zeros(10)}

    def loss(p, batch, key):
        x, y = batch
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return pes.TrainingLoop(
        init=init, loss=loss, batches=pes.batches_from_arrays(images, labels, batch_size=32),
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
        hyperparameters=lambda th, t: {"learning_rate": pes.log_linear(th[0], th[1], t, 200)},
        horizon=200, loss_cap=2 * float(jnp.log(10.0)))


def timed(est, theta0, opt, steps, mode, evals):
    kwargs = {} if mode == "default" else {"steps_per_call": int(mode)}
    if evals:
        kwargs.update(eval_every=20, evaluate_fn=lambda theta, key: 0.0)
    t, cpu = time.perf_counter(), time.process_time()
    result = pes.train(est, theta0, opt, num_steps=steps, key=jax.random.PRNGKey(0), **kwargs)
    jax.block_until_ready(result.theta)
    return time.perf_counter() - t, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--only", choices=("toy", "mlp", "trainingloop"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    modes = ("1", "50", "default")
    print("| problem | evaluations | mode | first call s | fastest repeat s | speed-up vs 1 "
          "| least CPU s | CPU ratio vs 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, est, theta0, opt, steps in problems(args.quick):
        if args.only and not name.lower().replace(" ", "").startswith(args.only):
            continue
        for evals in (False, True):
            first = {m: timed(est, theta0, opt, steps, m, evals)[0] for m in modes}
            best = {m: float("inf") for m in modes}
            cpu = dict(best)
            for rep in range(1 if args.quick else args.repeats):
                for m in modes if rep % 2 == 0 else modes[::-1]:
                    wall, used = timed(est, theta0, opt, steps, m, evals)
                    best[m], cpu[m] = min(best[m], wall), min(cpu[m], used)
            for m in modes:
                print(f"| {name} ({steps} steps) | {'every 20' if evals else 'none'} | {m} "
                      f"| {first[m]:.2f} | {best[m]:.2f} | {best['1'] / best[m]:.2f}x "
                      f"| {cpu[m]:.2f} | {cpu['1'] / cpu[m]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
