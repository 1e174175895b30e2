"""The command line of the image tasks: `pes run` and `pes compare` of mnist-lr-schedule and
many-hyperparameters at --size tiny on small generated IDX files (--data-dir), and
`pes data download` against a local HTTP server. Never the internet, never the real data."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_data import _digests, isolated, make_dataset_dir, server  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from pes import data
from pes.cli import app
from pes.runs import read_config

RUNNER = CliRunner()


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST-shaped IDX files: 10040 training images (the last 10000 are the fixed
    validation split), 20 test images; uncompressed, so writing them is quick."""
    root = tmp_path_factory.mktemp("images")
    make_dataset_dir(root / "fashion-mnist", num_train=10040, num_test=20, gz=False, seed=1)
    return root


@pytest.mark.slow
def test_run_image_task_writes_a_run_directory(tmp_path, data_dir):
    out = tmp_path / "run"
    result = cli("run", "mnist-lr-schedule", "-e", "pes", "--size", "tiny", "--data-dir",
                 data_dir, "--objective", "accuracy", "--num-steps", 2, "--out", out,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert (config.dataset, config.size, config.objective, config.data_dir) == (
        "fashion-mnist", "tiny", "accuracy", str(data_dir))
    assert (config.num_particles, config.truncation_length) == (4, 5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["outer_steps"] == 2
    assert -1.0 <= summary["final_meta_loss"] <= 0.0  # minus an accuracy
    assert len(summary["final_theta"]) == 2
    assert (out / "meta_objective.png").is_file() and (out / "theta.png").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "theta" in json.loads(lines[-1])


def test_missing_dataset_is_one_line_exit_2(tmp_path, isolated):  # noqa: F811
    result = cli("run", "many-hyperparameters", "-e", "pes", "--dataset", "mnist",
                 "--data-dir", tmp_path / "empty", "--out", tmp_path / "x", "--no-progress")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "dataset 'mnist' not found" in errors[0]
    assert "pes data download mnist" in errors[0] and "--data-dir" in errors[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_compare_mnist_lr_schedule(tmp_path, data_dir):
    out = tmp_path / "cmp"
    result = cli("compare", "mnist-lr-schedule", "--size", "tiny", "--data-dir", data_dir,
                 "--objective", "accuracy", "--heatmap-points", 3, "--num-steps", 2,
                 "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "accuracy: TES settles at" in result.output
    for est in ("pes", "tes"):
        summary = json.loads((out / "accuracy" / est / "seed-0" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["estimator"] == est
    heat = np.load(out / "accuracy" / "heatmap.npz")
    assert heat["meta_loss"].shape == (3, 3) and np.isfinite(heat["meta_loss"]).all()
    assert (out / "accuracy" / "heatmap.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert set(results["objectives"]) == {"accuracy"}
    assert results["options"]["size"] == "tiny"
    md = (out / "results.md").read_text()
    assert "![accuracy heatmap](accuracy/heatmap.png)" in md and "| accuracy | pes |" in md
    # A second compare into the same folder is refused without --overwrite.
    again = cli("compare", "mnist-lr-schedule", "--size", "tiny", "--data-dir", data_dir,
                "--out", out, "--no-progress")
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.slow
def test_compare_many_hyperparameters(tmp_path, data_dir):
    out = tmp_path / "cmp"
    result = cli("compare", "many-hyperparameters", "--size", "tiny", "--data-dir", data_dir,
                 "--seeds", "0", "--num-steps", 3, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "PES's best-so-far is at or below random search's" in result.output
    assert (out / "best_so_far.png").stat().st_size > 1000
    for est in ("pes", "tes"):
        assert (out / est / "seed-0" / "summary.json").is_file()
    results = json.loads((out / "results.json").read_text())
    row = results["per_seed"][0]
    # Random search's budget is PES's inner steps, in whole episodes of T = 20.
    assert row["random search"]["configs"] == -(-row["pes"]["inner_steps"] // 20)
    assert row["random search"]["inner_steps"] >= row["pes"]["inner_steps"]
    assert (out / "random-search-seed-0.npz").is_file()
    # The returned configurations are scored on the same fresh episodes (finite, with an s.e.).
    returned = row["returned"]
    assert set(returned) == {"pes", "tes", "random search"}
    assert all(np.isfinite(v["mean"]) and v["se"] >= 0 for v in returned.values())
    assert row["pes_le_random_returned"] == (returned["pes"]["mean"]
                                             <= returned["random search"]["mean"])
    md = (out / "results.md").read_text()
    assert "![best so far](best_so_far.png)" in md and "fresh episodes in" in md


@pytest.mark.parametrize("args, message", [
    (["compare", "toy-regression", "--size", "tiny"],
     "--size applies only to pes compare mnist-lr-schedule and many-hyperparameters"),
    (["compare", "many-hyperparameters", "--objective", "loss"],
     "--objective applies only to pes compare mnist-lr-schedule"),
    (["compare", "mnist-lr-schedule", "--estimators", "pes"], "--estimators does not apply"),
    (["compare", "mnist-lr-schedule", "--size", "big"], "size='big' is not a known size"),
    (["data", "download", "kmnist"], "dataset='kmnist' is not known; known datasets: mnist, "
     "fashion-mnist"),
])
def test_bad_image_options_exit_2(tmp_path, args, message):
    result = cli(*args, *(["--out", tmp_path / "x"] if args[0] == "compare" else []))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_data_download(server, isolated, monkeypatch):  # noqa: F811
    monkeypatch.setitem(data.CHECKSUMS, "mnist", _digests(server.files))
    target = isolated / "dl"
    result = cli("data", "download", "mnist", "--base-url", server.url, "--cache-dir", target)
    assert result.exit_code == 0, result.output
    assert f"mnist: the four files are in {target}" in result.output
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in data.FILE_NAMES)
    assert len(server.handler.requests) == 4
    # Verified files are kept; --force fetches them again.
    assert cli("data", "download", "mnist", "--base-url", server.url, "--cache-dir",
               target).exit_code == 0
    assert len(server.handler.requests) == 4
    assert cli("data", "download", "mnist", "--base-url", server.url, "--cache-dir", target,
               "--force").exit_code == 0
    assert len(server.handler.requests) == 8
    # Without --cache-dir: the cache the tasks search ($PES_CACHE_DIR here).
    assert cli("data", "download", "mnist", "--base-url", server.url).exit_code == 0
    assert data.load("mnist", validation_size=5).source == data.default_cache_dir("mnist")


def test_data_download_failure_exits_1(server, isolated, monkeypatch):  # noqa: F811
    digests = _digests(server.files)
    digests["t10k-images-idx3-ubyte.gz"] = "0" * 64
    monkeypatch.setitem(data.CHECKSUMS, "mnist", digests)
    result = cli("data", "download", "mnist", "--base-url", server.url, "--cache-dir",
                 isolated / "dl")
    assert result.exit_code == 1, result.output
    assert "could not download t10k-images-idx3-ubyte.gz" in result.output
    assert not (isolated / "dl" / "t10k-images-idx3-ubyte.gz").exists()
