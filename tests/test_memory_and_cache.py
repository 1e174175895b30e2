"""A run that cannot fit is refused up front with what it needs and what the machine has; an
out-of-memory error during a run is one line with the same advice. The compile cache's folder
and switches."""

from pathlib import Path

import jax
import pytest
from typer.testing import CliRunner

import pes.runs.run as run_module
from pes.cli import app
from pes.runs import compile_cache, memory

RUNNER = CliRunner()


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def test_a_run_that_cannot_fit_is_refused_up_front(tmp_path):
    out = tmp_path / "run"
    result = cli("run", "toy-regression", "-e", "pes", "--num-particles", "2000000000",
                 "--num-steps", "1", "--out", out, "--no-progress")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "needs at least" in lines[0] and "GiB" in lines[0] and "lower --num-particles" in \
        lines[0] and ("available" in lines[0] or "free on" in lines[0]), lines[0]
    assert not out.exists()  # nothing written


def test_estimate_scales_with_the_particles():
    from pes.runs.config import RunConfig, build_setup

    def need(n):
        s = build_setup(RunConfig(task="toy-regression", estimator="pes", num_particles=n))
        return memory.estimate(s.estimator, s.optimizer, s.theta0)

    small, big = need(1000), need(100000)
    assert 90 < big / small < 110


def test_out_of_memory_during_a_run_is_one_line(tmp_path, monkeypatch):
    class FakeXlaError(RuntimeError):
        pass

    def train(*args, **kwargs):
        raise FakeXlaError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                           "41875931136 bytes.\nBufferAssignment OOM Debugging.\n...")

    monkeypatch.setattr(run_module, "train", train)
    result = cli("run", "toy-regression", "-e", "pes", "--num-steps", "1", "--out",
                 tmp_path / "run", "--no-progress")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate " \
        "41875931136 bytes.)" in errors[0] and "lower --num-particles" in errors[0]


def test_compile_cache_folder_and_switches(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "pes" / "jax"
    monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "explicit"))
    assert compile_cache.default_dir() == tmp_path / "explicit"
    previous = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv(compile_cache.ENV_OFF, "1")
        assert compile_cache.enable() is None
        monkeypatch.delenv(compile_cache.ENV_OFF)
        assert compile_cache.enable() == tmp_path / "explicit"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "explicit")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        compile_cache.disable()
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


@pytest.mark.slow
def test_the_cli_fills_the_cache_and_no_compile_cache_does_not(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PES_COMPILE_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("PES_NO_COMPILE_CACHE", None)
    base = [sys.executable, "-m", "pes", "run", "toy-regression", "-e", "pes", "--num-steps",
            "1", "--no-progress"]
    off = subprocess.run([*base, "--out", str(tmp_path / "a"), "--no-compile-cache"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert off.returncode == 0, off.stderr
    assert not any((tmp_path / "cache").glob("*"))
    on = subprocess.run([*base, "--out", str(tmp_path / "b")], env=env, capture_output=True,
                        text=True, timeout=300)
    assert on.returncode == 0, on.stderr
    assert len(list((tmp_path / "cache").glob("*"))) >= 5
