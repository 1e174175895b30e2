"""Peak memory of one PES estimate and of one full-backprop (FullBPTT) estimate as the
episode length T grows: PES stays flat, backprop grows linearly.

Task: the MLP inner problem of mnist-lr-schedule (784-100-100-10 ReLU network, batch 100, SGD
with momentum, theta = (log lr0, log decay)) on generated data, horizon T. PES has N = 2
particles (one antithetic pair) and K = 10; FullBPTT has one particle and differentiates the
whole T-step episode. Two measurements:

- compiled: XLA's memory analysis of the jitted estimate (``lower(...).compile()
  .memory_analysis()``), arguments + outputs + temporaries, for every T (nothing is run);
- measured: the growth of the resident set size while one estimate runs, in a fresh
  subprocess per (estimator, T) (peak RSS after the call minus RSS before it, after
  compilation), for the T that fit this machine (``--run-max-t``).

    .venv/bin/python benchmarks/memory.py [--ts 100,300,1000,3000,10000] [--run-max-t 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp

MiB = 2**20


def build(kind: str, T: int, quick: bool):
    import pes
    from pes.tasks import MnistLRSchedule
    from pes.tasks.mlp import synthetic_data

    if quick:
        data = synthetic_data(num_train=100, num_valid=20, num_test=20, dim=16)
        task = MnistLRSchedule(data=data, size="tiny", horizon=T)
    else:
        task = MnistLRSchedule(data=synthetic_data(num_train=1000, num_valid=200, num_test=100),
                               horizon=T)
    if kind == "pes":
        est = pes.PES(task, num_particles=2, sigma=0.1, truncation_length=10)
    else:
        est = pes.FullBPTT(task)
    theta = jnp.asarray(task.defaults().initial_theta())
    return est, theta


def compiled_bytes(kind: str, T: int, quick: bool) -> int:
    """Arguments + outputs + temporaries of the compiled estimate (aliased bytes once)."""
    est, theta = build(kind, T, quick)
    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(est._init, key, theta)
    from pes.estimators._particles import _estimate_jit

    compiled = _estimate_jit.lower(est, state, theta, key).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_run(kind: str, T: int, quick: bool) -> int:
    """Peak RSS growth during one estimate (run in a fresh process)."""
    est, theta = build(kind, T, quick)
    key = jax.random.PRNGKey(0)
    state = est.init(key, theta)
    from pes.estimators._particles import _estimate_jit

    compiled = _estimate_jit.lower(est, state, theta, key).compile()
    jax.block_until_ready(state)
    before = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    jax.block_until_ready(compiled(state, theta, key))
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is a lifetime peak: if compilation peaked higher, only a lower bound is known.
    return max(peak_after - before, 0) if peak_after > peak_before else -1


def child(args) -> None:
    value = (compiled_bytes if args.child == "compiled" else measure_run)(
        args.kind, args.t, args.quick)
    print(json.dumps({"bytes": value}))


def run_child(what: str, kind: str, T: int, quick: bool) -> int:
    if quick:  # the smoke test stays in this process (the numbers then mean little)
        return (compiled_bytes if what == "compiled" else measure_run)(kind, T, quick)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--kind", kind,
           "--t", str(T)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def fmt(b: int | None) -> str:
    if b is None:
        return "-"
    if b < 0:
        return "(below compile peak)"
    return f"{b / MiB:,.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ts", default="100,300,1000,3000,10000")
    parser.add_argument("--run-max-t", type=int, default=1000,
                        help="largest T whose estimates are also run to measure RSS")
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--child", choices=("compiled", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("pes", "bptt"), help=argparse.SUPPRESS)
    parser.add_argument("--t", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    ts = [10] if args.quick else [int(x) for x in args.ts.split(",")]
    run_max = 10 if args.quick else args.run_max_t

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; MiB; PES N=2 K=10, "
          "FullBPTT 1 particle\n")
    print("| T | PES compiled | backprop compiled | backprop / PES | PES run (RSS growth) | "
          "backprop run (RSS growth) |")
    print("|---|---|---|---|---|---|")
    for T in ts:
        p = run_child("compiled", "pes", T, args.quick)
        b = run_child("compiled", "bptt", T, args.quick)
        pr = run_child("run", "pes", T, args.quick) if T <= run_max else None
        br = run_child("run", "bptt", T, args.quick) if T <= run_max else None
        print(f"| {T:,} | {fmt(p)} | {fmt(b)} | {b / p:.1f} | {fmt(pr)} | {fmt(br)} |",
              flush=True)


if __name__ == "__main__":
    main()
