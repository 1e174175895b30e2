"""Chunked training (``pes.train``'s steps_per_call) against one step per call.

Two problems, each with and without evaluations inside the run:

- toy regression: N = 100 particles, K = 10, Adam(1e-2), 400 outer steps (cheap steps:
  host round trips dominate one step per call);
- MLP: mnist-lr-schedule's MLP on Fashion-MNIST at a small size (784-32-10, batch 32,
  T = 200), N = 16, K = 10, Adam(3e-2), 100 outer steps (costly steps), the shape of the
  user problem that made steps_per_call=50 2.4x slower than one step per call.

Modes: ``1`` (one step per call), ``50`` (steps_per_call=50) and ``default`` (the
argument left out). Each mode's first pes.train call (which may compile) is reported on its
own; then the modes take turns, ``--repeats`` times, with the same estimator and optimizer
objects, and the table gives each mode's fastest repeat (on a shared machine a low quantile
is what a run costs when it runs) and the ratio one-step-per-call / mode (above 1: faster).
``--quick`` (a smoke test) runs toy regression only, at a tiny size. Evaluations: eval_every=20
with a trivial evaluate_fn (the evaluation's own cost is not what is measured).

    .venv/bin/python benchmarks/chunking.py [--quick] [--only toy|mlp] [--repeats 3]
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


def timed(est, theta0, opt, steps, mode, evals):
    kwargs = {} if mode == "default" else {"steps_per_call": int(mode)}
    if evals:
        kwargs.update(eval_every=20, evaluate_fn=lambda theta, key: 0.0)
    t = time.perf_counter()
    result = pes.train(est, theta0, opt, num_steps=steps, key=jax.random.PRNGKey(0), **kwargs)
    jax.block_until_ready(result.theta)
    return time.perf_counter() - t, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--only", choices=("toy", "mlp"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    modes = ("1", "50", "default")
    print("| problem | evaluations | mode | first call s | fastest repeat s | speed-up vs 1 |")
    print("|---|---|---|---|---|---|")
    for name, est, theta0, opt, steps in problems(args.quick):
        if args.only and not name.lower().startswith(args.only):
            continue
        for evals in (False, True):
            first = {m: timed(est, theta0, opt, steps, m, evals)[0] for m in modes}
            best = {m: float("inf") for m in modes}
            for rep in range(1 if args.quick else args.repeats):
                for m in modes if rep % 2 == 0 else modes[::-1]:
                    best[m] = min(best[m], timed(est, theta0, opt, steps, m, evals)[0])
            for m in modes:
                print(f"| {name} ({steps} steps) | {'every 20' if evals else 'none'} | {m} "
                      f"| {first[m]:.2f} | {best[m]:.2f} | {best['1'] / best[m]:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
