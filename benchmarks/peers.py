"""Whole outer steps of PES (estimate + optimizer update) per second: pes against evosax's
PersistentES and against a plain NumPy PES, on the toy-regression task.

Every implementation runs the same problem: toy regression (PES paper experiment 2: SGD on a
2-d inner problem with a learning-rate schedule theta, T = 100), N = 100 particles (50
antithetic pairs), K = 10 steps per outer step, sigma = 0.3, Adam(1e-2, b1 = 0.99). One outer
step = one window of K inner steps for all N particles + one Adam update, so each does N * K
particle-steps per outer step:

- ``pes.train``: the library's training loop as users call it (it reads the window's loss and
  non-finite count back to the host every step);
- ``pes.train M=50``: the same with ``steps_per_call=50``: 50 outer steps in one compiled
  loop, their records read back once per call;
- ``pes.train default``: pes.train with neither steps_per_call nor a callback (the call a
  user makes); it sizes its compiled calls itself;
- ``pes loop``: ``PES.estimate`` and a jitted optax update in a Python loop with no host reads;
- ``pes scan``: the same outer step traced into a user's own jitted ``lax.scan`` over chunks
  of 50 outer steps (estimate is a pure function, so it composes with jit and scan);
- ``evosax``: evosax's PersistentES (ask/tell) driving the task as its documentation's toy
  regression example does: a Python loop that resets the inner states on the host when the
  strategy's step counter wraps, asks, unrolls K steps with a jitted, vmapped lax.scan and
  tells (the fitness being the window's summed loss);
- ``raw unroll``: no PES at all, the bound: a jitted, vmapped K-step lax.scan of the task's
  step for the same N perturbed particles, called once per outer step (benchmarks/overhead.py's
  raw unroll; theta does not move);
- ``numpy``: a straightforward PES in NumPy, vectorised over particles (the inner step and its
  gradient written out by hand, Adam by hand).

Each implementation is timed over ``--steps`` outer steps after a warm-up run of as many;
the implementations take turns, ``--repeats`` times, and the table reports the median rate of
each and the ratio of pes's to the others' (medians of the per-repeat ratios).

    .venv/bin/python benchmarks/peers.py [--steps 200] [--repeats 5] [--quick]

evosax is optional (``pip install -e '.[bench]'``); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes
from pes.tasks import ToyRegression
from pes.tasks.toy_regression import inner_loss

N, K, SIGMA, LR, B1 = 100, 10, 0.3, 1e-2, 0.99
THETA0 = np.array([-4.0, -4.0], np.float32)


# --------------------------------------------------------------------------------- pes


class PesTrain:
    """pes.train for ``steps`` outer steps, continued from where the last call stopped.

    Its first call (outer steps 1 to steps_per_call) compiles the run's functions, so the
    run is steps + steps_per_call outer steps long and timed from train's callback for step
    steps_per_call (the end of that first call) to the callback for the last step: every
    timed step's callback included."""

    steps_per_call = 1
    name = "pes.train"

    def __init__(self, task, seed):
        self.est = pes.PES(task, num_particles=N, sigma=SIGMA, truncation_length=K)
        self.opt = optax.adam(LR, b1=B1)
        self.theta = jnp.asarray(THETA0)
        self.key = jax.random.PRNGKey(seed)
        self.calls = 0

    def run(self, steps):
        self.calls += 1
        m = self.steps_per_call
        marks = {}
        result = pes.train(self.est, self.theta, self.opt, num_steps=steps + m,
                           key=jax.random.fold_in(self.key, self.calls), steps_per_call=m,
                           callback=lambda record, theta: marks.__setitem__(
                               record.step, time.perf_counter()))
        self.theta = result.theta
        return self.theta, marks[steps + m] - marks[m]


class PesTrainChunked(PesTrain):
    """pes.train with steps_per_call=50: 50 outer steps per compiled call, their records read
    back once."""

    steps_per_call = 50
    name = "pes.train M=50"


class PesTrainDefault(PesTrain):
    """pes.train as users call it: no steps_per_call, no callback (it then chooses its own
    chunk sizes), the whole call timed (its setup included); the compiled program is reused
    from the warm-up call (same estimator and optimizer objects)."""

    name = "pes.train default"

    def run(self, steps):
        self.calls += 1
        t0 = time.perf_counter()
        result = pes.train(self.est, self.theta, self.opt, num_steps=steps,
                           key=jax.random.fold_in(self.key, self.calls))
        self.theta = jax.block_until_ready(result.theta)
        return self.theta, time.perf_counter() - t0


class PesLoop:
    """PES.estimate + a jitted optax update, no host reads inside the loop."""

    name = "pes loop"

    def __init__(self, task, seed):
        self.est = pes.PES(task, num_particles=N, sigma=SIGMA, truncation_length=K)
        self.opt = optax.adam(LR, b1=B1)
        self.theta = jnp.asarray(THETA0)
        self.opt_state = self.opt.init(self.theta)
        self.key = jax.random.PRNGKey(seed)
        self.state = self.est.init(self.key, self.theta)
        self.step = 0

        @jax.jit
        def update(theta, opt_state, grad):
            updates, opt_state = self.opt.update(grad, opt_state, theta)
            return optax.apply_updates(theta, updates), opt_state

        self.update = update

    def run(self, steps):
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            grad, self.state, _ = self.est.estimate(self.state, self.theta,
                                                    jax.random.fold_in(self.key, self.step))
            self.theta, self.opt_state = self.update(self.theta, self.opt_state, grad)
        jax.block_until_ready(self.theta)
        return self.theta, time.perf_counter() - t0


class PesScan(PesLoop):
    """The same outer step (estimate + optax update) inside one jitted lax.scan over a chunk
    of outer steps: estimate is a pure function of (state, theta, key), so a user can trace it
    into their own loop; one dispatch per chunk instead of two per step."""

    name = "pes scan"
    chunk = 50

    def __init__(self, task, seed):
        super().__init__(task, seed)
        est, opt = self.est, self.opt

        @jax.jit
        def steps(theta, opt_state, state, keys):
            def outer(carry, key):
                theta, opt_state, state = carry
                grad, state, info = est.estimate(state, theta, key)
                updates, opt_state = opt.update(grad, opt_state, theta)
                return (optax.apply_updates(theta, updates), opt_state, state), info.loss

            return jax.lax.scan(outer, (theta, opt_state, state), keys)

        self.steps = steps

    def run(self, steps):
        t0 = time.perf_counter()
        done = 0
        while done < steps:
            n = min(self.chunk, steps - done)
            keys = jax.vmap(lambda i: jax.random.fold_in(self.key, i))(
                jnp.arange(self.step + 1, self.step + n + 1))
            (self.theta, self.opt_state, self.state), _ = self.steps(
                self.theta, self.opt_state, self.state, keys)
            self.step += n
            done += n
        jax.block_until_ready(self.theta)
        return self.theta, time.perf_counter() - t0


class RawUnroll:
    """The least any implementation must compute: benchmarks/overhead.py's raw unroll (a
    jit(vmap over pairs of vmap over members of a K-step lax.scan) of the task's step at
    theta +/- eps) called once per outer step, its states fed back; no estimator, no
    gradient, no update, no resets (a bound, not a trainer: theta does not move)."""

    name = "raw unroll"

    def __init__(self, task, seed):
        spec = importlib.util.spec_from_file_location(  # benchmarks/overhead.py's
            "bench_overhead", Path(__file__).with_name("overhead.py"))
        overhead = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(overhead)
        self.raw = overhead.raw_unroll(task, N, K)
        self.key = jax.random.PRNGKey(seed)
        self.theta = jnp.asarray(THETA0)
        self.states = jax.vmap(lambda k: jax.vmap(task.init)(jax.random.split(k)))(
            jax.random.split(self.key, N // 2))
        self.eps = SIGMA * jax.random.normal(self.key, (N // 2, 2))
        self.step = 0

    def run(self, steps):
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            self.states, _ = self.raw(self.states, self.theta, self.eps,
                                      jax.random.fold_in(self.key, self.step))
        jax.block_until_ready(self.states)
        return self.theta, time.perf_counter() - t0


# ------------------------------------------------------------------------------ evosax


class Evosax:
    """evosax PersistentES on the toy task, driven as in evosax's toy-regression example."""

    name = "evosax"

    def __init__(self, task, seed):
        from evosax.algorithms import PersistentES

        self.T = task.horizon
        self.strategy = PersistentES(population_size=N, solution=jnp.zeros(2),
                                     optimizer=optax.adam(LR, b1=B1),
                                     std_schedule=optax.constant_schedule(SIGMA))
        self.params = self.strategy.default_params.replace(T=self.T, K=K)
        self.key = jax.random.PRNGKey(seed)
        self.key, sub = jax.random.split(self.key)
        self.state = self.strategy.init(sub, jnp.asarray(THETA0), self.params)
        self.xs = self._fresh()
        T = self.T

        def window(x, theta, t0):
            def body(carry, _):
                x, t, total = carry
                lr = jnp.exp(theta[0]) * (T - t) / T + jnp.exp(theta[1]) * t / T
                x = x - lr * jax.grad(inner_loss)(x)
                return (x, t + 1, total + inner_loss(x) * (t < T)), None

            (x, _, total), _ = jax.lax.scan(body, (x, t0, 0.0), None, length=K)
            return total, x

        self.unroll = jax.jit(jax.vmap(window, in_axes=(0, 0, None)))

    def _fresh(self):
        return jnp.broadcast_to(jnp.asarray([1.0, 1.0]), (N, 2))

    def run(self, steps):
        t0 = time.perf_counter()
        for _ in range(steps):
            self.key, k_ask, k_tell = jax.random.split(self.key, 3)
            if self.state.inner_step_counter == 0:  # a host read, as in the example
                self.xs = self._fresh()
            population, self.state = self.strategy.ask(k_ask, self.state, self.params)
            fitness, self.xs = self.unroll(self.xs, population, self.state.inner_step_counter)
            self.state, _ = self.strategy.tell(k_tell, population, fitness, self.state,
                                               self.params)
        jax.block_until_ready(self.state.mean)
        return self.state.mean, time.perf_counter() - t0


# ------------------------------------------------------------------------------- NumPy


def numpy_step(x, lr):
    """One SGD step of every particle on the toy inner loss: x [n, 2], lr [n].
    Returns (new x, loss at the new x), both vectorised over particles."""
    x0, x1 = x[:, 0], x[:, 1]
    bump = np.exp(-5.0 * x0**2)
    s = np.sin(x1)
    g0 = x0 / np.sqrt(x0**2 + 5.0) - 10.0 * x0 * s**2 * bump
    g1 = 2.0 * s * np.cos(x1) * bump + 0.25 * np.sign(x1 - 100.0)
    x = x - lr[:, None] * np.stack([g0, g1], axis=1)
    x0, x1 = x[:, 0], x[:, 1]
    loss = (np.sqrt(x0**2 + 5.0) - np.sqrt(5.0) + np.sin(x1) ** 2 * np.exp(-5.0 * x0**2)
            + 0.25 * np.abs(x1 - 100.0))
    return x, loss


class NumpyPES:
    """PES in NumPy, vectorised over particles: antithetic pairs, per-particle accumulators of
    the episode's perturbations, lockstep episodes of T steps, Adam on theta."""

    name = "numpy"

    def __init__(self, task, seed):
        self.T = task.horizon
        self.rng = np.random.default_rng(seed)
        self.theta = THETA0.astype(np.float64)
        self.m = np.zeros(2)
        self.v = np.zeros(2)
        self.count = 0
        self.t = 0
        self.x = np.tile([1.0, 1.0], (N, 1))
        self.xi = np.zeros((N, 2))

    def run(self, steps):
        T = self.T
        t0 = time.perf_counter()
        for _ in range(steps):
            if self.t >= T:
                self.t = 0
                self.x = np.tile([1.0, 1.0], (N, 1))
                self.xi = np.zeros((N, 2))
            half = SIGMA * self.rng.standard_normal((N // 2, 2))
            eps = np.concatenate([half, -half])
            self.xi += eps
            theta = self.theta + eps
            total = np.zeros(N)
            for j in range(K):
                t = self.t + j
                frac = t / T
                lr = np.exp(theta[:, 0]) * (1 - frac) + np.exp(theta[:, 1]) * frac
                self.x, loss = numpy_step(self.x, lr)
                total += loss * (t < T)
            self.t += K
            grad = (total @ self.xi) / (SIGMA**2 * N * K)
            self.count += 1
            self.m = B1 * self.m + (1 - B1) * grad
            self.v = 0.999 * self.v + 0.001 * grad**2
            m_hat = self.m / (1 - B1**self.count)
            v_hat = self.v / (1 - 0.999**self.count)
            self.theta = self.theta - LR * m_hat / (np.sqrt(v_hat) + 1e-8)
        return self.theta, time.perf_counter() - t0


# -------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="outer steps per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    args = parser.parse_args(argv)
    steps, repeats = (5, 1) if args.quick else (args.steps, args.repeats)

    task = ToyRegression()
    makers = [PesTrain, PesTrainChunked, PesTrainDefault, PesLoop, PesScan, RawUnroll,
              NumpyPES]
    try:
        evosax_version = importlib.metadata.version("evosax")
        makers.insert(6, Evosax)
    except importlib.metadata.PackageNotFoundError:
        evosax_version = None
        print("evosax is not installed: skipping it (pip install -e '.[bench]' adds it)\n")
    runners = [make(task, seed=0) for make in makers]
    for r in runners:  # compile (for the timed chunk sizes) and warm up
        r.run(steps)

    times = {r.name: [] for r in runners}
    thetas = {}
    for rep in range(repeats):
        order = runners if rep % 2 == 0 else runners[::-1]
        for r in order:
            thetas[r.name], seconds = r.run(steps)
            times[r.name].append(seconds)

    work = N * K * steps
    print(f"jax {jax.__version__}, evosax {evosax_version or '-'}; toy regression, N={N}, K={K}, "
          f"{steps} outer steps per timing, medians of {repeats} repeats\n")
    peers = [name for name in ("evosax", "numpy", "raw unroll") if name in times]
    print("| implementation | particle-steps/s | outer steps/s | "
          + " | ".join(f"speed / {p}" for p in peers) + " |")
    print("|---|---|---|" + "---|" * len(peers))
    for r in runners:
        t = np.array(times[r.name])
        # Per-repeat ratios: the implementations ran back to back in each repeat.
        ratios = [f"{np.median(np.array(times[p]) / t):.2f}x" for p in peers]
        print(f"| {r.name} | {work / np.median(t):,.0f} | {steps / np.median(t):,.0f} | "
              + " | ".join(ratios) + " |")
    print("\ntheta after the timed steps (all start at (-4, -4); the good region is near "
          "theta0 ~ 2.85):")
    for r in runners:
        print(f"  {r.name}: {np.round(np.asarray(thetas[r.name], np.float64), 3)}")


if __name__ == "__main__":
    main()
