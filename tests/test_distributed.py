"""pes run --devices N and --distributed: the same run on 4 CPU devices, on two processes
(gloo collectives over localhost) and resumed on another process count as on one device."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_cli import cli, output

from pes.runs import ConfigError, RunConfig
from pes.runs.distributed import distributed_settings

RUN = ["run", "toy-regression", "-e", "pes", "--num-particles", "8", "-K", "10", "--no-progress"]
TIMEOUT_S = 300


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PES_", "SLURM_", "OMPI_", "PMI_"))}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _start(args: list[str], devices: int = 1, env: dict[str, str] | None = None
           ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pes", *args], env={**_env(devices),
                                                                       **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Wait for every process; on a timeout or a failure kill the rest (a process whose
    peer died would otherwise wait for it) and fail with everyone's output."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out, err))
            if proc.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        results.append((None, "", "timed out"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if len(results) < len(procs) or any(rc != 0 for rc, _, _ in results):
        text = "\n".join(f"--- process {i}: rc={rc}\n{out}\n{err[-3000:]}"
                         for i, (rc, out, err) in enumerate(results))
        raise AssertionError(f"a process failed:\n{text}")
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _distributed(args: list[str], num_processes: int, via_env: bool = False
                 ) -> list[subprocess.Popen]:
    """Processes 0..n-1 of one run, told where the coordinator is by flags or by the
    PES_* environment variables."""
    address = f"localhost:{_free_port()}"
    procs = []
    for i in range(num_processes):
        if via_env:
            env = {"PES_COORDINATOR_ADDRESS": address, "PES_NUM_PROCESSES": str(num_processes),
                   "PES_PROCESS_ID": str(i)}
            procs.append(_start([*args, "--distributed"], env=env))
        else:
            procs.append(_start([*args, "--distributed", "--coordinator-address", address,
                                 "--num-processes", str(num_processes), "--process-id",
                                 str(i)]))
    return procs


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got: list[dict], want: list[dict]) -> None:
    """Same steps; losses, evaluations and theta equal to float32 tolerance (the sum over
    particles is reduced in another order on other devices)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["inner_steps"] == w["inner_steps"], (g, w)
        for name in ("loss", "meta_objective"):
            if name in w:
                np.testing.assert_allclose(g[name], w[name], rtol=1e-5, err_msg=str(g["step"]))
        np.testing.assert_allclose(g["theta"], w["theta"], rtol=1e-5, atol=1e-6,
                                   err_msg=str(g["step"]))


def test_import_leaves_jax_uninitialised():
    # jax.distributed.initialize must come before JAX's first computation, and the CLI imports
    # pes before it parses --distributed.
    code = ("import pes.cli\nfrom jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized(), 'import pes started JAX'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT_S, env=_env(1))


@pytest.mark.slow
def test_devices_4_equal_devices_1(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    procs = [_start([*RUN, "--num-steps", "4", "--out", str(one), "--devices", "1"], 4),
             _start([*RUN, "--num-steps", "4", "--out", str(four), "--devices", "4"], 4)]
    _finish(procs)
    _assert_same_run(_metrics(four), _metrics(one))
    summary = json.loads((four / "summary.json").read_text())
    assert summary["devices"] == 4 and summary["processes"] == 1
    # 6 particles are 3 antithetic pairs: no even split over 4 devices.
    bad = subprocess.run([sys.executable, "-m", "pes", *RUN, "--num-particles", "6",
                          "--devices", "4", "--out", str(tmp_path / "bad")], env=_env(4),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert bad.returncode == 2, bad.stderr
    assert "devices=4 does not divide the 3 antithetic pairs" in bad.stderr
    assert "use num_particles=8, or devices=3" in bad.stderr


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    common = [*RUN, "--checkpoint-every", "2"]
    # One process runs 4 steps while two processes run the first 2 of the same run.
    procs = [_start([*common, "--num-steps", "4", "--out", str(single)])]
    procs += _distributed([*common, "--num-steps", "2", "--out", str(dist)], 2)
    results = _finish(procs)
    reference = _metrics(single)
    _assert_same_run(_metrics(dist), reference[:3])
    # Only process 0 writes: its summary line, the run's files.
    assert "2 outer steps" in results[1][1] and "outer steps" not in results[2][1]
    summary = json.loads((dist / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert summary["status"] == "completed"
    assert len((dist / "timing.jsonl").read_text().splitlines()) == 3

    # The two-process checkpoint continued by one process, and the one-process checkpoint of
    # step 2 continued by two processes: both end where the one-process run did.
    back = tmp_path / "back"
    shutil.copytree(single, back)
    shutil.rmtree(back / "checkpoints" / "4")
    procs = [_start(["run", "--resume", str(dist), "--num-steps", "4", "--no-progress"])]
    procs += _distributed(["run", "--resume", str(back), "--num-steps", "4", "--no-progress"],
                          2, via_env=True)
    _finish(procs)
    _assert_same_run(_metrics(dist), reference)
    _assert_same_run(_metrics(back), reference)
    for run_dir in (dist, back):
        final = json.loads((run_dir / "summary.json").read_text())
        np.testing.assert_allclose(final["final_theta"],
                                   json.loads((single / "summary.json").read_text())
                                   ["final_theta"], rtol=1e-5)
    assert json.loads((back / "summary.json").read_text())["processes"] == 2


def test_devices_beyond_those_jax_sees_is_a_config_error(tmp_path):
    result = cli(*RUN, "--devices", "64", "--out", tmp_path / "r")
    code, out = result.exit_code, output(result)
    assert code == 2
    assert "devices=64 must be in [1, " in out
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=64" in out
    with pytest.raises(ConfigError, match="devices=0"):
        RunConfig("toy-regression", "pes", devices=0)


def test_process_flags_need_distributed(tmp_path):
    result = cli(*RUN, "--process-id", "1", "--out", tmp_path / "r")
    code, out = result.exit_code, output(result)
    assert code == 2 and "--process-id applies only with --distributed" in out


def test_distributed_settings_from_flags_and_environment(monkeypatch):
    monkeypatch.setenv("PES_COORDINATOR_ADDRESS", "node001:1234")
    monkeypatch.setenv("PES_NUM_PROCESSES", "4")
    monkeypatch.setenv("PES_PROCESS_ID", "3")
    assert distributed_settings() == {"coordinator_address": "node001:1234",
                                      "num_processes": 4, "process_id": 3}
    # Flags take precedence over the environment.
    assert distributed_settings(process_id=0)["process_id"] == 0
    with pytest.raises(ConfigError, match="PES_PROCESS_ID=3 must be >= 0 and < num_processes=2"):
        distributed_settings(num_processes=2)
    monkeypatch.setenv("PES_NUM_PROCESSES", "four")
    with pytest.raises(ConfigError, match="PES_NUM_PROCESSES='four' must be an integer"):
        distributed_settings()
    with pytest.raises(ConfigError, match="coordinator_address='node001' must be HOST:PORT"):
        distributed_settings("node001", 2, 0)
    for name in ("PES_COORDINATOR_ADDRESS", "PES_NUM_PROCESSES", "PES_PROCESS_ID"):
        monkeypatch.delenv(name)
    assert distributed_settings() == {"coordinator_address": None, "num_processes": None,
                                      "process_id": None}
