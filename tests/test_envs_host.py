"""The guide's host-simulator example (examples/host_simulator.py) runs and learns."""

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_host_simulator_example_lowers_the_loss(capsys):
    path = Path(__file__).parent.parent / "examples" / "host_simulator.py"
    spec = importlib.util.spec_from_file_location("host_simulator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(steps=30)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = float(line.split()[2]), float(line.split()[4].rstrip(";"))
    assert before > 0.15 and after < 0.6 * before, line
