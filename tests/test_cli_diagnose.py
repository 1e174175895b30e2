"""`pes diagnose`, `pes compare variance` and the text-lstm tasks on the command line.

Everything is small (few replicates, particles and reference samples) so the file stays fast;
the numbers are checked for shape and sense, not for the paper's findings."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from pes.cli import app
from pes.paper import EXPERIMENT_NAMES
from pes.paper.variance_study import VarianceStudyConfig
from pes.runs import ESTIMATOR_NAMES, TASK_NAMES

RUNNER = CliRunner()


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_diagnose_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "diag"
    result = cli("diagnose", "toy-regression", "--estimators", "pes,tes,full-es",
                 "--truncation-lengths", "1,10", "--replicates", 6, "--num-particles", 4,
                 "--sigma", 0.3, "--reference-samples", 8, "--out", out)
    assert result.exit_code == 0, result.output
    # full-es has no K: one row, and a note that says so.
    assert "full-es unrolls whole episodes" in result.output
    for header in ("estimator", "bias |b| ± se", "norm. variance ± se",
                   "inner steps / estimate"):
        assert header in result.output
    for name in ("diagnose.json", "diagnose.md", "diagnose.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "diagnose.json").read_text())
    assert data["episode_length"] == 100 and data["theta_dim"] == 2
    rows = data["rows"]
    assert [(r["estimator"], r["K"], r["windows"]) for r in rows] == [
        ("pes", 1, 100), ("pes", 10, 10), ("tes", 1, 100), ("tes", 10, 10),
        ("full-es", None, 1)]
    assert list(data["references"]) == ["0.3"]  # one sigma given: one reference
    for r in rows:
        assert r["num_replicates"] == 6 and r["num_components"] == 2
        assert r["reference_sigma"] == 0.3 and r["num_particles"] == 4
        for key in ("bias_norm", "bias_norm_se", "relative_bias", "normalized_variance",
                    "normalized_variance_se", "reference_norm"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] >= 0, (r, key)
        # Every estimate is one whole episode of N particles: N x T inner steps.
        assert r["inner_steps"] >= 4 * 100
    # TES ignores how theta moved the state before each window: biased at K = 1.
    tes1 = rows[2]
    assert tes1["biased"] and tes1["relative_bias"] > 0.5
    md = (out / "diagnose.md").read_text()
    assert md.count("\n| pes |") == 2 and "![" in md
    # The same directory again: refused without --overwrite, replaced with it.
    again = cli("diagnose", "toy-regression", "-e", "full-es", "-r", 3, "--num-particles", 4,
                "--reference-samples", 4, "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_diagnose_bad_estimator_names_valid_ones(tmp_path):
    result = cli("diagnose", "toy-regression", "--estimators", "pes,nope", "--out",
                 tmp_path / "d")
    assert result.exit_code == 2
    assert "nope" in result.output
    for name in ESTIMATOR_NAMES:
        assert name in result.output
    assert not (tmp_path / "d").exists()


def test_diagnose_refuses_k_that_does_not_divide_the_episode(tmp_path):
    result = cli("diagnose", "toy-regression", "-e", "pes", "-k", "3", "--out", tmp_path / "d")
    assert result.exit_code == 2
    assert "does not divide the episode length T=100" in result.output


@pytest.mark.slow
def test_compare_variance_tiny_writes_its_files(tmp_path, monkeypatch):
    # --size tiny runs 3 variants x 4 estimators (about a minute, all compilation); one
    # variant and two estimators keep this test to seconds and exercise the same path.
    tiny = VarianceStudyConfig.tiny
    monkeypatch.setattr(VarianceStudyConfig, "tiny", classmethod(
        lambda cls: tiny(variants=("repeat",), estimators=("pes", "tes"), num_replicates=6,
                         reference_samples=4)))
    assert "variance" in EXPERIMENT_NAMES
    listed = cli("list")
    assert any(line.strip().startswith("variance ") for line in listed.output.splitlines())
    out = tmp_path / "variance"
    result = cli("compare", "variance", "--size", "tiny", "--out", out)
    assert result.exit_code == 0, result.output
    assert "[holds]" in result.output or "[FAILS]" in result.output
    for name in ("variance.json", "variance.png", "results.md", "comparison.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "variance.json").read_text())
    assert data["config"]["sequence_length"] == 20
    assert len(data["rows"]) == 2 * 2 and data["claims"]
    md = (out / "results.md").read_text()
    assert "| claim | holds | detail |" in md
    assert md.count("\n| PES variance") == 2  # the repeated-token claims
    bad = cli("compare", "variance", "--size", "huge", "--out", tmp_path / "v2")
    assert bad.exit_code == 2 and "default (or cpu), paper, tiny" in bad.output
    seeds = cli("compare", "variance", "--seeds", "0,1", "--out", tmp_path / "v3")
    assert seeds.exit_code == 2 and "--seeds does not apply" in seeds.output


@pytest.mark.slow
def test_run_text_lstm(tmp_path):
    assert {"text-lstm", "text-lstm-random", "text-lstm-repeat"} <= set(TASK_NAMES)
    out = tmp_path / "run"
    result = cli("run", "text-lstm", "--estimator", "pes", "--num-steps", 3,
                 "--num-particles", 4, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "1238 numbers" in result.output  # theta is summarised, not printed in full
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["outer_steps"] == 3
    assert len(summary["final_theta"]) == 1238
    assert 3.0 < summary["final_meta_loss"] < 4.5  # about log 43 = 3.76 at initialisation
