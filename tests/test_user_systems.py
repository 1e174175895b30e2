"""A user's System on the command line: pes run/compare/diagnose FILE.py:fn and
package.module:fn (pes.runs.user_task), and the one-line errors of a bad factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from device_runs import run_on_1_and_2_devices
from typer.testing import CliRunner

from pes.cli import app
from pes.runs import read_metrics

RUNNER = CliRunner()

PROBLEM = '''
import jax.numpy as jnp
import pes.runs


class Quadratic:
    """s <- s - (s - theta) / 2, loss |s - target|^2 (theta* = target)."""
    horizon = 8

    def init(self, key):
        return jnp.zeros(2)

    def step(self, s, theta, t, key):
        s = s - 0.5 * (s - theta)
        return s, jnp.sum((s - jnp.array([1.0, -1.0])) ** 2)


def make_system():
    return Quadratic(), jnp.array([-1.0, 1.0])


class TreeTheta(Quadratic):
    def step(self, s, theta, t, key):
        return super().step(s, theta["a"], t, key)


def with_defaults():
    return pes.runs.UserTask(TreeTheta(), {"a": jnp.zeros(2)},
                             defaults={"num_particles": 4, "K": 4, "lr": 0.1, "num_steps": 3})


def bare():
    return Quadratic()


def raises():
    raise ValueError("no data here")


def wrong():
    return 42


def bad_defaults():
    return Quadratic(), jnp.zeros(2), {"num_particles": "many"}
'''
FAST = ["--num-particles", "4", "--truncation-length", "4", "--no-progress"]


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


@pytest.fixture
def problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "problem.py").write_text(PROBLEM)
    return tmp_path / "problem.py"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_run_writes_metrics_plots_checkpoints_and_resumes_bit_for_bit(problem, tmp_path):
    spec = "problem.py:make_system"
    full, half = tmp_path / "full", tmp_path / "half"
    ran = cli("run", spec, "-e", "pes", *FAST, "--num-steps", "6", "--eval-every", "2",
              "--out", full)
    assert ran.exit_code == 0, ran.output
    assert {"config.json", "metrics.jsonl", "summary.json", "meta_objective.png",
            "theta.png"} <= {p.name for p in full.iterdir()}
    assert (full / "checkpoints").is_dir()
    config = json.loads((full / "config.json").read_text())
    assert config["task"] == f"{problem}:make_system"  # absolute: resumable from anywhere
    assert config["theta0"] == [-1.0, 1.0]
    evals = [r for r in read_metrics(full) if "meta_objective" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert evals[-1]["meta_objective"] < evals[0]["meta_objective"]  # it learns

    first = cli("run", spec, "-e", "pes", *FAST, "--num-steps", "3", "--eval-every", "2",
                "--checkpoint-every", "1", "--out", half)
    assert first.exit_code == 0, first.output
    again = cli("run", "--resume", half, "--num-steps", "6", "--no-progress")
    assert again.exit_code == 0, again.output
    assert summary(half)["resumed_from_step"] == 3
    assert summary(half)["final_theta"] == summary(full)["final_theta"]


@pytest.mark.slow
def test_factory_defaults_pytree_theta_and_module_spec(problem, tmp_path, monkeypatch):
    out = tmp_path / "d"
    ran = cli("run", "problem:with_defaults", "-e", "tes", "--no-progress", "--out", out)
    assert ran.exit_code == 0, ran.output
    config = json.loads((out / "config.json").read_text())
    assert (config["num_particles"], config["truncation_length"], config["lr"],
            config["num_steps"]) == (4, 4, 0.1, 3)
    assert config["task"] == "problem:with_defaults" and config["theta0"] == [0.0, 0.0]
    flagged = cli("run", "problem:with_defaults", "-e", "tes", "--no-progress", "--lr", "0.5",
                  "--out", tmp_path / "e")
    assert flagged.exit_code == 0, flagged.output
    assert json.loads((tmp_path / "e" / "config.json").read_text())["lr"] == 0.5


def test_theta0_from_the_command_line_when_the_factory_gives_none(problem, tmp_path):
    missing = cli("run", "problem.py:bare", "-e", "pes", *FAST, "--num-steps", "1",
                  "--out", tmp_path / "x")
    assert missing.exit_code == 2
    assert missing.output.count("\n") == 1 and "gives no theta0" in missing.output
    ran = cli("run", "problem.py:bare", "-e", "pes", *FAST, "--num-steps", "1",
              "--theta0=0.5,0.5", "--out", tmp_path / "y")
    assert ran.exit_code == 0, ran.output
    assert summary(tmp_path / "y")["initial_theta"] == [0.5, 0.5]


@pytest.mark.slow
def test_compare_over_two_estimators_and_two_seeds(problem, tmp_path):
    result = cli("compare", "problem.py:make_system", "--estimators", "pes,tes",
                 "--seeds", "0,1", "--num-steps", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "compare" / "problem-make_system"
    data = json.loads((out / "results.json").read_text())
    assert [a["label"] for a in data["arms"]] == ["pes", "tes"]
    assert all(a["completed"] == 2 for a in data["arms"])
    for label in ("pes", "tes"):
        assert {p.name for p in (out / label).iterdir()} == {"seed-0", "seed-1"}


@pytest.mark.slow
def test_diagnose(problem, tmp_path):
    result = cli("diagnose", "problem.py:make_system", "-e", "pes", "-k", "4",
                 "--num-particles", "4", "--replicates", "2", "--reference-samples", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "diagnose" / "problem-make_system" / "diagnose.json").is_file()


BAD_FILES = {
    "missing.py:f": "missing.py: no such file",
    "syntax.py:f": "syntax.py (line 1): SyntaxError",
    "boom.py:f": "boom.py (line 1): importing it raised RuntimeError: at import",
    "problem.py:nope": "problem.py: has no attribute 'nope'",
    "problem.py:raises": "problem.py: raises() raised ValueError: no data here (line",
    "problem.py:wrong": "problem.py: wrong() returned int, which is not a System",
    "no_such_module_xyz:f": "module 'no_such_module_xyz' cannot be imported",
    "problem.py:bad_defaults": "problem.py: bad_defaults(): default num_particles='many' "
    "must be an integer >= 1",
}


@pytest.mark.parametrize("spec", list(BAD_FILES))
def test_a_bad_factory_is_one_line_naming_the_file_exit_2(problem, tmp_path, spec):
    (tmp_path / "syntax.py").write_text("def f(:\n")
    (tmp_path / "boom.py").write_text('raise RuntimeError("at import")\n')
    result = cli("run", spec, "-e", "pes", "--no-progress")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1, result.output
    assert BAD_FILES[spec] in result.output, result.output


@pytest.mark.slow
def test_devices_2_equal_devices_1(problem, tmp_path):
    one, two = run_on_1_and_2_devices(
        ["problem.py:make_system", "-e", "pes", *FAST, "--num-steps", "2"], tmp_path)
    assert two["devices"] == 2
    assert one["final_theta"] == pytest.approx(two["final_theta"], rel=1e-5)
