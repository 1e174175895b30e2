"""Smoke test: every benchmark script's --quick mode runs and prints its table.

The numbers of a --quick run mean nothing (tiny sizes, one or two repeats); timings are never
asserted. The measurements live in benchmarks/README.md.
"""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Each quick mode compiles its own programs (20-130 s under load): CI runs them, make test not.
@pytest.mark.slow
@pytest.mark.parametrize("name, rows", [
    ("overhead", ["| influence balancing |", "| toy regression |", "| MLP |", "| unrolled |"]),
    ("peers", ["| pes.train |", "| pes.train M=50 |", "| pes.train default |", "| pes loop |",
               "| pes scan |", "| raw unroll |", "| numpy |"]),
    ("chunking", ["| toy regression (40 steps) | none | default |",
                  "| toy regression (40 steps) | every 20 | 50 |"]),
    ("memory", ["| 10 |"]),
    ("scaling", ["| toy regression | 8 | 2 | 1 |", "| toy regression | 8 | 2 | 2 |"]),
    ("gym_throughput", ["InvertedPendulum-v5, 2 antithetic pairs", "PES / gymnasium sync:"]),
    ("mujoco_suite_throughput", ["| HalfCheetah-v5 | 4 |"]),
])
def test_quick_mode_prints_its_table(name, rows, capsys):
    load(name).main(["--quick"])
    out = capsys.readouterr().out
    for row in rows:
        assert row in out, f"{name} --quick printed no row {row!r}:\n{out}"
    assert "nan" not in out.lower()
