"""Environment steps per second of a PES window on gymnasium's MuJoCo environments against
gymnasium's own vector environment stepping the same policy on the same number of envs.

* PES: ``pes.PES(pes.envs.Gymnasium(env_id), num_particles=2 * pairs, sigma=0.1, K=100)``,
  one jitted ``estimate`` (a window of K steps for every particle: one host call per step for
  all of them, plus one on steps where some particle starts an episode); env steps/s =
  ``info.inner_steps`` / time, the steps really simulated. A member whose episode ended
  waits for its pair's clock to reach the horizon (``--reset slot``, the default) or, with
  ``--reset pair``, the pair restarts as soon as both members are done (docs/termination.md).
  (Without done-aware estimators the System is wrapped so that a particle restarts by itself
  when its episode ends; printed as 'autoreset wrapper'.)
* gymnasium: ``gymnasium.vector.SyncVectorEnv`` of the same number of envs (``--async`` adds
  ``AsyncVectorEnv``, one process per env), the linear policy a = clip(W_i obs + b_i) for the
  same antithetic pairs theta +/- sigma z computed by NumPy for the whole batch each step;
  steps that only reset an env (gymnasium's next-step autoreset) are not counted.

Both run the same number of steps per repeat, interleaved; the median of ``--repeats`` is
reported after a warm-up (compilation, env creation), per second of wall time and per second
of the process's CPU time (all threads; the steadier figure on a busy machine, where PES's
handoffs between XLA's and Python's threads wait for a free core). Run:

    PYTHONPATH=. .venv/bin/python benchmarks/gym_throughput.py --pairs 10 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

import pes
import pes.envs

K = 100
SIGMA = 0.1


class AutoReset:
    """A Gymnasium System as a two-tuple System whose episodes restart by themselves when
    they end (for estimators that do not take ``done`` yet): same host work per step."""

    def __init__(self, system):
        self.system, self.horizon = system, system.horizon

    def init(self, key):
        return self.system.init(key)

    def step(self, state, theta, t, key):
        new, loss, done = self.system.step(state, theta, t, key)
        fresh = self.system.init(key)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), fresh, new), loss


RESET = "slot"


def pes_estimator(system, pairs: int):
    """PES on the system itself if the estimators take (state, loss, done) steps, else on the
    AutoReset wrapper. Returns (estimator, label)."""
    key = jax.random.PRNGKey(0)
    try:
        est = pes.PES(system, num_particles=2 * pairs, sigma=SIGMA, truncation_length=K,
                      reset=RESET)
        est.init(key, system.theta0())
        return est, "done-aware estimator"
    except (TypeError, ValueError):
        est = pes.PES(AutoReset(system), num_particles=2 * pairs, sigma=SIGMA,
                      truncation_length=K)
        return est, "autoreset wrapper"


class PESRunner:
    def __init__(self, env_id: str, pairs: int, threads: int):
        self.system = pes.envs.Gymnasium(env_id, threads=threads, fast=False)  # generic path
        self.est, self.label = pes_estimator(self.system, pairs)
        self.theta = self.system.theta0()
        self.state = self.est.init(jax.random.PRNGKey(0), self.theta)
        self.fn = jax.jit(self.est.estimate)
        self.calls = 0

    def window(self) -> tuple[int, float, float]:
        self.calls += 1
        start, cpu = time.perf_counter(), time.process_time()
        grad, self.state, info = self.fn(self.state, self.theta, jax.random.PRNGKey(self.calls))
        jax.block_until_ready(grad)
        return (int(info.inner_steps), time.perf_counter() - start,
                time.process_time() - cpu)


class GymRunner:
    """gymnasium's vector env stepping a = clip(W_i obs + b_i) for antithetic W_i, b_i."""

    def __init__(self, env_id: str, pairs: int, mode: str, seed: int = 0):
        n = 2 * pairs
        fns = [lambda: gymnasium.make(env_id) for _ in range(n)]
        self.env = (gymnasium.vector.SyncVectorEnv(fns) if mode == "sync"
                    else gymnasium.vector.AsyncVectorEnv(fns))
        self.rng = np.random.default_rng(seed)
        self.obs, _ = self.env.reset(seed=seed)
        space = self.env.single_action_space
        self.low, self.high = space.low, space.high
        self.act_dim, self.obs_dim = space.shape[0], self.obs.shape[1]
        self.pairs = pairs
        self.ended = np.zeros(n, bool)

    def window(self) -> tuple[int, float, float]:
        z = SIGMA * self.rng.standard_normal((self.pairs, self.act_dim, self.obs_dim + 1))
        Wb = np.concatenate([z, -z]).astype(np.float32)  # theta = 0 +/- sigma z, as PES's
        steps = 0
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(K):
            a = np.einsum("nij,nj->ni", Wb[:, :, :-1], self.obs.astype(np.float32)) + Wb[:, :, -1]
            self.obs, _, term, trunc, _ = self.env.step(np.clip(a, self.low, self.high))
            steps += int(np.sum(~self.ended))  # rows that only reset did not simulate
            self.ended = term | trunc
        return steps, time.perf_counter() - start, time.process_time() - cpu


def measure(env_id: str, pairs: int, repeats: int, threads: int, modes: list[str],
            pure_callback: bool = False) -> None:
    runners = {"pes": PESRunner(env_id, pairs, threads)}
    if pure_callback:  # the same window with jax.pure_callback as its host call
        pes.envs.host.FAST = False
        try:
            runners["pes-pc"] = PESRunner(env_id, pairs, threads)
            runners["pes-pc"].window()  # compiled now, with pure_callback
        finally:
            pes.envs.host.FAST = True
    for mode in modes:
        runners[mode] = GymRunner(env_id, pairs, mode)
    rates = {name: [] for name in runners}
    cpu_rates = {name: [] for name in runners}
    for r in runners.values():
        r.window()  # warm-up: compilation, first resets
    for _ in range(repeats):
        for name, r in runners.items():
            steps, seconds, cpu = r.window()
            rates[name].append(steps / seconds)
            cpu_rates[name].append(steps / max(cpu, 1e-9))
    med = {name: statistics.median(v) for name, v in rates.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu_rates.items()}
    print(f"{env_id}, {pairs} antithetic pairs ({2 * pairs} envs), K = {K}, "
          f"PES via {runners['pes'].label}, reset={RESET}, threads = {threads}")
    for name, rate in med.items():
        spread = f"[{min(rates[name]):.0f}, {max(rates[name]):.0f}]"
        print(f"  {name:6s} {rate:9.0f} env steps/s  {spread}   "
              f"{cpu_med[name]:9.0f} env steps per CPU second")
    if pure_callback:
        print(f"  PES with jax.pure_callback / PES: {med['pes-pc'] / med['pes']:.2f} (wall), "
              f"{cpu_med['pes-pc'] / cpu_med['pes']:.2f} (CPU time)")
    for mode in modes:
        print(f"  PES / gymnasium {mode}: {med['pes'] / med[mode]:.2f} (wall), "
              f"{cpu_med['pes'] / cpu_med[mode]:.2f} (CPU time)")


def main(argv: list[str] | None = None) -> None:
    global K, RESET
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--async", dest="use_async", action="store_true",
                   help="also measure gymnasium's AsyncVectorEnv (one process per env)")
    p.add_argument("--pure-callback", action="store_true",
                   help="also measure PES with jax.pure_callback as the host call")
    p.add_argument("--reset", choices=["slot", "pair"], default="slot",
                   help="PES's reset mode (docs/termination.md)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: InvertedPendulum-v5, 2 pairs, K = 10, one repeat")
    args = p.parse_args(argv)
    RESET = args.reset
    if args.quick:
        args.envs, args.pairs, args.repeats, K = ["InvertedPendulum-v5"], 2, 1, 10
    modes = ["sync"] + (["async"] if args.use_async else [])
    for env_id in args.envs:
        measure(env_id, args.pairs, args.repeats, args.threads, modes, args.pure_callback)


if __name__ == "__main__":
    main()
