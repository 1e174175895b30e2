"""Start-up of `pes run`: time to its first outer step, without and with the compile cache.

    python benchmarks/startup.py [--repeats 2] [--task toy-regression] [--estimator pes]
                                 [--root CHECKOUT]

Each measurement is a fresh `python -m pes run TASK -e EST --num-steps 1` process; the time is
from starting it to the moment its metrics.jsonl holds the line of outer step 1 (polled every
millisecond), the time from the run's own start (after the imports; timing.jsonl) to step 1,
and the process's whole wall time and CPU time (user + system, all threads: what other
sessions' load moves least). "cold": an empty cache folder
($PES_COMPILE_CACHE_DIR), so the run compiles everything and fills the cache; "warm": the same
command again, loading the compiled programs; "off": PES_NO_COMPILE_CACHE=1. The runs
alternate cold/warm/off per repeat; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_step_time(args: list[str], env: dict, out: Path, cwd: str = str(ROOT)
                    ) -> tuple[float, float, float, float]:
    """(seconds to the metrics line of step 1, seconds to exit, seconds from the run's start
    to step 1 as timing.jsonl records it, CPU seconds of the whole process) of one `pes run`
    process."""
    metrics = out / "metrics.jsonl"
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pes", *args, "--out", str(out),
                             "--no-progress"], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file():
            lines = metrics.read_text().splitlines()
            if any(json.loads(x).get("step") == 1 for x in lines if x.endswith("}")):
                first = time.perf_counter() - start
        time.sleep(0.001)
    total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"pes run failed: {proc.stderr.read()}")
    timing = [json.loads(x) for x in (out / "timing.jsonl").read_text().splitlines()]
    in_run = next(t["wall_time_s"] for t in timing if t["step"] == 1)
    return (first if first is not None else total), total, in_run, cpu_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--task", default="toy-regression")
    parser.add_argument("--estimator", default="pes")
    parser.add_argument("--root", default=str(ROOT),
                        help="the checkout whose pes is run (e.g. another branch's worktree)")
    a = parser.parse_args()
    args = ["run", a.task, "-e", a.estimator, "--num-steps", "1"]
    base = dict(os.environ,
                PYTHONPATH=f"{a.root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    base.pop("PES_NO_COMPILE_CACHE", None)
    results: dict[str, list[tuple[float, ...]]] = {"cold": [], "warm": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            cache = Path(tmp) / f"cache{r}"
            env = dict(base, PES_COMPILE_CACHE_DIR=str(cache))
            results["cold"].append(first_step_time(args, env, Path(tmp) / f"cold{r}", a.root))
            results["warm"].append(first_step_time(args, env, Path(tmp) / f"warm{r}", a.root))
            results["off"].append(first_step_time(args, dict(env, PES_NO_COMPILE_CACHE="1"),
                                                  Path(tmp) / f"off{r}", a.root))
            size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            print(f"repeat {r}: cache {size / 1e6:.1f} MB, "
                  + ", ".join(f"{k} {v[-1][0]:.2f}/{v[-1][1]:.2f}/{v[-1][2]:.2f} s"
                              for k, v in results.items()))
    print(f"\n`pes {' '.join(args)}`: seconds (medians of {a.repeats})")
    print("| cache | process start to first outer step | run start to first outer step | "
          "process exit | CPU s of the process |\n|---|---|---|---|---|")
    med = {k: [statistics.median(r[i] for r in v) for i in range(4)] for k, v in results.items()}
    for name, (first, total, in_run, cpu_s) in med.items():
        print(f"| {name} | {first:.2f} | {in_run:.2f} | {total:.2f} | {cpu_s:.2f} |")
    print(f"warm / cold: {med['warm'][0] / med['cold'][0]:.2f} from the process start, "
          f"{med['warm'][2] / med['cold'][2]:.2f} from the run start")


if __name__ == "__main__":
    main()
