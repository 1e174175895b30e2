"""The tutorials' scripts (examples/tune_training_loop.py, examples/fit_ode.py) run at their
--tiny size and do what the tutorials say: every tuner runs within its inner-step budget and
PES improves on the starting point; the ODE Lorenz cross-check prints equal columns."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tune_training_loop_tiny(capsys):
    pytest.importorskip("equinox")
    rows = load("tune_training_loop").main(["--tiny"])
    out = capsys.readouterr().out
    start = float(out.split("start: val loss")[1].split()[0])
    assert {r[0] for r in rows} == {"PES", "truncated ES", "random search"}
    for line in out.splitlines():
        if "inner steps" in line and "budget" not in line:
            used = int(line.split("inner steps")[1].split()[0])
            assert 2000 <= used < 2000 + 40, line  # the budget, plus at most one call
    pes_val = next(r[2] for r in rows if r[0] == "PES")
    assert pes_val < start - 0.05, (start, pes_val)


@pytest.mark.slow
def test_fit_ode_tiny(capsys):
    pytest.importorskip("diffrax")
    rows = load("fit_ode").main(["--tiny"])
    out = capsys.readouterr().out
    start = float(out.split("start  meta-loss")[1].split()[0])
    assert [r[0] for r in rows] == ["PES", "truncated ES", "full ES"]
    assert rows[0][2] < 0.5 * start, (start, rows)
    lorenz = [line.split(":")[1].split() for line in out.splitlines() if "offset (log a" in line]
    assert len(lorenz) == 5
    for hand, ode in lorenz:
        assert abs(float(hand) - float(ode)) <= 1e-4 * max(1.0, abs(float(hand)))
