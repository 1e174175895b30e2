"""The swimmer's two backends: PES window throughput of MJX (pure JAX) against MuJoCo (C
through one host callback per step) at the same batch, and how closely their steps agree.

* throughput: ``pes.PES(Swimmer(backend=...), num_particles=B, K=100).estimate`` after a
  compile and warm-up, inner_steps / time, the median of ``--repeats`` interleaved repeats;
* agreement (``--agreement``): the largest per-step |reward| and |observation| differences over
  ``--steps`` (100) steps from the same initial state under the same actions (a trained
  policy's, which swim; a bang-bang control that drives both joints into their limits; a
  weak policy's, 0.5 N(0, 1), which holds both joints at a limit from step ~100 on), and the
  difference of their sums, in JAX's float precision: float32 by default, float64 with
  ``JAX_ENABLE_X64=1``; and, for scale, how far the MuJoCo backend itself moves under the same
  actions from a start 1e-7 away (float64);
* returns (``--returns``): whole 1000-step episodes under a policy, 5 starts: the MuJoCo
  backend's returns, the same with every start coordinate moved by 1e-7, and the MJX
  backend's, to show how far closed-loop episodes amplify a rounding-size difference.

Run:

    nice -n 5 .venv/bin/python benchmarks/swimmer_mjx.py --batch 20 --repeats 5
    JAX_ENABLE_X64=1 .venv/bin/python benchmarks/swimmer_mjx.py --agreement
    .venv/bin/python benchmarks/swimmer_mjx.py --agreement --steps 1000
    .venv/bin/python benchmarks/swimmer_mjx.py --returns
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pes
from pes.tasks.swimmer import Swimmer, from_bits

# A policy PES trained (seed 0 of docs/results/swimmer, rounded), as in the tests.
W_SWIM = np.array([[0.162, -0.473, -1.026, -0.052, 0.851, -0.565, 0.100, -0.544],
                   [0.063, 0.685, -0.782, -0.058, 0.159, -1.455, 0.516, 0.314]], np.float32)


def throughput(batch: int, repeats: int, K: int) -> dict[str, float]:
    theta = jnp.asarray(W_SWIM)
    ests = {}
    for backend in ("mujoco", "mjx"):
        est = pes.PES(Swimmer(backend=backend), num_particles=batch, sigma=0.3,
                      truncation_length=K)
        state = est.init(jax.random.PRNGKey(0), theta)
        estimate = jax.jit(est.estimate)
        grad, state, _ = estimate(state, theta, jax.random.PRNGKey(1))  # compile, warm up
        jax.block_until_ready(grad)
        ests[backend] = [estimate, state]
    rates: dict[str, list[float]] = {b: [] for b in ests}
    for r in range(repeats):
        for backend, entry in ests.items():
            t0 = time.perf_counter()
            grad, entry[1], info = entry[0](entry[1], theta, jax.random.PRNGKey(2 + r))
            jax.block_until_ready(grad)
            rates[backend].append(int(info.inner_steps) / (time.perf_counter() - t0))
    return {b: statistics.median(v) for b, v in rates.items()}


def weak_policy() -> np.ndarray:
    """0.5 N(0, 1) [2, 8], drawn in float32 whatever JAX's precision."""
    return 0.5 * np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 8), jnp.float32))


def agreement(steps: int = 100) -> dict[str, tuple[float, float, float, float]]:
    """{sequence: (max |reward difference|, max |observation difference|, |difference of the
    reward sums|, max |observation difference| of MuJoCo from a start 1e-7 away)}."""
    ref, task = Swimmer(horizon=steps), Swimmer(horizon=steps, backend="mjx")
    key = jax.random.PRNGKey(0)
    start = from_bits(np.asarray(ref.init(key).physics))[None]
    step = jax.jit(task.transition)
    bang = np.where((np.arange(steps) // 25 % 2 == 0)[:, None], [1.0, -1.0], [-1.0, 1.0])
    policies = {"trained policy": W_SWIM, "bang-bang (joint limits)": None,
                "0.5 N(0, 1) policy (held at a limit)": weak_policy()}
    out = {}
    for name, W in policies.items():
        states, s = start, task.init(key)
        moved = start.copy()
        moved[:, ref.sim.qpos.start:ref.sim.qvel.stop] += 1e-7
        dr = do = total = dm = 0.0
        for i in range(steps):
            obs = ref.observe_host(states)
            action = (ref.policy_host(W, obs) if W is not None
                      else bang[i][None].astype(np.float32))
            new, reward = ref.advance_host(states, action)
            reward = reward[0]
            s, r = step(s, jnp.asarray(action[0]))
            mjx_obs = np.concatenate([np.asarray(s.qpos)[2:], np.asarray(s.qvel)])
            dr = max(dr, abs(float(r) - reward))
            do = max(do, float(np.max(np.abs(mjx_obs - ref.observe_host(new)[0]))))
            total += float(r) - reward
            moved, _ = ref.advance_host(moved, action)
            dm = max(dm, float(np.max(np.abs(ref.observe_host(moved) - ref.observe_host(new)))))
            states = new
        out[name] = (dr, do, abs(total), dm)
    return out


def returns() -> dict[str, np.ndarray]:
    """{policy: [3, 5] returns: MuJoCo, MuJoCo from starts moved by 1e-7, MJX}."""
    ref, task = Swimmer(), Swimmer(backend="mjx")
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    # evaluate's starts: init(split(key_i)[0]), i.e. this noise.
    noise = np.asarray(jax.vmap(lambda k: jax.random.uniform(
        jax.random.split(k)[0], (10,), jnp.float32, -0.1, 0.1))(keys))
    mjx_returns = jax.jit(jax.vmap(task._mjx_return, in_axes=(None, 0)))
    out = {}
    for name, W in (("trained policy", W_SWIM), ("0.5 N(0, 1) policy", weak_policy())):
        out[name] = np.stack([
            ref._returns_host(W, noise), ref._returns_host(W, noise + np.float32(1e-7)),
            np.asarray(mjx_returns(jnp.asarray(W), keys))])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--agreement", action="store_true",
                        help="report the backends' step differences instead of throughput")
    parser.add_argument("--steps", type=int, default=100, help="--agreement: steps compared")
    parser.add_argument("--returns", action="store_true",
                        help="report whole-episode returns of both backends instead")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: B = 2, windows of 5 steps, 1 repeat (numbers mean "
                        "nothing)")
    args = parser.parse_args(argv)
    if args.agreement:
        precision = "float64" if jax.config.jax_enable_x64 else "float32"
        print(f"| actions ({args.steps} steps, {precision}) | max reward difference | "
              "max observation difference | difference of the return | MuJoCo from a start "
              "1e-7 away: max observation difference |\n|---|---|---|---|---|")
        for name, (dr, do, dt, dm) in agreement(args.steps).items():
            print(f"| {name} | {dr:.1e} | {do:.1e} | {dt:.1e} | {dm:.1e} |")
        return
    if args.returns:
        print("| policy | MuJoCo returns | MuJoCo, starts + 1e-7 | MJX returns |\n"
              "|---|---|---|---|")
        for name, (a, b, c) in returns().items():
            print(f"| {name} | {' '.join(f'{x:.2f}' for x in a)} | "
                  f"{' '.join(f'{x:.2f}' for x in b)} | {' '.join(f'{x:.2f}' for x in c)} |")
        return
    K = 100
    if args.quick:
        args.batch, args.repeats, K = [2], 1, 5
    print(f"device: {jax.devices()[0].device_kind}")
    print("| batch B | MuJoCo backend (steps/s) | MJX backend (steps/s) | MJX / MuJoCo |\n"
          "|---|---|---|---|")
    for batch in args.batch:
        rate = throughput(batch, args.repeats, K)
        print(f"| {batch} | {rate['mujoco']:,.0f} | {rate['mjx']:,.0f} | "
              f"{rate['mjx'] / rate['mujoco']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
