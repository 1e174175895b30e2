"""Environment steps per second on the MuJoCo swimmer: a PES window against the raw batched
simulator at the same batch size, and against gymnasium's vector environment.

* PES: ``pes.PES(Swimmer(), num_particles=B, sigma=0.3, K=100, stagger=False).estimate`` (a
  window of 100 steps for B particles in one jitted scan, one host callback per step, which
  steps the batch with the suite's ``SuiteSim``: one ``mujoco.batch`` call), inner_steps / time;
* raw: the same work with nothing but NumPy and one ``mujoco.rollout`` call per environment
  step for the whole batch (frame_skip 4), preallocated arrays: B environments at antithetic
  linear policies W +/- 0.3 z, z redrawn per window, persisting between windows and reset at
  the horizon as the PES particles are (the least a policy-driven batched simulation costs in
  Python; ``mujoco.rollout`` steps a batch as fast as ``mujoco.batch``, within 5%);
* gymnasium: ``gymnasium.make_vec("Swimmer-v5", B, vectorization_mode="sync")`` driven the same
  way (one MjData per environment, a Python loop over them);
* open-loop: one ``mujoco.rollout`` call for 100 steps of all B environments from the reset
  state (no policy): the simulator's own speed, for scale.

The three closed-loop ones each run one warm-up window and then one window per repeat, so that
every repeat's window covers the same episode steps in all three (the simulator is ~10% slower
later in an episode than in its first 100 steps).
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
SIGMA = 0.3  # the paper's PES perturbation scale on the swimmer


def antithetic(W: np.ndarray, sigma: float, batch: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, *W.shape] policies W + sigma z_p for the first half, W - sigma z_p for the second
    (z_p standard normal, one per pair), as a PES window's pairs."""
    z = sigma * rng.standard_normal((batch // 2,) + W.shape)
    return np.concatenate([W + z, W - z])


class RawClosedLoop:
    """The raw baseline: B environments stepped by NumPy and one ``mujoco.rollout`` call per
    environment step, with preallocated arrays. Like the PES particles it is compared with, its
    environments persist from window to window (reset together at the horizon) and each window
    draws new antithetic policies W +/- sigma z: the simulator's cost depends on the episode's
    phase (at B = 20, ~880 us per step over an episode's first 100 steps, 950-1000 us later),
    so a baseline that always restarted from the reset state would do cheaper work."""

    def __init__(self, task: Swimmer, batch: int, seed: int = 0):
        sim = self.sim = task.sim
        self.task, self.batch = task, batch
        self.rng = np.random.default_rng(seed)
        self.data = mujoco.MjData(sim.model)
        self.models = [sim.model] * batch
        nstate = mujoco.mj_stateSize(sim.model, mujoco.mjtState.mjSTATE_FULLPHYSICS)
        self.out = np.empty((batch, sim.frame_skip, nstate))
        self.sensors = np.empty((batch, sim.frame_skip, 0))
        self.control = np.empty((batch, sim.frame_skip, sim.nu))
        self.obs_cols = list(range(3, 11))  # FULLPHYSICS is [time, qpos, qvel]: qpos[2:], qvel
        self._reset()

    def _reset(self):
        s = self.task.reset_noise_scale
        self.states = rollout_states(self.sim.model, self.rng.uniform(-s, s, (self.batch, 10)))
        self.t = 0

    def window(self, W: np.ndarray, sigma: float, steps: int) -> float:
        """Seconds for ``steps`` policy steps of the batch at W +/- sigma z (z per pair)."""
        Ws = antithetic(W, sigma, self.batch, self.rng)
        start = time.perf_counter()
        for _ in range(steps):
            action = np.clip(np.einsum("bij,bj->bi", Ws, self.states[:, self.obs_cols]),
                             -1.0, 1.0)
            self.control[:] = action[:, None, :]
            rollout.rollout(self.models, self.data, self.states, self.control, skip_checks=True,
                            nstep=self.sim.frame_skip, state=self.out, sensordata=self.sensors)
            self.states = self.out[:, -1].copy()
            self.t += 1
            if self.t >= self.task.horizon:
                self._reset()
        return time.perf_counter() - start


def rollout_states(model, noise: np.ndarray) -> np.ndarray:
    """[B, 10] reset noise -> [B, nstate] mjSTATE_FULLPHYSICS rows for ``mujoco.rollout``:
    time 0, qpos = noise[:, :5] (the swimmer's qpos0 is zero), qvel = noise[:, 5:]."""
    nstate = mujoco.mj_stateSize(model, mujoco.mjtState.mjSTATE_FULLPHYSICS)
    states = np.zeros((len(noise), nstate))
    states[:, 1:11] = noise
    return states


def open_loop(task: Swimmer, batch: int, steps: int) -> float:
    sim = task.sim
    data = mujoco.MjData(sim.model)
    states = rollout_states(sim.model, np.zeros((batch, 10)))
    control = np.full((batch, steps * sim.frame_skip, sim.nu), 0.5)
    start = time.perf_counter()
    rollout.rollout([sim.model] * batch, data, states, control)
    return time.perf_counter() - start


class GymVector:
    """gymnasium's synchronous vector environment (one MjData per environment, a Python loop
    over them), persistent and driven by antithetic policies like RawClosedLoop (its own
    autoreset at the horizon)."""

    def __init__(self, batch: int, seed: int = 0):
        self.envs = gymnasium.make_vec("Swimmer-v5", num_envs=batch, vectorization_mode="sync")
        self.obs, _ = self.envs.reset(seed=seed)
        self.batch, self.rng = batch, np.random.default_rng(seed)

    def window(self, W: np.ndarray, sigma: float, steps: int) -> float:
        Ws = antithetic(W, sigma, self.batch, self.rng)
        start = time.perf_counter()
        for _ in range(steps):
            self.obs, *_ = self.envs.step(np.clip(np.einsum("bij,bj->bi", Ws, self.obs),
                                                  -1.0, 1.0))
        return time.perf_counter() - start


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
        # The paper's swimmer PES (and `pes run swimmer`'s default): pairs not staggered, so
        # all particles are at the same step of their episodes, as the baselines' are.
        est = pes.PES(task, num_particles=batch, sigma=SIGMA, truncation_length=K,
                      stagger=False)
        state = est.init(jax.random.PRNGKey(0), theta)
        grad, state, _ = est.estimate(state, theta, jax.random.PRNGKey(1))  # compile, warm up
        jax.block_until_ready(grad)
        # One warm-up window each, so that every repeat's window covers the same episode
        # steps in all three.
        raw, gym = RawClosedLoop(task, batch), GymVector(batch)
        raw.window(W, SIGMA, K)
        gym.window(W, SIGMA, K)
        times: dict[str, list[float]] = {"raw": [], "pes": [], "gym": [], "open": []}
        for r in range(args.repeats):
            t0 = time.perf_counter()
            grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(2 + r))
            jax.block_until_ready(grad)
            times["pes"].append(int(info.inner_steps) / (time.perf_counter() - t0))
            times["raw"].append(batch * K / raw.window(W, SIGMA, K))
            times["gym"].append(batch * K / gym.window(W, SIGMA, K))
            times["open"].append(batch * K / open_loop(task, batch, K))
        gym.envs.close()
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
