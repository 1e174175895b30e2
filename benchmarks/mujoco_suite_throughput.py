"""Environment steps per second on the MuJoCo suite's fast path: a PES window against bare
batched ``mujoco.rollout`` at the same batch size, on Hopper-v5 and HalfCheetah-v5.

* PES: ``pes.PES(pes.envs.Gymnasium(env), num_particles=B, sigma=0.3, K=100,
  stagger=False).estimate`` (Gymnasium takes the MuJoCo suite's fast path by itself; linear
  policy) (a window of K steps for B particles, 10 antithetic pairs at
  B = 20, in one jitted scan with one host callback per step), inner_steps / time.
  Hopper runs with ``terminate_when_unhealthy=False``: the estimators let a terminated
  particle wait (no simulation) until its pair's episode slot ends, so with termination a
  window at a poor policy mostly waits, and would time the estimator's bookkeeping rather than
  the simulator path. Every particle is simulated at every step, as in the baseline.
* rollout: the same work with nothing but NumPy and one ``mujoco.rollout`` call per
  environment step for the batch (frame_skip substeps, preallocated arrays, float64 states
  carried between calls): B environments at antithetic linear policies clip(W obs + b),
  redrawn per window, reset at the horizon (the least a policy-driven batched simulation
  costs in Python; no rewards, no warm start carried).

Each measurement is the median of ``--repeats`` interleaved repeats after a warm-up window;
the ratio PES / rollout is the figure of merit (goal: >= 80%). Run:

    .venv/bin/python benchmarks/mujoco_suite_throughput.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import mujoco
import numpy as np
from mujoco import rollout

import pes

SIGMA = 0.3


# Keywords that keep every particle running (see the module docstring).
NO_TERMINATION = {"Hopper-v5": {"terminate_when_unhealthy": False},
                  "Walker2d-v5": {"terminate_when_unhealthy": False},
                  "Ant-v5": {"terminate_when_unhealthy": False}}


class DropDone:
    """A two-value System over a three-value one that never ends an episode early, for
    estimators without termination support."""

    def __init__(self, system):
        self.system, self.horizon = system, system.horizon

    def init(self, key):
        return self.system.init(key)

    def step(self, state, theta, t, key):
        return self.system.step(state, theta, t, key)[:2]


def pes_estimator(system, batch: int, k: int):
    kwargs = dict(num_particles=batch, sigma=SIGMA, truncation_length=k, stagger=False)
    try:
        est = pes.PES(system, **kwargs)
        est.init(jax.random.PRNGKey(0), system.theta0())
        return est
    except (TypeError, ValueError):  # no termination support in these estimators
        return pes.PES(DropDone(system), **kwargs)


class RawRollout:
    """B environments stepped by NumPy and one ``mujoco.rollout`` call per step."""

    def __init__(self, system, batch: int, seed: int = 0):
        sim = system._fast.sim
        self.system, self.batch, self.rng = system, batch, np.random.default_rng(seed)
        self.model, self.fs = sim.model, sim.frame_skip
        self.data = mujoco.MjData(self.model)
        full = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self.nstate = mujoco.mj_stateSize(self.model, full)
        template = np.empty(self.nstate)
        mujoco.mj_getState(self.model, self.data, template, full)
        self.template, self.qpos0 = template, self.model.qpos0.copy()
        self.qpos = slice(1, 1 + sim.nq)
        self.qvel = slice(1 + sim.nq, 1 + sim.nq + sim.nv)
        self.skip = sim.nq + sim.nv - system.obs_dim  # positions left out of the observation
        self.noise = sim.spec.p["reset_noise_scale"]
        self.out = np.empty((batch, self.fs, self.nstate))
        self.sensors = np.empty((batch, self.fs, 0))
        self.control = np.empty((batch, self.fs, sim.nu))
        self.low, self.high = sim.ctrl_low, sim.ctrl_high
        self.states = self._reset(batch)
        self.t = np.zeros(batch, int)

    def _reset(self, n):
        s = self.noise
        states = np.repeat(self.template[None], n, axis=0)
        states[:, self.qpos] = self.qpos0 + self.rng.uniform(-s, s, (n, self.qpos.stop - 1))
        states[:, self.qvel] = s * self.rng.standard_normal((n, self.qvel.stop - self.qpos.stop))
        return states

    def window(self, steps: int) -> float:
        obs_dim, nu = self.system.obs_dim, self.system.action.size
        z = SIGMA * self.rng.standard_normal((self.batch // 2, nu, obs_dim + 1))
        policies = np.concatenate([z, -z])
        start = time.perf_counter()
        for _ in range(steps):
            obs = np.concatenate([self.states[:, self.qpos][:, self.skip:],
                                  np.clip(self.states[:, self.qvel], -10, 10)], axis=1)
            action = np.einsum("bij,bj->bi", policies[:, :, :-1], obs) + policies[:, :, -1]
            self.control[:] = np.clip(action, self.low, self.high)[:, None, :]
            rollout.rollout([self.model] * self.batch, [self.data], self.states, self.control,
                            skip_checks=True, nstep=self.fs, state=self.out,
                            sensordata=self.sensors)
            self.states = self.out[:, -1].copy()
            self.t += 1
            done = self.t >= self.system.horizon
            if done.any():
                self.states[done] = self._reset(int(done.sum()))
                self.t[done] = 0
        return time.perf_counter() - start


def measure(env_id: str, batch: int, k: int, repeats: int) -> dict[str, float]:
    system = pes.envs.Gymnasium(env_id, **NO_TERMINATION.get(env_id, {}))
    assert system.fast, f"{env_id} should take the fast path"
    est = pes_estimator(system, batch, k)
    theta = system.theta0()
    state = est.init(jax.random.PRNGKey(0), theta)
    grad, state, _ = est.estimate(state, theta, jax.random.PRNGKey(1))  # compile, warm up
    jax.block_until_ready(grad)
    raw = RawRollout(system, batch)
    raw.window(k)
    times: dict[str, list[float]] = {"pes": [], "rollout": []}
    for r in range(repeats):
        t0 = time.perf_counter()
        grad, state, info = est.estimate(state, theta, jax.random.PRNGKey(2 + r))
        jax.block_until_ready(grad)
        times["pes"].append(int(info.inner_steps) / (time.perf_counter() - t0))
        times["rollout"].append(batch * k / raw.window(k))
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    parser.add_argument("--batch", type=int, default=20, help="particles (2 x pairs)")
    parser.add_argument("--k", type=int, default=100, help="PES truncation length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: HalfCheetah, B = 4, K = 10, 1 repeat (numbers mean "
                        "nothing)")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.batch, args.k, args.repeats = ["HalfCheetah-v5"], 4, 10, 1
    rows = []
    for env_id in args.envs:
        med = measure(env_id, args.batch, args.k, args.repeats)
        rows.append((env_id, med))
        print(f"{env_id}: " + ", ".join(f"{k} {v:,.0f} steps/s" for k, v in med.items()),
              flush=True)
    print(f"\n| environment | B | bare mujoco.rollout | PES window (K={args.k}) | PES / rollout |")
    print("|---|---|---|---|---|")
    for env_id, m in rows:
        print(f"| {env_id} | {args.batch} | {m['rollout']:,.0f} | {m['pes']:,.0f} | "
              f"{m['pes'] / m['rollout']:.0%} |")


if __name__ == "__main__":
    main()
