"""Chunked training (``pes.train``'s steps_per_call) against one step per call.

Two problems, each with and without evaluations inside the run:

- toy regression: N = 100 particles, K = 10, Adam(1e-2), 400 outer steps (cheap steps:
  host round trips dominate one step per call);
- MLP: mnist-lr-schedule's MLP on Fashion-MNIST at a small size (784-32-10, batch 32,
  T = 200), N = 16, K = 10, Adam(3e-2), 100 outer steps (costly steps), the shape of the
  user problem that made steps_per_call=50 2.4x slower than one step per call.

Modes: ``1`` (one step per call), ``50`` (steps_per_call=50) and ``default`` (the argument
left out). Each mode runs pes.train twice with the same estimator and optimizer objects; the
first run (which compiles) and the second are both reported, and the ratio is of the second
runs' times (one step per call / mode: above 1 means faster). Evaluations: eval_every=20
with a trivial evaluate_fn (the evaluation's own cost is not what is measured).

    .venv/bin/python benchmarks/chunking.py [--quick] [--only toy|mlp]
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
    try:
        from pes.tasks import MnistLRSchedule

        task = MnistLRSchedule(size="cpu", hidden_sizes=(8,) if quick else (32,),
                               batch_size=32, horizon=200)
    except Exception as e:  # no dataset on this machine
        print(f"MLP skipped: {e}")
        return
    mlp = pes.PES(task, num_particles=16, sigma=0.1, truncation_length=10)
    theta0 = jnp.asarray(task.defaults().theta0, jnp.float32)
    yield "MLP", mlp, theta0, optax.adam(3e-2), 10 if quick else 100


def timed(est, theta0, opt, steps, mode, evals):
    kwargs = {} if mode == "default" else {"steps_per_call": int(mode)}
    if evals:
        kwargs.update(eval_every=20, evaluate_fn=lambda theta, key: 0.0)
    t = time.perf_counter()
    result = pes.train(est, theta0, opt, num_steps=steps, key=jax.random.PRNGKey(0), **kwargs)
    jax.block_until_ready(result.theta)
    return time.perf_counter() - t, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--only", choices=("toy", "mlp"))
    args = parser.parse_args()
    print("| problem | evaluations | mode | first run s | second run s | speed-up vs 1 |")
    print("|---|---|---|---|---|---|")
    for name, est, theta0, opt, steps in problems(args.quick):
        if args.only and not name.lower().startswith(args.only):
            continue
        for evals in (False, True):
            base = None
            for mode in ("1", "50", "default"):
                first, _ = timed(est, theta0, opt, steps, mode, evals)
                second, _ = timed(est, theta0, opt, steps, mode, evals)
                base = base or second
                print(f"| {name} ({steps} steps) | {'every 20' if evals else 'none'} | {mode} "
                      f"| {first:.2f} | {second:.2f} | {base / second:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
