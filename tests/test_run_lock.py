"""One run per run directory: a second `pes run` or `--resume` on a directory in use is refused
with one line naming the holder; a lock left by a dead process is taken over with a warning.
The holders are real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pes.cli import app
from pes.runs.lock import LOCK_FILE, RunLock, RunLocked, StaleLockWarning

RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
RUN = ["run", "toy-regression", "-e", "pes", "--num-particles", "4", "--no-progress"]
HOLD = (
    "import sys, time\n"
    "from pes.runs.lock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


@pytest.fixture
def holder(tmp_path):
    """A real process holding the lock of tmp_path/run (killed with SIGKILL at the end)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    yield out, proc
    proc.kill()
    proc.wait()


def test_second_run_is_refused_naming_the_holder(holder):
    out, proc = holder
    record = json.loads((out / LOCK_FILE).read_text())
    assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
    for args in ([*RUN, "--num-steps", "2", "--out", out],
                 [*RUN, "--num-steps", "2", "--out", out, "--overwrite"],
                 ["run", "--resume", out]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert f"pid {proc.pid} on host {socket.gethostname()}" in lines[0], lines[0]
        assert "in use by another pes run" in lines[0]
    # The holder's directory is untouched: only its lock is there, still its own.
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert json.loads((out / LOCK_FILE).read_text()) == record


def test_stale_lock_of_a_dead_process_is_taken_over(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_FILE).exists()  # SIGKILL left it behind
    with pytest.warns(StaleLockWarning, match=f"pid {proc.pid} .*no longer running"):
        lock = RunLock(out).acquire()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(out).acquire()  # held, even by this very process through another handle
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_run_takes_over_a_stale_lock_with_a_one_line_warning(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli(*RUN, "--num-steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "stale lock" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning: took over the stale lock of "
                                                       f"pid {proc.pid}"), result.output
    assert not (out / LOCK_FILE).exists()


def test_lock_of_another_host_is_not_guessed_at(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunLocked, match=f"another host.*delete {out / LOCK_FILE}"):
        RunLock(out).acquire()


@pytest.mark.slow
def test_real_runs_one_refused_the_other_untouched(tmp_path):
    """A real `pes run` holds its directory; a second `pes run --resume` process is refused and
    the first finishes as if alone; after it the directory is free again."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "pes", *RUN, "--num-steps", "400", "--eval-every", "50",
         "--checkpoint-every", "50", "--out", str(out)], env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = subprocess.run([sys.executable, "-m", "pes", "run", "--resume", str(out)],
                            env=env(), capture_output=True, text=True, timeout=120)
    out_first, err_first = first.communicate(timeout=300)
    if first.returncode == 0 and "in use" not in second.stderr:
        pytest.skip("the first run finished before the second started (a very fast machine)")
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().count("\n") == 0, second.stderr
    assert f"pid {first.pid} on host" in second.stderr
    assert first.returncode == 0, err_first
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert not (out / LOCK_FILE).exists()
    again = cli("run", "--resume", out, "--num-steps", "401")
    assert again.exit_code == 0, again.output
