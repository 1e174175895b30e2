"""Particle-steps per second of PES.estimate against the number of devices its particles are
sharded over.

Each device count D runs in a fresh subprocess with D CPU devices forced by
``XLA_FLAGS=--xla_force_host_platform_device_count=D``; the estimator gets a one-axis mesh of
all D devices (``PES(..., mesh=jax.make_mesh((D,), ('particles',)))``) and D = 1 runs without
a mesh. Forced CPU devices are not separate hardware: they share the machine's cores (and
XLA's CPU thread pool), so beyond the number of physical cores the rate can only flatten, and a
single device may already use several cores for large matrix products. On a GPU host the same
script measures real devices if D of them are visible (``--platform gpu``).

Tasks: toy regression (N = 1000, K = 10; fixed costs dominate) and the MLP of
mnist-lr-schedule (784-100-100-10, batch 100, N = 16, K = 10, generated data; the inner step
dominates). Each subprocess times ``--repeats`` estimates after compilation and reports the
median; the table gives the rate and the speed-up over D = 1.

    .venv/bin/python benchmarks/scaling.py [--devices 1,2,4] [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(task_name: str, num_devices: int, repeats: int, quick: bool) -> dict:
    import jax
    import numpy as np

    import pes
    from pes.tasks import MnistLRSchedule, ToyRegression
    from pes.tasks.mlp import synthetic_data

    if task_name == "toy":
        task, n, k = ToyRegression(), (8 if quick else 1000), (2 if quick else 10)
    else:
        if quick:
            data = synthetic_data(num_train=100, num_valid=20, num_test=20, dim=16)
            task, n, k = MnistLRSchedule(data=data, size="tiny"), 8, 2
        else:
            data = synthetic_data(num_train=1000, num_valid=200, num_test=100)
            task, n, k = MnistLRSchedule(data=data), 16, 10
    devices = jax.devices()
    if len(devices) < num_devices:
        raise SystemExit(f"only {len(devices)} devices visible, {num_devices} asked for")
    mesh = None
    if num_devices > 1:
        mesh = jax.make_mesh((num_devices,), ("particles",), devices=devices[:num_devices])
    est = pes.PES(task, num_particles=n, sigma=0.1, truncation_length=k, mesh=mesh)
    theta = jax.numpy.asarray(task.defaults().initial_theta())
    key = jax.random.PRNGKey(0)
    state = est.init(key, theta)
    jax.block_until_ready(est.estimate(state, theta, key))
    times = []
    for i in range(repeats):
        k_i = jax.random.fold_in(key, i)
        t0 = time.perf_counter()
        grad, state, _ = est.estimate(state, theta, k_i)
        jax.block_until_ready((grad, state))
        times.append(time.perf_counter() - t0)
    label = ("toy regression" if task_name == "toy"
             else "MLP " + "-".join(map(str, task.layer_sizes)))
    return {"task": label, "rate": n * k / float(np.median(times)), "n": n, "k": k,
            "platform": devices[0].platform}


def run_child(task_name: str, num_devices: int, repeats: int, quick: bool,
              platform: str) -> dict:
    env = dict(os.environ)
    if platform == "cpu":
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}"
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task_name,
           "--num-devices", str(num_devices), "--repeats", str(repeats)]
    cmd += ["--quick"] if quick else []
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"D={num_devices} {task_name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--tasks", default="toy,mlp")
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--num-devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.num_devices, args.repeats, args.quick)))
        return
    counts = [int(d) for d in args.devices.split(",")]
    repeats = 2 if args.quick else args.repeats
    tasks = args.tasks.split(",")
    if args.quick:
        counts, tasks = counts[:2], tasks[:1]
    print(f"{os.cpu_count()} CPU cores visible; {args.platform} devices; medians of {repeats} "
          "estimates\n")
    print("| task | N | K | devices | particle-steps/s | speed-up over 1 device |")
    print("|---|---|---|---|---|---|")
    for task_name in tasks:
        base = None
        for d in counts:
            r = run_child(task_name, d, repeats, args.quick, args.platform)
            base = base or r["rate"]
            print(f"| {r['task']} | {r['n']} | {r['k']} | {d} | {r['rate']:,.0f} | "
                  f"{r['rate'] / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
