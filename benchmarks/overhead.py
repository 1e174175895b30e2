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

    .venv/bin/python benchmarks/overhead.py [--repeats 15] [--quick] [--parts]

``--parts`` also splits the cost of one estimate on the tiny tasks (influence balancing K = 1,
toy regression N = 100) into pieces, each timed the same way (see ``parts``; ``--quick`` runs
them at a tiny size).

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


def parts(name, system, num_particles, K, repeats, calls=150, chunk=50):
    """Per-call times (10th percentiles, interleaved, microseconds) of the pieces of one
    PES.estimate:

    raw: the raw unroll above; estimate: PES.estimate as called; raw in a scan, PES in a
    scan: each traced into a jitted lax.scan over ``chunk`` calls, the state carried (per call:
    the work inside the program, without a dispatch and without arrays handed in and out per
    call); grad only: the jitted estimate returning only the gradient (its state and info
    outputs, and what only they need, left out); draw: the window's perturbations alone (split
    the key, then batched_normal: three dependent threefry hashes, each a rolled 5-iteration
    loop on XLA:CPU); 12 outputs: a jitted function of the estimate's 12 arrays that returns 12
    arrays of the same shapes (one trivial kernel each): the cost of a call's inputs and
    outputs alone; unrolled: PES.estimate compiled with JAX's unrolled threefry lowering (the
    one other platforms use; the same bits) instead of the rolled CPU one, registered for this
    process only after everything else is compiled (JAX internals: "-" if they moved).
    """
    from pes.estimators._particles import batched_normal

    theta = system.defaults().initial_theta()
    est = pes.PES(system, num_particles=num_particles, sigma=0.1, truncation_length=K)
    state = est.init(jax.random.PRNGKey(0), theta)
    key = jax.random.PRNGKey(1)
    pairs = num_particles // 2
    raw = raw_unroll(system, num_particles, K)
    fresh = jax.vmap(system.init)(jax.random.split(key, pairs))
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x], axis=1), fresh)
    eps = 0.1 * jax.random.normal(key, (pairs,) + jnp.shape(theta))

    @jax.jit
    def scanned(state, theta, keys):
        def one(state, k):
            grad, state, info = est.estimate(state, theta, k)
            return state, (grad, info.loss)

        return jax.lax.scan(one, state, keys)

    @jax.jit
    def raw_scanned(states, keys):
        return jax.lax.scan(lambda s, k: raw(s, theta, eps, k), states, keys)

    keys = jax.random.split(key, chunk)
    grad_only = jax.jit(lambda s, th, k: est.estimate(s, th, k)[0])
    draw = jax.jit(lambda k: batched_normal(jax.random.split(k)[0], pairs, theta, est.sigma))
    outputs = est.estimate(state, theta, key)
    bump = jax.jit(lambda tree: jax.tree_util.tree_map(
        lambda x: ~x if x.dtype == jnp.bool_ else x + 1, tree))
    fns = {
        "raw": lambda: raw(states, theta, eps, key),
        "estimate": lambda: est.estimate(state, theta, key),
        "raw in a scan": lambda: raw_scanned(states, keys),
        "PES in a scan": lambda: scanned(state, theta, keys),
        "grad only": lambda: grad_only(state, theta, key),
        "draw": lambda: draw(key),
        "12 outputs": lambda: bump(outputs),
    }
    for fn in fns.values():
        jax.block_until_ready(fn())
    unrolled = _unrolled_estimator(system, num_particles, K, theta)
    if unrolled is not None:
        est_u, state_u = unrolled
        fns["unrolled"] = lambda: est_u.estimate(state_u, theta, key)
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b)), est_u.estimate(state_u, theta, key),
            est.estimate(state, theta, key)))
        assert same, "the unrolled threefry lowering changed the estimate"
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].extend(call_times(fns[k], calls))
    us = {k: np.percentile(v, 10) * 1e6 for k, v in times.items()}
    us["raw in a scan"] /= chunk
    us["PES in a scan"] /= chunk
    cells = [f"{us[k]:.1f}" if k in us else "-" for k in PART_NAMES]
    print(f"| {name} | {num_particles} | {K} | " + " | ".join(cells) + " |", flush=True)


PART_NAMES = ("raw", "estimate", "raw in a scan", "PES in a scan", "grad only", "draw",
              "12 outputs", "unrolled")


def _unrolled_estimator(system, num_particles, K, theta):
    """A PES compiled (init and estimate) with JAX's unrolled threefry lowering on CPU, or
    None when JAX's internals differ; the CPU rule is put back afterwards."""
    try:
        from functools import partial

        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as tf

        rules = mlir._platform_specific_lowerings["cpu"]
        rolled = rules[tf.threefry2x32_p]
        unrolled = mlir.lower_fun(partial(tf._threefry2x32_lowering, use_rolled_loops=False),
                                  multiple_results=True)
    except (ImportError, AttributeError, TypeError, KeyError):
        return None
    mlir.register_lowering(tf.threefry2x32_p, unrolled, platform="cpu")
    try:
        est = pes.PES(system, num_particles=num_particles, sigma=0.1, truncation_length=K)
        state = est.init(jax.random.PRNGKey(0), theta)
        jax.block_until_ready(est.estimate(state, theta, jax.random.PRNGKey(1)))
    finally:
        rules[tf.threefry2x32_p] = rolled
    return est, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (a smoke test, not a measurement)")
    parser.add_argument("--parts", action="store_true",
                        help="also time the pieces of an estimate on the tiny tasks")
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
    if args.parts or args.quick:  # --quick smoke-tests the pieces too
        print("\nPieces of one estimate, microseconds per call (see parts()):\n")
        print("| task | N | K | " + " | ".join(PART_NAMES) + " |")
        print("|---|---|---|" + "---|" * len(PART_NAMES))
        small = [("influence balancing", ib, 20, 1)] if args.quick else [
            ("influence balancing", ib, 1000, 1), ("toy regression", tr, 100, 10)]
        for name, system, n, k in small:
            parts(name, system, n, k, repeats, calls=5 if args.quick else 150,
                  chunk=2 if args.quick else 50)


if __name__ == "__main__":
    main()
