"""Environment steps per second on the MuJoCo swimmer: a PES window against the raw batched
simulator at the same batch size, and against gymnasium's vector environment.

* raw: the closed-loop linear policy in NumPy and one ``mujoco.rollout`` call per environment
  step for the whole batch (frame_skip 4), with preallocated arrays: the least a policy-driven
  batched simulation costs in Python;
* PES: ``pes.PES(Swimmer(), num_particles=B, K=100).estimate`` (a window of 100 steps for B
  particles in one jitted scan, one host callback per step), inner_steps / time;
* gymnasium: ``gymnasium.make_vec("Swimmer-v5", B, vectorization_mode="sync")`` stepped with
  the same policy (one MjData per environment, a Python loop over them);
* open-loop: one ``mujoco.rollout`` call for 100 steps of all B environments (no policy): the
  simulator's own speed, for scale.

Each measurement is the median of ``--repeats`` interleaved repeats after a warm-up; run:

    .venv/bin/python benchmarks/swimmer_throughput.py --batch 20 100 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import rollout

import pes
from pes.tasks.swimmer import Swimmer

K = 100


def raw_closed_loop(task: Swimmer, W: np.ndarray, batch: int, steps: int) -> float:
    """Seconds for ``steps`` policy steps of ``batch`` environments, NumPy + rollout."""
    sim = task.sim
    model, data = sim.model, mujoco.MjData(sim.model)
    models = [model] * batch
    states = sim.reset_states(np.random.default_rng(0).uniform(-0.1, 0.1, (batch, 10)))
    out = np.empty((batch, sim.frame_skip, sim.nstate))
    sensors = np.empty((batch, sim.frame_skip, 0))
    control = np.empty((batch, sim.frame_skip, sim.nu))
    obs_cols = np.r_[sim.qpos][2:].tolist() + np.r_[sim.qvel].tolist()
    start = time.perf_counter()
    for _ in range(steps):
        action = np.clip(states[:, obs_cols] @ W.T, -1.0, 1.0)
        control[:] = action[:, None, :]
        rollout.rollout(models, data, states, control, skip_checks=True, nstep=sim.frame_skip,
                        state=out, sensordata=sensors)
        states = out[:, -1].copy()
    return time.perf_counter() - start


def open_loop(task: Swimmer, batch: int, steps: int) -> float:
    sim = task.sim
    data = mujoco.MjData(sim.model)
    states = sim.reset_states(np.zeros((batch, 10)))
    control = np.full((batch, steps * sim.frame_skip, sim.nu), 0.5)
    start = time.perf_counter()
    rollout.rollout([sim.model] * batch, data, states, control)
    return time.perf_counter() - start


def gym_vector(W: np.ndarray, batch: int, steps: int) -> float:
    envs = gymnasium.make_vec("Swimmer-v5", num_envs=batch, vectorization_mode="sync")
    obs, _ = envs.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        obs, *_ = envs.step(np.clip(obs @ W.T, -1.0, 1.0))
    elapsed = time.perf_counter() - start
    envs.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: B = 4, windows of 10 steps, 1 repeat (numbers mean "
                        "nothing)")
    args = parser.parse_args(argv)
    global K
    if args.quick:
        args.batch, args.repeats, K = [4], 1, 10
    task = Swimmer()
    W = 0.5 * np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 8)), np.float64)
    theta = jnp.asarray(W, jnp.float32)
    rows = []
    for batch in args.batch:
        est = pes.PES(task, num_particles=batch, sigma=0.3, truncation_length=K)
        state = est.init(jax.random.PRNGKey(0), theta)
        grad, state, _ = est.estimate(state, theta, jax.random.PRNGKey(1))  # compile, warm up
        jax.block_until_ready(grad)
        raw_closed_loop(task, W, batch, 10)
        gym_vector(W, batch, 10)
        times: dict[str, list[float]] = {"raw": [], "pes": [], "gym": [], "open": []}
        for r in range(args.repeats):
            t0 = time.perf_counter()
            grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(2 + r))
            jax.block_until_ready(grad)
            times["pes"].append(int(info.inner_steps) / (time.perf_counter() - t0))
            times["raw"].append(batch * K / raw_closed_loop(task, W, batch, K))
            times["gym"].append(batch * K / gym_vector(W, batch, K))
            times["open"].append(batch * K / open_loop(task, batch, K))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((batch, med))
        print(f"B={batch}: " + ", ".join(f"{k} {v:,.0f} steps/s" for k, v in med.items()),
              flush=True)
    print(f"\n| batch B | open-loop rollout | raw closed loop | PES window (K={K}) | PES / raw "
          "| gymnasium sync vector env | PES / gymnasium |")
    print("|---|---|---|---|---|---|---|")
    for batch, m in rows:
        print(f"| {batch} | {m['open']:,.0f} | {m['raw']:,.0f} | {m['pes']:,.0f} | "
              f"{m['pes'] / m['raw']:.0%} | {m['gym']:,.0f} | {m['pes'] / m['gym']:.1f}x |")


if __name__ == "__main__":
    main()
