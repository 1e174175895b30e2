"""Runs that survive: checkpoints, exact resume after SIGKILL (also in the middle of a checkpoint
write), SIGINT/SIGTERM, non-finite losses, and byte-identical metrics for the same seed.

The killed runs are real `pes run` processes (tests/slow_pes.py: `pes` with a pause after each
outer step, and optionally inside each checkpoint write); the reference and the resumed runs
are in-process. A resumed run's metrics.jsonl (theta at every step included) must equal the
uninterrupted run's byte for byte.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pes.runs.run as run_module
from pes.cli import app
from pes.runs import read_metrics
from pes.runs.checkpoint import TMP_SUFFIX

RUNNER = CliRunner()
HELPER = Path(__file__).with_name("slow_pes.py")
# 40 outer steps of PES on the toy regression, checkpointed every 5.
RUN = ["run", "toy-regression", "-e", "pes", "--num-particles", "4", "--num-steps", "40",
       "--eval-every", "5", "--checkpoint-every", "5", "--no-progress"]


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def complete_checkpoints(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []


def partial_checkpoints(out: Path) -> list[str]:
    folder = out / "checkpoints"
    return [p.name for p in folder.iterdir() if TMP_SUFFIX in p.name] if folder.is_dir() else []


def start_slow_run(out: Path, step_delay: float = 0.05, commit_delay: float = 0.0,
                   args=RUN) -> subprocess.Popen:
    env = dict(os.environ, SLOW_PES_STEP_DELAY=str(step_delay),
               SLOW_PES_COMMIT_DELAY=str(commit_delay))
    return subprocess.Popen([sys.executable, str(HELPER), *args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited moment: "
                        f"{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = cli(*RUN, "--out", out)
    assert result.exit_code == 0, result.output
    assert complete_checkpoints(out) == [35, 40]  # the newest 2 are kept (--keep-checkpoints)
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = out / "metrics.jsonl", reference / "metrics.jsonl"
    if ours.read_bytes() != theirs.read_bytes():
        a, b = read_metrics(out), read_metrics(reference)
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        pytest.fail(f"metrics.jsonl differs: {len(a)} vs {len(b)} lines, first difference "
                    f"at line {diff}: {a[diff] if diff is not None else ''}")
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(41))  # no step missing or repeated
    timing = [json.loads(x) for x in (out / "timing.jsonl").read_text().splitlines()]
    assert [t["step"] for t in timing] == steps
    s = summary(out)
    assert s["status"] == "completed" and s["outer_steps"] == 40
    assert s["final_theta"] == summary(reference)["final_theta"]


def test_sigkill_at_a_random_point_then_resume(reference, tmp_path):
    seed = random.SystemRandom().randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.0)
    out = tmp_path / "run"
    proc = start_slow_run(out)
    wait_until(lambda: complete_checkpoints(out), proc)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed})"
    assert not (out / "summary.json").exists()
    killed_at = [r["step"] for r in read_metrics(out)][-1]
    result = cli("run", "--resume", out, "--no-progress")
    assert result.exit_code == 0, f"seed {seed}: {result.output}"
    assert summary(out)["resumed_from_step"] <= killed_at
    assert_same_run(out, reference)


def test_sigkill_during_a_checkpoint_write_then_resume(reference, tmp_path):
    out = tmp_path / "run"
    # Every write waits 0.5 s with its files in orbax's temporary folder before committing.
    proc = start_slow_run(out, commit_delay=0.5)
    wait_until(lambda: complete_checkpoints(out) and partial_checkpoints(out), proc)
    proc.kill()
    proc.communicate()
    assert partial_checkpoints(out), "killed too late: the write had finished"
    done = complete_checkpoints(out)
    result = cli("run", "--resume", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert summary(out)["resumed_from_step"] == done[-1]  # not the write cut short
    assert not partial_checkpoints(out)
    assert_same_run(out, reference)


def test_sigterm_checkpoints_and_exits_143(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_slow_run(out)
    wait_until(lambda: complete_checkpoints(out), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    s = summary(out)
    last = read_metrics(out)[-1]["step"]
    assert s["status"] == "interrupted" and s["outer_steps"] == last < 40
    assert s["checkpoint_step"] == last == complete_checkpoints(out)[-1]
    assert "SIGTERM: stopping after this outer step with a checkpoint" in stderr
    assert f"Error: interrupted by SIGTERM after outer step {last}; checkpointed at outer " \
           f"step {last}; continue with: pes run --resume {out}" in stderr
    assert f"INTERRUPTED after step {last}" in stdout
    result = cli("run", "--resume", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert_same_run(out, reference)


@pytest.fixture
def foreground_sigint():
    """SIGINT's handler as Python installs it in a foreground process (a shell starts
    background jobs with SIGINT ignored, and Python then leaves it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("times", [1, 2])
def test_sigint_once_stops_after_the_step_twice_at_once(reference, tmp_path, monkeypatch,
                                                         foreground_sigint, times):
    """In process: SIGINT arrives while outer step 7 is recorded. Once: the call under way
    (auto-sized; calls end at the evaluations and checkpoints of every 5th step, so it holds
    6-10 at most) is finished and its last step checkpointed. Twice: the run stops at once,
    its last checkpoint being step 5's."""
    record_step = run_module._Recorder.callback

    def callback(self, record, theta):
        if record.step == 7:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return record_step(self, record, theta)

    monkeypatch.setattr(run_module._Recorder, "callback", callback)
    out = tmp_path / "run"
    result = cli(*RUN, "--out", out)
    assert result.exit_code == 130, result.output
    s = summary(out)
    assert s["status"] == "interrupted"
    if times == 1:
        assert 7 <= s["outer_steps"] == s["checkpoint_step"] <= 10
        assert complete_checkpoints(out)[-1] == s["checkpoint_step"]
    else:
        assert (s["outer_steps"], s["checkpoint_step"]) == (6, 5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.undo()
    result = cli("run", "--resume", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert summary(out)["resumed_from_step"] == s["checkpoint_step"]
    assert_same_run(out, reference)


def test_resume_can_extend_a_finished_run(reference, tmp_path):
    short = tmp_path / "short"
    args = [a if a != "40" else "25" for a in RUN]
    assert cli(*args, "--out", short).exit_code == 0
    assert complete_checkpoints(short)[-1] == 25
    result = cli("run", "--resume", short, "--num-steps", 40, "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((short / "config.json").read_text())["num_steps"] == 40
    assert_same_run(short, reference)


def test_default_checkpoints_by_time(tmp_path, monkeypatch):
    args = ["run", "influence-balancing", "-e", "tbptt", "--num-steps", 6, "--no-progress"]
    assert cli(*args, "--out", tmp_path / "a").exit_code == 0
    assert complete_checkpoints(tmp_path / "a") == [6]  # quicker than 5 minutes: the last only
    monkeypatch.setattr(run_module, "CHECKPOINT_INTERVAL_S", 0.0)  # at every call end:
    assert cli(*args, "--steps-per-call", 1, "--out", tmp_path / "b").exit_code == 0
    assert complete_checkpoints(tmp_path / "b") == [5, 6]  # every step; 2 kept (the default)


def test_same_seed_gives_byte_identical_metrics(reference, tmp_path):
    again = tmp_path / "again"
    assert cli(*RUN, "--out", again).exit_code == 0
    assert (again / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    other = tmp_path / "other"
    assert cli(*RUN, "--seed", 1, "--num-steps", 2, "--out", other).exit_code == 0
    assert read_metrics(other)[1]["loss"] != read_metrics(reference)[1]["loss"]


# ------------------------------------------------------------------------ non-finite losses

# TBPTT with K=1 sees the wrong sign on influence balancing: with lr 10, theta grows 61-fold
# a step until the loss overflows at outer step 23 (particle 0, inner step 22).
DIVERGING = ["run", "influence-balancing", "-e", "tbptt", "--lr", "10", "--theta0", "1",
             "--num-steps", "30", "--checkpoint-every", "100", "--no-progress"]


def test_raise_checkpoints_the_last_good_state(tmp_path):
    out = tmp_path / "run"
    result = cli(*DIVERGING, "--out", out)
    assert result.exit_code == 1, result.output
    message = ("non-finite loss at outer step 23: particle 0 at inner step 22 of its episode "
               "produced a non-finite loss")
    assert message in result.output and "Traceback" not in result.output
    assert "checkpointed at outer step 22; continue" in result.output
    s = summary(out)
    assert s["status"] == "failed" and message in s["error"]
    assert s["outer_steps"] == s["checkpoint_step"] == 22
    assert complete_checkpoints(out) == [22]  # checkpoint_every=100: only the failure's
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(23))
    assert all(r["theta"] is not None for r in records)  # theta never took a NaN or inf
    before = (out / "metrics.jsonl").read_bytes()

    # Resuming repeats the failure exactly, and adds no line.
    again = cli("run", "--resume", out, "--no-progress")
    assert again.exit_code == 1 and message in again.output
    assert (out / "metrics.jsonl").read_bytes() == before


# theta0 = 43.5 is near where exp(theta) overflows the inner SGD: with sigma 1, some of the
# 4 antithetic pairs overflow in the first steps, until Adam moves theta down.
OVERFLOWING = ["run", "toy-regression", "-e", "pes", "--num-particles", "8", "--sigma", "1",
               "--lr", "1", "--theta0=43.5,43.5", "--num-steps", "12", "--eval-every", "4",
               "--no-progress"]


def test_drop_counts_the_particles_left_out_and_resume_may_switch_to_it(tmp_path):
    dropped = tmp_path / "drop"
    result = cli(*OVERFLOWING, "--nonfinite", "drop", "--out", dropped)
    assert result.exit_code == 0, result.output
    records = read_metrics(dropped)
    counts = [r.get("nonfinite", 0) for r in records[1:]]
    assert counts[0] > 0 and 0 < sum(counts) < 4 * 12
    assert summary(dropped)["nonfinite_dropped"] == sum(counts)
    assert all(r["loss"] is not None and r["theta"] is not None for r in records[1:])

    # 'raise' stops at the first step; resuming with --nonfinite drop continues from the
    # checkpoint of step 0 exactly as the 'drop' run went.
    raised = tmp_path / "raise"
    result = cli(*OVERFLOWING, "--out", raised)
    assert result.exit_code == 1 and "non-finite loss at outer step 1: particle" in \
        result.output
    assert complete_checkpoints(raised) == [0]
    result = cli("run", "--resume", raised, "--nonfinite", "drop", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (raised / "metrics.jsonl").read_bytes() == (dropped / "metrics.jsonl").read_bytes()
    assert json.loads((raised / "config.json").read_text())["nonfinite"] == "drop"


# ------------------------------------------------------------------------- steps_per_call


def test_steps_per_call_gives_the_same_run_with_checkpoints_at_their_steps(reference, tmp_path):
    out = tmp_path / "chunked"
    # Chunks of 4 that also end at every evaluation (each 5th step) and checkpoint (each 6th):
    # 1-4, 5, 6, 7-10, 11-12, ...
    result = cli(*RUN, "--steps-per-call", 4, "--checkpoint-every", 6, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["steps_per_call"] == 4
    ours, theirs = read_metrics(out), read_metrics(reference)
    assert [(r["step"], r["inner_steps"]) for r in ours] == [
        (r["step"], r["inner_steps"]) for r in theirs]
    assert ours == theirs  # one compiled program runs every chunk size: bit for bit
    # At each multiple of 6 (..., 30, 36) and the last; the newest two are kept.
    assert complete_checkpoints(out) == [36, 40]


def test_steps_per_call_raise_stops_at_the_bad_step_inside_a_chunk(tmp_path):
    out = tmp_path / "run"
    result = cli(*DIVERGING, "--steps-per-call", 8, "--out", out)  # chunk 17-24 holds step 23
    assert result.exit_code == 1, result.output
    assert ("non-finite loss at outer step 23: particle 0 at inner step 22 of its episode"
            in result.output)
    assert "checkpointed at outer step 22; continue" in result.output
    assert [r["step"] for r in read_metrics(out)] == list(range(23))
    assert complete_checkpoints(out) == [22]
