"""Overhead of PES.estimate against a raw vmapped unroll of the same perturbed particles.

The raw baseline is the least any PES implementation must do: N particles (N/2 antithetic
pairs) stepped K steps at theta +/- eps inside one jitted lax.scan, losses summed. PES adds
per-step keys, resets, the accumulator and the gradient reduction. Both are timed in this
process, interleaved, after compilation; the ratio is what is reported.

    .venv/bin/python benchmarks/overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import pes
from pes.tasks import InfluenceBalancing, ToyRegression


def raw_unroll(system, num_particles, K):
    """jit(vmap over particles of a K-step scan at theta + sign * eps), no resets, no credit."""
    signs = jnp.tile(jnp.array([1.0, -1.0]), num_particles // 2)

    @jax.jit
    def run(states, theta, eps, key):
        def one(s, sign, e, k):
            th = theta + sign * e

            def body(s, j):
                s, loss = system.step(s, th, j, jax.random.fold_in(k, j))
                return s, loss

            s, losses = jax.lax.scan(body, s, jnp.arange(K))
            return s, losses.sum()

        keys = jax.random.split(key, num_particles)
        s, totals = jax.vmap(one)(states, signs, jnp.repeat(eps, 2, axis=0), keys)
        return s, jnp.sum(totals)

    return run


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(name, system, theta, num_particles, K, repeats):
    est = pes.PES(system, num_particles=num_particles, sigma=0.1, truncation_length=K)
    state = est.init(jax.random.PRNGKey(0), theta)
    key = jax.random.PRNGKey(1)
    raw = raw_unroll(system, num_particles, K)
    states = jax.vmap(system.init)(jax.random.split(key, num_particles))
    eps = 0.1 * jax.random.normal(key, (num_particles // 2,) + jnp.shape(theta))
    pes_call = lambda: est.estimate(state, theta, key)[0]
    raw_call = lambda: raw(states, theta, eps, key)[1]
    jax.block_until_ready(pes_call())
    jax.block_until_ready(raw_call())
    t_pes, t_raw = best_of(pes_call, repeats), best_of(raw_call, repeats)
    steps = num_particles * K
    print(f"| {name} | {num_particles} | {K} | {steps / t_raw:,.0f} | {steps / t_pes:,.0f} | "
          f"{t_pes / t_raw:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{len(jax.devices())} device(s)\n")
    print("| task | N | K | raw particle-steps/s | PES particle-steps/s | PES / raw time |")
    print("|---|---|---|---|---|---|")
    ib = InfluenceBalancing()
    measure("influence balancing", ib, ib.defaults().initial_theta(), 1000, 1, args.repeats)
    measure("influence balancing", ib, ib.defaults().initial_theta(), 1000, 100, args.repeats)
    tr = ToyRegression()
    measure("toy regression", tr, tr.defaults().initial_theta(), 100, 10, args.repeats)
    measure("toy regression", tr, tr.defaults().initial_theta(), 1000, 10, args.repeats)


if __name__ == "__main__":
    main()
