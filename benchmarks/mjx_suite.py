"""The MuJoCo suite on mujoco.mjx (pure JAX) against the C fast path: PES window throughput on
this machine's CPU, and how closely their steps agree.

* throughput (default): ``pes.PES(pes.envs.Gymnasium(env, backend=...), num_particles=2P,
  K).estimate`` jitted, after a compile and warm-up, environment steps (``inner_steps``) per
  second, the median of ``--repeats`` interleaved repeats; also the MJX compile time;
* agreement (``--agreement``): from the same init key under the same random actions (up to
  1.2x the control range), per step t the largest |observation| and |loss| difference between
  the paths over 2 episodes, printed at chosen steps, and the first step at which a
  termination differs.

Run:

    nice -n 10 .venv/bin/python benchmarks/mjx_suite.py --envs Hopper-v5 HalfCheetah-v5
    nice -n 10 .venv/bin/python benchmarks/mjx_suite.py --agreement
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

import pes
from pes.envs.mjx_suite import MJX
from pes.envs.mujoco_suite import MuJoCo


def throughput(env_id: str, pairs: int, K: int, repeats: int) -> dict[str, float]:
    """{backend: env steps per second, 'mjx compile s': seconds}."""
    ests, out = {}, {}
    for backend in ("mujoco", "mjx"):
        system = pes.envs.Gymnasium(env_id, backend=backend)
        theta = system.theta0()
        est = pes.PES(system, num_particles=2 * pairs, sigma=0.05, truncation_length=K)
        state = est.init(jax.random.PRNGKey(0), theta)
        t0 = time.perf_counter()
        estimate = jax.jit(est.estimate)
        grad, state, _ = estimate(state, theta, jax.random.PRNGKey(1))  # compile, warm up
        jax.block_until_ready(grad)
        out[f"{backend} compile+first s"] = time.perf_counter() - t0
        ests[backend] = [estimate, state, theta]
    rates: dict[str, list[float]] = {b: [] for b in ests}
    for r in range(repeats):
        for backend, entry in ests.items():
            t0 = time.perf_counter()
            grad, entry[1], info = entry[0](entry[1], entry[2], jax.random.PRNGKey(2 + r))
            jax.block_until_ready(grad)
            rates[backend].append(int(info.inner_steps) / (time.perf_counter() - t0))
    return {**out, **{b: statistics.median(v) for b, v in rates.items()}}


def identity(theta, obs):
    return theta


def agreement(env_id: str, steps: int, episodes: int = 2):
    """(obs difference [T], loss difference [T], first step with a different termination
    or None), the differences maxed over episodes while both paths run."""
    keys = jax.random.split(jax.random.PRNGKey(0), episodes)
    out = []
    for system in (MuJoCo(env_id, policy=identity), MJX(env_id, policy=identity)):
        rng = np.random.default_rng(1)
        actions = (rng.uniform(-1.2, 1.2, (steps, episodes, system.action_dim))
                   * system.action_high).astype(np.float32)

        def body(state, action, system=system):
            state, loss, done = jax.vmap(system.transition)(state, action)
            return state, (state.obs, loss, done)

        run = jax.jit(lambda k, a, body=body, system=system: jax.lax.scan(
            body, jax.vmap(system.init)(k), a)[1])
        out.append([np.asarray(x) for x in run(keys, actions)])
    (oc, lc, dc), (om, lm, dm) = out
    live = (np.cumsum(dc, 0) - dc == 0) & (np.cumsum(dm, 0) - dm == 0)
    do = np.where(live[..., None], np.abs(om - oc), 0).max(axis=(1, 2))
    dl = np.where(live, np.abs(lm - lc), 0).max(axis=1)
    differ = np.flatnonzero((dc != dm).any(axis=1))
    return do, dl, (int(differ[0]) if differ.size else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--K", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement", action="store_true")
    parser.add_argument("--steps", type=int, default=100, help="--agreement: steps compared")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}; devices: {jax.devices()}")
    if args.agreement:
        envs = args.envs if argv and "--envs" in argv else [
            "Swimmer-v5", "InvertedPendulum-v5", "InvertedDoublePendulum-v5", "Hopper-v5",
            "Walker2d-v5", "HalfCheetah-v5", "Ant-v5"]
        marks = [m for m in (0, 4, 9, 19, 39, 99) if m < args.steps]
        print("| environment | " + " | ".join(f"step {m + 1}" for m in marks)
              + " | first differing termination |\n|---|" + "---|" * (len(marks) + 1))
        for env_id in envs:
            do, dl, first = agreement(env_id, args.steps)
            cells = " | ".join(f"{do[m]:.0e} / {dl[m]:.0e}" for m in marks)
            print(f"| {env_id} | {cells} | {first if first is not None else 'none'} |",
                  flush=True)
        print(f"load average after: {os.getloadavg()}")
        return
    print("| environment | C fast path (env steps/s) | MJX (env steps/s) | MJX / C | "
          "MJX compile + first window (s) |\n|---|---|---|---|---|")
    for env_id in args.envs:
        r = throughput(env_id, args.pairs, args.K, args.repeats)
        print(f"| {env_id} | {r['mujoco']:.0f} | {r['mjx']:.0f} | "
              f"{r['mjx'] / r['mujoco']:.3f} | {r['mjx compile+first s']:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
