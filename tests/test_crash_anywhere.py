"""Crash anywhere: a tiny `pes run` SIGKILLed at >= 20 random moments (at start-up, while steps
run, right after a metrics line is appended, while a checkpoint is being written), each time
continued by the next process with --resume. After every kill, a copy of the directory is
resumed to the end in-process and must give the uninterrupted run's metrics.jsonl byte for
byte (the theta of every step is in it) and its final theta.

The killed processes are tests/slow_pes.py (`pes` with a short pause after each outer step and
inside each checkpoint commit, so that a kill lands inside them often). The random moments come
from a seed printed on failure (PES_CRASH_SEED reproduces a failing sequence).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pes.cli import app
from pes.runs import manifest
from pes.runs.checkpoint import TMP_SUFFIX

RUNNER = CliRunner()
HELPER = Path(__file__).with_name("slow_pes.py")
ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 300
RUN = ["run", "toy-regression", "-e", "pes", "--num-particles", "4", "--num-steps",
       str(NUM_STEPS), "--eval-every", "3", "--checkpoint-every", "2", "--no-progress"]
KILLS = 20
MOMENTS = ("start-up", "running", "metrics-append", "checkpoint-write")


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def start(out: Path, resume: bool) -> subprocess.Popen:
    args = ["run", "--resume", str(out)] if resume else [*RUN, "--out", str(out), "--overwrite"]
    env = dict(os.environ, SLOW_PES_STEP_DELAY="0.03", SLOW_PES_COMMIT_DELAY="0.05",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, str(HELPER), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    """Poll every 0.5 ms until ``condition()``; False if the process ended or time ran out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def kill_at(moment: str, proc: subprocess.Popen, out: Path, rng: random.Random) -> None:
    metrics = out / "metrics.jsonl"
    ckpts = out / "checkpoints"
    if moment == "start-up":
        time.sleep(rng.uniform(0.0, 3.0))
    elif moment == "running":
        before = size(metrics)
        wait_for(lambda: size(metrics) > before, proc)
        time.sleep(rng.uniform(0.0, 0.4))
    elif moment == "metrics-append":
        before = size(metrics)
        wait_for(lambda: size(metrics) > before, proc)
        for _ in range(rng.randrange(4)):  # the next few appends, killed right after one
            now = size(metrics)
            wait_for(lambda now=now: size(metrics) > now, proc)
    else:  # a checkpoint folder still being written (orbax's temporary name)
        wait_for(lambda: ckpts.is_dir() and any(TMP_SUFFIX in p.name for p in ckpts.iterdir()),
                 proc)
        time.sleep(rng.uniform(0.0, 0.04))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def check_prefix(out: Path, reference: list[bytes]) -> int:
    """The complete metrics lines so far are the reference's first ones; every checkpoint with
    a manifest verifies. Returns the number of complete lines."""
    data = (out / "metrics.jsonl").read_bytes() if (out / "metrics.jsonl").exists() else b""
    lines = data.split(b"\n")[:-1]  # the last piece is a cut line or b""
    assert lines == reference[:len(lines)]
    folder = out / "checkpoints"
    for ckpt in (folder.iterdir() if folder.is_dir() else []):
        if ckpt.name.isdigit() and manifest.has_manifest(ckpt):
            manifest.verify(ckpt)
    return len(lines)


def resumable(out: Path) -> bool:
    folder = out / "checkpoints"
    return (out / "config.json").is_file() and folder.is_dir() and any(
        p.name.isdigit() for p in folder.iterdir())


@pytest.mark.slow
def test_sigkill_at_20_random_moments_then_resume(tmp_path):
    seed = int(os.environ.get("PES_CRASH_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    reference_dir = tmp_path / "reference"
    result = cli(*RUN, "--checkpoint-every", "1000", "--out", reference_dir)
    assert result.exit_code == 0, result.output
    reference = (reference_dir / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
    final_theta = json.loads((reference_dir / "summary.json").read_text())["final_theta"]

    out, check = tmp_path / "run", tmp_path / "check"
    moments: list[str] = []
    while len(moments) < KILLS:
        moment = MOMENTS[len(moments) % len(MOMENTS)] if len(moments) < 8 else rng.choice(MOMENTS)
        proc = start(out, resume=resumable(out))
        kill_at(moment, proc, out, rng)
        assert proc.returncode == -signal.SIGKILL, (
            f"seed {seed}: the run ended by itself ({proc.returncode}) before kill "
            f"{len(moments) + 1}: {proc.stderr.read()[-1500:]}")
        moments.append(moment)
        check_prefix(out, reference)
        if not resumable(out):
            continue  # killed before its first checkpoint: the next process starts afresh
        # Resume a copy to the end, in-process, and compare with the uninterrupted run.
        shutil.rmtree(check, ignore_errors=True)
        shutil.copytree(out, check)
        done = cli("run", "--resume", check, "--checkpoint-every", "1000")
        assert done.exit_code == 0, f"seed {seed}, kill {len(moments)} ({moment}): {done.output}"
        got = (check / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
        assert got == reference, f"seed {seed}, kill {len(moments)} ({moment})"
        assert json.loads((check / "summary.json").read_text())["final_theta"] == final_theta
    assert len(moments) >= KILLS and set(moments) == set(MOMENTS)
    print(f"seed {seed}: {len(moments)} kills: " +
          ", ".join(f"{m} x{moments.count(m)}" for m in MOMENTS))
