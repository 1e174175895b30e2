"""Inner MLP steps per second: a vmapped PES window against the same step alone, and against
the machine's matrix-multiply rate.

The task is mnist-lr-schedule at the CPU size (784-100-100-10, batch 100, SGD with momentum) on
Fashion-MNIST. Every number is measured in this process after compilation (median of repeats):

- step alone: one jitted inner step of one network, called in a Python loop;
- PES window: ``PES.estimate`` with N particles and K steps, in inner steps per second;
- matmul: the GFLOP/s of a float32 matmul of the step's own largest shape (batch x 784 by
  784 x hidden) and the MLP step's FLOPs (forward + backward ~ 3 x 2 x batch x params).

    .venv/bin/python benchmarks/mlp_throughput.py [--num-particles 20] [--truncation-length 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import pes
from pes.tasks import MnistLRSchedule


def median_time(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-particles", type=int, default=20)
    parser.add_argument("--truncation-length", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    task = MnistLRSchedule(size="cpu")
    theta = task.defaults().initial_theta()
    key = jax.random.PRNGKey(0)
    state = task.init(key)
    step = jax.jit(task.step)
    t = jnp.zeros((), jnp.int32)
    n_loop = 50

    def alone():
        s = state
        for i in range(n_loop):
            s, loss = step(s, theta, t + i, jax.random.fold_in(key, i))
        return loss

    t_alone = median_time(alone, args.repeats) / n_loop

    est = pes.PES(task, num_particles=args.num_particles, sigma=0.1,
                  truncation_length=args.truncation_length)
    est_state = est.init(key, theta)
    t_window = median_time(lambda: est.estimate(est_state, theta, key)[0], args.repeats)
    pes_rate = args.num_particles * args.truncation_length / t_window

    batch, hidden = task.size.batch_size, task.size.hidden_sizes[0]
    a = jax.random.normal(key, (batch, 784))
    b = jax.random.normal(key, (784, hidden))
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = median_time(lambda: mm(a, b), args.repeats * 20)
    gflops_mm = 2 * batch * 784 * hidden / t_mm / 1e9
    sizes = (784,) + tuple(task.size.hidden_sizes) + (10,)
    params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    step_flops = 6 * batch * params

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; MLP {sizes}, batch {batch}, "
          f"{params:,} parameters, ~{step_flops / 1e6:.0f} MFLOP per step\n")
    print("| what | inner steps/s | GFLOP/s | ratio |")
    print("|---|---|---|---|")
    print(f"| step alone | {1 / t_alone:,.0f} | {step_flops / t_alone / 1e9:.1f} | 1.00 |")
    print(f"| PES window N={args.num_particles} K={args.truncation_length} | {pes_rate:,.0f} | "
          f"{step_flops * pes_rate / 1e9:.1f} | {pes_rate * t_alone:.2f} x step alone |")
    print(f"| matmul {batch}x784 @ 784x{hidden} | - | {gflops_mm:.1f} | step alone at "
          f"{step_flops / t_alone / 1e9 / gflops_mm:.0%} of it |")


if __name__ == "__main__":
    main()
