"""Overhead of PES.estimate against a raw vmapped unroll of the same perturbed particles.

The raw baseline is the least any PES implementation must do: N particles (N/2 antithetic
pairs) stepped K steps at theta +/- eps inside one jitted lax.scan, each particle with its own
per-step key, losses summed; eps is given, not drawn. PES adds drawing eps, per-pair keys,
episode resets, the accumulator xi, the credit and the gradient reduction, and its call
returns the whole particle state and an EstimateInfo.

Both are timed in this process after compilation, interleaved: every repeat times a batch of
raw calls and a batch of PES calls back to back, and the table reports the medians over the
repeats of each rate and of the per-repeat ratio PES time / raw time.

    .venv/bin/python benchmarks/overhead.py [--repeats 15] [--quick]

Tasks: influence balancing (theta scalar, 23-dim linear state, no resets), toy regression
(theta 2-d, 2-d state, T = 100) and the MLP task (mnist-lr-schedule's 784-100-100-10 network,
batch 100, SGD with momentum, on generated data so that no download is needed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import pes
from pes.tasks import InfluenceBalancing, MnistLRSchedule, ToyRegression
from pes.tasks.mlp import synthetic_data


def raw_unroll(system, num_particles, K):
    """jit(vmap over particles of a K-step scan at theta + sign * eps), no resets, no credit.

    Particle i steps with t = j and key fold_in(key_i, j) at step j."""
    signs = jnp.tile(jnp.array([1.0, -1.0]), num_particles // 2)

    @jax.jit
    def run(states, theta, eps, key):
        def one(s, sign, e, k):
            th = theta + sign * e

            def body(s, j):
                return system.step(s, th, j, jax.random.fold_in(k, j))

            s, losses = jax.lax.scan(body, s, jnp.arange(K, dtype=jnp.int32))
            return s, losses.sum()

        keys = jax.random.split(key, num_particles)
        s, totals = jax.vmap(one)(states, signs, jnp.repeat(eps, 2, axis=0), keys)
        return s, jnp.sum(totals)

    return run


def time_calls(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def measure(name, system, theta, num_particles, K, repeats, target_s=0.02):
    est = pes.PES(system, num_particles=num_particles, sigma=0.1, truncation_length=K)
    state = est.init(jax.random.PRNGKey(0), theta)
    key = jax.random.PRNGKey(1)
    raw = raw_unroll(system, num_particles, K)
    states = jax.vmap(system.init)(jax.random.split(key, num_particles))
    eps = 0.1 * jax.random.normal(key, (num_particles // 2,) + jnp.shape(theta))
    # Outputs are blocked on as a whole: PES returns its state and info too.
    pes_call = lambda: est.estimate(state, theta, key)
    raw_call = lambda: raw(states, theta, eps, key)
    jax.block_until_ready(pes_call())
    jax.block_until_ready(raw_call())
    per_call = max(time_calls(raw_call, 1), 1e-6)
    calls = max(1, int(target_s / per_call))
    t_raw, t_pes = [], []
    for r in range(repeats):
        pair = [(raw_call, t_raw), (pes_call, t_pes)]
        for fn, out in (pair if r % 2 == 0 else pair[::-1]):
            out.append(time_calls(fn, calls))
    t_raw, t_pes = np.array(t_raw), np.array(t_pes)
    steps = num_particles * K
    ratio = float(np.median(t_pes / t_raw))
    print(f"| {name} | {num_particles} | {K} | {steps / np.median(t_raw):,.0f} | "
          f"{steps / np.median(t_pes):,.0f} | {ratio:.2f} |", flush=True)
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{len(jax.devices())} device(s); medians of {repeats} interleaved repeats\n")
    print("| task | N | K | raw particle-steps/s | PES particle-steps/s | PES / raw time |")
    print("|---|---|---|---|---|---|")
    ib, tr = InfluenceBalancing(), ToyRegression()
    if args.quick:
        data = synthetic_data(num_train=200, num_valid=50, num_test=50, dim=16)
        mlp = MnistLRSchedule(data=data, size="tiny")
        cases = [("influence balancing", ib, 20, 1), ("toy regression", tr, 20, 5),
                 ("MLP", mlp, 4, 2)]
    else:
        mlp = MnistLRSchedule(data=synthetic_data(num_train=2000, num_valid=500, num_test=100))
        cases = [("influence balancing", ib, 1000, 1), ("influence balancing", ib, 1000, 100),
                 ("toy regression", tr, 100, 10), ("toy regression", tr, 1000, 10),
                 ("MLP 784-100-100-10", mlp, 20, 10)]
    for name, system, n, k in cases:
        theta = system.defaults().initial_theta()
        measure(name, system, theta, n, k, repeats, target_s=0.002 if args.quick else 0.02)


if __name__ == "__main__":
    main()
