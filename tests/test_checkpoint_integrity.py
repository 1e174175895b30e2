"""Checkpoints that prove themselves: checksums written last, verified on restore; a damaged or
partial newest checkpoint makes --resume fall back to the newest intact one (one warning line,
no library log noise); none intact is one line and exit 2; a full disk during a write leaves
the previous checkpoint intact and stops the run with one line; --keep-checkpoints prunes."""

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pes.runs.checkpoint as checkpoint_module
from pes.cli import app
from pes.runs import manifest

RUNNER = CliRunner()
RUN = ["run", "toy-regression", "-e", "pes", "--num-particles", "4", "--eval-every", "2",
       "--checkpoint-every", "2", "--no-progress"]


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def steps(out: Path, folder: str = "checkpoints") -> list[int]:
    return sorted(int(p.name) for p in (out / folder).iterdir() if p.name.isdigit())


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step run keeping 3 checkpoints (2, 4, 6) and the uninterrupted 8-step reference."""
    root = tmp_path_factory.mktemp("integrity")
    six, eight = root / "six", root / "eight"
    for out, n, keep in ((six, 6, 3), (eight, 8, 2)):
        result = cli(*RUN, "--num-steps", n, "--keep-checkpoints", keep, "--out", out)
        assert result.exit_code == 0, result.output
    return six, eight


def copy_run(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(src, out)
    return out


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def array_file(folder: Path) -> Path:
    """The largest array-data file orbax wrote (ocdbt data chunks)."""
    files = [p for p in (folder / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    return max(files, key=lambda p: p.stat().st_size)


DAMAGE = {
    "metadata": lambda f: (f / "meta" / "metadata").write_text('{"step": 6, "trunc'),
    "array-bit-flip": lambda f: flip_bit(array_file(f)),
    "truncated-array": lambda f: array_file(f).write_bytes(array_file(f).read_bytes()[:40]),
    "missing-file": lambda f: (f / "state" / "_METADATA").unlink(),
    "no-manifest-and-damaged": lambda f: ((f / manifest.MANIFEST).unlink(),
                                          (f / "state" / "_METADATA").write_text("{")),
}


def test_every_checkpoint_has_a_manifest_of_its_files(runs):
    six, _ = runs
    assert steps(six) == [2, 4, 6]
    for step in steps(six):
        folder = six / "checkpoints" / str(step)
        listed = json.loads((folder / manifest.MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != manifest.MANIFEST}
        assert set(listed) == on_disk and any("/d/" in name for name in listed)
        manifest.verify(folder)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(runs, tmp_path, damage,
                                                                       capfd):
    six, eight = runs
    out = copy_run(six, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "6")
    capfd.readouterr()
    result = cli("run", "--resume", out, "--num-steps", "8")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1, result.output
    assert "resuming from step 4, the newest intact checkpoint; skipped step 6" in warning[0]
    assert summary(out)["resumed_from_step"] == 4
    # No library log noise (absl/orbax ERROR lines, damaged bytes) on either stream.
    noise = capfd.readouterr()
    for text in (result.output, noise.out, noise.err):
        assert "ERROR" not in text and "absl" not in text and "Traceback" not in text, text
    # The damaged checkpoint was moved aside, and the run is the uninterrupted one.
    assert steps(out, "checkpoints.damaged") == [] and len(list(
        (out / "checkpoints.damaged").iterdir())) == 1
    assert (out / "metrics.jsonl").read_bytes() == (eight / "metrics.jsonl").read_bytes()
    assert summary(out)["final_theta"] == summary(eight)["final_theta"]
    assert steps(out) == [4, 6, 8]  # the run keeps its --keep-checkpoints 3


def test_no_intact_checkpoint_is_one_line_and_exit_2(runs, tmp_path):
    six, _ = runs
    out = copy_run(six, tmp_path)
    for step in (2, 4, 6):
        flip_bit(array_file(out / "checkpoints" / str(step)))
    result = cli("run", "--resume", out, "--num-steps", "8")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --resume ") and \
        "no intact checkpoint" in lines[0], result.output


def test_keep_checkpoints_prunes_older_ones(runs, tmp_path):
    six, eight = runs
    assert steps(eight) == [6, 8]  # the default keeps the newest two
    result = cli(*RUN, "--num-steps", "6", "--keep-checkpoints", "1", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert steps(tmp_path / "r") == [6]
    assert cli(*RUN, "--keep-checkpoints", "0").exit_code == 2


def _fail_at_step(monkeypatch, failing_step: int):
    """orbax's save raises ENOSPC for ``failing_step``, leaving a partial temporary folder."""
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == failing_step:
            partial = Path(self.directory) / f"{step}{checkpoint_module.TMP_SUFFIX}"
            partial.mkdir()
            (partial / "half-written").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(partial))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def test_full_disk_during_a_checkpoint_stops_with_one_line_and_resume_continues(
        runs, tmp_path, monkeypatch):
    _, eight = runs
    out = tmp_path / "run"
    _fail_at_step(monkeypatch, 4)
    result = cli(*RUN, "--num-steps", "8", "--out", out)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "checkpoint of step 4 could not be written" in errors[0]
    assert "No space left on device" in errors[0]
    assert "the checkpoint of step 2 is intact" in errors[0]
    assert f"pes run --resume {out}" in errors[0]
    assert steps(out) == [2] and not [p for p in (out / "checkpoints").iterdir()
                                      if checkpoint_module.TMP_SUFFIX in p.name]
    manifest.verify(out / "checkpoints" / "2")
    monkeypatch.undo()  # space freed
    again = cli("run", "--resume", out)
    assert again.exit_code == 0, again.output
    assert summary(out)["resumed_from_step"] == 2
    assert (out / "metrics.jsonl").read_bytes() == (eight / "metrics.jsonl").read_bytes()


@pytest.mark.slow
def test_real_full_disk_on_a_tmpfs(runs, tmp_path, monkeypatch):
    """The same with a real ENOSPC: the run lives on a 4 MiB tmpfs that a filler file fills
    after outer step 5, while the checkpoint of step 6 is due (needs root and mount; skipped
    elsewhere)."""
    _, eight = runs
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        import pes.runs.run as run_module

        out = mnt / "run"
        filler = mnt / "filler"
        real = run_module._Recorder.callback

        def callback(self, record, theta):
            if record.step == 5 and not filler.exists():
                self.checkpointer.wait()  # the checkpoint of step 4 is complete
                with open(filler, "wb") as f:  # fill the disk, then leave 8 KiB free: room
                    try:  # for metrics lines, not for a checkpoint (tens of KiB)
                        while True:
                            f.write(b"\0" * 4096)
                            f.flush()
                    except OSError:
                        pass
                with open(filler, "r+b") as f:
                    f.truncate(max(0, filler.stat().st_size - 8192))
            return real(self, record, theta)

        monkeypatch.setattr(run_module._Recorder, "callback", callback)
        result = cli(*RUN, "--num-steps", "8", "--out", out)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        # Whichever write met the full disk first (the checkpoint of step 6 in the background,
        # or a metrics line after it), the run stops with one line and step 4 is intact.
        assert "No space left on device" in errors[0], errors[0]
        assert f"pes run --resume {out}" in errors[0]
        assert 4 in steps(out)
        manifest.verify(out / "checkpoints" / "4")
        monkeypatch.undo()
        filler.unlink()  # space freed
        again = cli("run", "--resume", out)
        assert again.exit_code == 0, again.output
        assert (out / "metrics.jsonl").read_bytes() == (eight / "metrics.jsonl").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
