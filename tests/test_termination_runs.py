"""Runs of systems whose episodes end early: pes compare on a gymnasium spec, sharding over two
devices and resume (checkpoints hold the waiting flags), through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from device_runs import run_on_1_and_2_devices
from typer.testing import CliRunner

from pes.cli import app
from pes.paper.compare import MARKER

RUNNER = CliRunner()

PROBLEM = '''
import jax
import jax.numpy as jnp


class Falls:
    """s <- s - (s - theta) / 2, loss |s - target|^2; each step ends the episode with
    probability 0.2 (drawn from the step's key)."""
    horizon = 8

    def init(self, key):
        return jnp.zeros(2)

    def step(self, s, theta, t, key):
        s = s - 0.5 * (s - theta)
        return s, jnp.sum((s - jnp.array([1.0, -1.0])) ** 2), jax.random.uniform(key) < 0.2


def make_system():
    return Falls(), jnp.array([-1.0, 1.0])
'''
FAST = ["--num-particles", "4", "--truncation-length", "4", "--no-progress"]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "problem.py").write_text(PROBLEM)
    return tmp_path / "problem.py"


@pytest.mark.slow
@pytest.mark.parametrize("reset", ["slot", "pair"])
def test_interrupted_and_resumed_equals_uninterrupted(problem, tmp_path, reset):
    full, half = tmp_path / "full", tmp_path / "half"
    args = ["run", "problem.py:make_system", "-e", "pes", *FAST, "--reset", reset,
            "--eval-every", "3"]
    ran = RUNNER.invoke(app, [*args, "--num-steps", "6", "--out", str(full)])
    assert ran.exit_code == 0, ran.output
    first = RUNNER.invoke(app, [*args, "--num-steps", "3", "--checkpoint-every", "1",
                                "--out", str(half)])
    assert first.exit_code == 0, first.output
    again = RUNNER.invoke(app, ["run", "--resume", str(half), "--num-steps", "6",
                                "--no-progress"])
    assert again.exit_code == 0, again.output
    one, two = summary(full), summary(half)
    assert two["resumed_from_step"] == 3
    assert two["final_theta"] == one["final_theta"]
    assert two["inner_steps"] == one["inner_steps"]
    config = json.loads((half / "config.json").read_text())
    assert config["reset"] == reset


@pytest.mark.slow
def test_devices_2_equal_devices_1(problem, tmp_path):
    one, two = run_on_1_and_2_devices(
        ["problem.py:make_system", "-e", "pes", *FAST, "--num-steps", "3"], tmp_path)
    assert two["devices"] == 2
    assert one["inner_steps"] == two["inner_steps"]  # the same waiting, the same resets
    assert one["final_theta"] == pytest.approx(two["final_theta"], rel=1e-5)


@pytest.mark.slow
def test_compare_a_gym_spec_over_two_estimators_and_two_seeds(tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)
    result = RUNNER.invoke(app, ["compare", "gym:InvertedPendulum-v5", "--estimators",
                                 "pes,full-es", "--seeds", "0,1", "--num-steps", "1",
                                 "--reset", "pair", "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "compare" / "gym-InvertedPendulum-v5"
    data = json.loads((out / "results.json").read_text())
    assert [a["label"] for a in data["arms"]] == ["pes", "full-es"]
    assert all(a["completed"] == 2 for a in data["arms"])
    for arm in ("pes", "full-es"):
        for seed in (0, 1):
            run = summary(out / arm / f"seed-{seed}")
            assert run["return"] is not None and run["env_steps"] > 0
    assert "--reset pair" in json.loads((out / MARKER).read_text())["command"]
