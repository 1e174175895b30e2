"""Overhead of PES.estimate against a raw vmapped unroll of the same perturbed particles.

The raw baseline is the least any PES implementation must do: N particles (N/2 antithetic
pairs) stepped K steps at theta +/- eps inside one jitted lax.scan, the two members of a pair
sharing their per-step keys (and so their minibatches) as in PES, losses summed; eps is given,
not drawn. PES adds drawing eps, per-pair keys,
episode resets, the accumulator xi, the credit and the gradient reduction, and its call
returns the whole particle state and an EstimateInfo.

Both are timed in this process after compilation, interleaved: every repeat times a batch of
raw calls and a batch of PES calls back to back (each call waited for). The table reports the
10th percentile of each one's per-call times over all repeats (on a shared machine the other
calls include time spent descheduled), as particle-steps per second, and their ratio.

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
    """jit(vmap over pairs of vmap over members of a K-step scan at theta +/- eps): no resets,
    no credit. As in PES, both members of a pair use the same data: key fold_in(key_p, j) at
    step j (so a minibatch is drawn once per pair), with t = j."""
    signs = jnp.array([1.0, -1.0])

    @jax.jit
    def run(states, theta, eps, key):  # states: leaves [P, 2, ...]
        def pair(s2, e, k):
            def member(s, sign):
                th = theta + sign * e

                def body(s, j):
                    return system.step(s, th, j, jax.random.fold_in(k, j))

                s, losses = jax.lax.scan(body, s, jnp.arange(K, dtype=jnp.int32))
                return s, losses.sum()

            return jax.vmap(member)(s2, signs)

        keys = jax.random.split(key, num_particles // 2)
        s, totals = jax.vmap(pair)(states, eps, keys)
        return s, jnp.sum(totals)

    return run


def call_times(fn, calls):
    """Seconds of each of ``calls`` calls, each waited for (a training loop's next step needs
    the previous one's result, so latency, not pipelined throughput, is what counts)."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def measure(name, system, theta, num_particles, K, repeats, target_s=0.02, quantile=10):
    est = pes.PES(system, num_particles=num_particles, sigma=0.1, truncation_length=K)
    state = est.init(jax.random.PRNGKey(0), theta)
    key = jax.random.PRNGKey(1)
    raw = raw_unroll(system, num_particles, K)
    fresh = jax.vmap(system.init)(jax.random.split(key, num_particles // 2))
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x], axis=1), fresh)
    eps = 0.1 * jax.random.normal(key, (num_particles // 2,) + jnp.shape(theta))
    # Outputs are blocked on as a whole: PES returns its state and info too.
    pes_call = lambda: est.estimate(state, theta, key)
    raw_call = lambda: raw(states, theta, eps, key)
    jax.block_until_ready(pes_call())
    jax.block_until_ready(raw_call())
    calls = max(1, int(target_s / max(np.median(call_times(raw_call, 5)), 1e-6)))
    t_raw, t_pes = [], []
    for r in range(repeats):
        pair = [(raw_call, t_raw), (pes_call, t_pes)]
        for fn, out in (pair if r % 2 == 0 else pair[::-1]):
            out.extend(call_times(fn, calls))
    # On a shared machine some calls are descheduled and take many times longer; a low
    # quantile of the per-call times is what a call costs when it runs.
    t_raw, t_pes = np.percentile(t_raw, quantile), np.percentile(t_pes, quantile)
    steps = num_particles * K
    ratio = t_pes / t_raw
    print(f"| {name} | {num_particles} | {K} | {steps / t_raw:,.0f} | {steps / t_pes:,.0f} | "
          f"{ratio:.2f} |", flush=True)
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{len(jax.devices())} device(s); 10th percentiles of per-call times over "
          f"{repeats} interleaved repeats\n")
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
