"""Fit your own simulator: the four rates of a predator-prey (Lotka-Volterra) ODE, solved with
diffrax, fitted to noisy observations with PES, against truncated ES and full-horizon ES at the
same budget of inner (solver) steps; then the Lorenz task rebuilt on pes.ODE, checked against
the hand-written Euler version.

    prey'     = alpha * prey - beta * prey * predator
    predator' = delta * prey * predator - gamma * predator
    theta     = log(alpha, beta, delta, gamma)

One inner step is one Tsit5 step between consecutive observation times; the meta-objective is
the mean squared error over the T observations. Needs ``pip install 'pes[ode]'``.

    python examples/fit_ode.py            # the tutorial's size (a few minutes on 1 core)
    python examples/fit_ode.py --tiny     # seconds: the test's size
"""

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pes
from pes.tasks.lorenz import Lorenz, lorenz_ode

TRUE_RATES = np.array([1.0, 0.1, 0.075, 1.5])  # alpha, beta, delta, gamma
START_RATES = np.array([0.8, 0.12, 0.06, 1.8])  # 20% off


def predator_prey(y, t, theta):
    alpha, beta, delta, gamma = jnp.exp(theta)
    prey, pred = y[0], y[1]
    return jnp.stack([alpha * prey - beta * prey * pred, delta * prey * pred - gamma * pred])


def make_system(T, dt, noise=0.05, seed=0):
    # ---- your simulator -------------------------------------------------------------------
    ts = np.arange(T + 1) * dt
    y0 = jnp.array([10.0, 5.0])
    clean = pes.ODE(predator_prey, y0, ts, np.zeros((T, 2)), solver=diffrax.Tsit5())
    truth = np.asarray(clean.trajectory(jnp.log(jnp.asarray(TRUE_RATES, jnp.float32))))
    rng = np.random.default_rng(seed)
    observed = truth * np.exp(noise * rng.normal(size=truth.shape))  # 5% multiplicative noise
    return pes.ODE(predator_prey, y0, ts, observed, solver=diffrax.Tsit5(), loss_cap=1e4)
    # ----------------------------------------------------------------------------------------


def fit(system, estimator, budget, lr, seed):
    theta0 = jnp.log(jnp.asarray(START_RATES, jnp.float32))
    stop = lambda record, theta: record.inner_steps >= budget
    theta, history = pes.train(estimator, theta0, optax.adam(lr), num_steps=10**9,
                               key=jax.random.PRNGKey(seed), callback=stop)
    return theta, history[-1].inner_steps


def lorenz_check(horizon):
    """Meta-losses of the hand-written Lorenz task and of lorenz_ode (Euler, same dt)."""
    task = Lorenz(horizon=horizon)
    ode = lorenz_ode(task)
    print(f"Lorenz, T={horizon}: mean per-step loss, hand-written Euler vs pes.ODE(Euler)")
    for da, dr in [(0.0, 0.0), (0.01, 0.0), (0.0, -0.02), (0.1, -0.05), (0.5, 0.1)]:
        theta = task.true_theta() + jnp.array([da, dr])
        a = float(pes.evaluate(task, theta, jax.random.PRNGKey(0)))
        b = float(pes.evaluate(ode, theta, jax.random.PRNGKey(0)))
        print(f"  offset (log a {da:+.2f}, log r {dr:+.2f}): {a:12.6f} {b:12.6f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="seconds-sized run (the test's)")
    p.add_argument("--horizon", type=int, default=200, help="T, observations (dt = 0.1)")
    p.add_argument("--budget", type=int, default=400_000, help="inner steps per estimator")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    T, budget, seeds = (20, 800, 1) if args.tiny else (args.horizon, args.budget, args.seeds)
    system = make_system(T, dt=0.1)
    K, N = (5, 4) if args.tiny else (20, 32)
    start = jnp.log(jnp.asarray(START_RATES, jnp.float32))
    truth = jnp.log(jnp.asarray(TRUE_RATES, jnp.float32))
    key = jax.random.PRNGKey(0)
    print(f"predator-prey, T={T} observations; budget {budget} solver steps per fit; "
          f"N={N}, K={K}")
    print(f"  start  meta-loss {float(pes.evaluate(system, start, key)):10.4f}")
    print(f"  truth  meta-loss {float(pes.evaluate(system, truth, key)):10.4f} (the noise)")
    rows = []
    for name, cls in (("PES", pes.PES), ("truncated ES", pes.TruncatedES), ("full ES", pes.FullES)):
        window = {} if cls is pes.FullES else {"truncation_length": K}
        est = cls(system, num_particles=N, sigma=0.02, **window)
        for seed in range(seeds):
            t0, c0 = time.perf_counter(), time.process_time()
            theta, used = fit(system, est, budget, 0.01, seed)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            meta = float(pes.evaluate(system, theta, key))
            err = np.abs(np.exp(np.asarray(theta)) / TRUE_RATES - 1)
            rows.append((name, seed, meta, float(err.max())))
            print(f"  {name:>12} seed {seed}: meta-loss {meta:10.4f}  max rate error "
                  f"{100 * err.max():5.1f}%  inner steps {used}  "
                  f"wall {wall:.0f} s (cpu {cpu:.0f} s)")
    lorenz_check(50 if args.tiny else 2000)
    return rows


if __name__ == "__main__":
    main()
