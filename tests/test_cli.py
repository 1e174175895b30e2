"""The `pes` command line and the run layer under it: run directories, refusals, compare,
surface. Runs are tiny (a few outer steps, few particles) so the file stays fast."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import pes.runs.run as run_module
from pes.cli import app
from pes.paper import EXPERIMENT_NAMES
from pes.runs import (
    ESTIMATOR_NAMES,
    TASK_NAMES,
    ConfigError,
    RunConfig,
    build,
    read_config,
    read_metrics,
)
from pes.training import NonFiniteGradientError

RUNNER = CliRunner()
SUMMARY_KEYS = {"status", "final_theta", "final_meta_loss", "final_metrics", "inner_steps",
                "wall_time_s", "outer_steps", "initial_meta_loss", "task", "estimator", "seed"}


def cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def output(result) -> str:
    # CliRunner's output holds stdout and stderr together (click's default in every version).
    return result.output


def test_list_names_everything():
    result = cli("list")
    assert result.exit_code == 0, output(result)
    lines = result.output.splitlines()
    for name in TASK_NAMES + ESTIMATOR_NAMES + EXPERIMENT_NAMES:
        assert any(line.strip().startswith(name + " ") for line in lines), name


def test_python_dash_m_runs_the_same_cli():
    proc = subprocess.run([sys.executable, "-m", "pes", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "compare", "surface", "list"):
        assert command in proc.stdout


@pytest.mark.parametrize("task, estimator, extra, theta_len", [
    ("influence-balancing", "pes", ["--num-particles", 20], 1),
    ("toy-regression", "tbptt", [], 2),
])
def test_run_writes_complete_run_directory(tmp_path, task, estimator, extra, theta_len):
    out = tmp_path / "run"
    result = cli("run", task, "--estimator", estimator, "--num-steps", 5, "--eval-every", 2,
                 "--out", out, "--no-progress", *extra)
    assert result.exit_code == 0, output(result)
    assert f"wrote {out}" in result.output
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json",
                                               "meta_objective.png", "theta.png",
                                               "timing.jsonl", "checkpoints"}
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["outer_steps"] == 5
    assert len(summary["final_theta"] if theta_len > 1 else [summary["final_theta"]]) == theta_len

    records = read_metrics(out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == 6  # step 0 (evaluation of theta0) and steps 1..5
    assert [r["step"] for r in records] == list(range(6))
    assert [r["step"] for r in records if "meta_objective" in r] == [0, 2, 4, 5]
    assert all({"step", "inner_steps", "theta"} <= set(r) for r in records)
    assert not any("wall_time_s" in r for r in records)  # timing lives in timing.jsonl
    timing = [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
    assert [t["step"] for t in timing] == list(range(6))
    assert all(t["wall_time_s"] >= 0 for t in timing)
    assert all("loss" in r for r in records[1:])
    assert records[-1]["inner_steps"] == summary["inner_steps"]
    assert records[-1]["meta_objective"] == summary["final_meta_loss"]
    assert records[-1]["theta"] == summary["final_theta"]

    config = read_config(out)  # config.json is the resolved RunConfig
    assert config == config.resolve()
    assert (config.task, config.estimator, config.num_steps) == (task, estimator, 5)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    args = ["run", "influence-balancing", "-e", "tbptt", "--num-steps", 3, "--out", out,
            "--no-progress"]
    assert cli(*args).exit_code == 0
    def contents():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = contents()
    refused = cli(*args)
    assert refused.exit_code == 2
    assert "--overwrite" in output(refused) and "Traceback" not in output(refused)
    assert contents() == before

    # Not a run directory: refused even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    result = cli("run", "influence-balancing", "-e", "tbptt", "--num-steps", 3, "--out", other,
                 "--no-progress", "--overwrite")
    assert result.exit_code == 2 and (other / "precious.txt").read_text() == "keep"

    replaced = cli(*args, "--overwrite", "--seed", 1)
    assert replaced.exit_code == 0, output(replaced)
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


@pytest.mark.parametrize("args, names", [
    (["run", "no-such-task", "-e", "pes"], TASK_NAMES),
    (["run", "toy-regression", "-e", "sgd"], ESTIMATOR_NAMES),
    (["run", "toy-regression", "-e", "pes", "--optimizer", "rmsprop"], ("sgd", "adam")),
    (["run", "toy-regression", "-e", "pes", "--nonfinite", "ignore"], ("raise", "drop")),
    (["compare", "mnist"], EXPERIMENT_NAMES),
    (["compare", "toy-regression", "--estimators", "pes,bptt"], ("pes", "tes", "tbptt")),
    (["surface", "influence-balancing"], ("toy-regression",)),
])
def test_unknown_names_exit_2_with_the_valid_ones(tmp_path, args, names):
    result = cli(*args, "--out", tmp_path / "x")
    text = output(result)
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    for name in names:
        assert name in text
    assert not (tmp_path / "x").exists()


def test_unknown_option_is_a_usage_error():
    result = cli("run", "toy-regression", "-e", "pes", "--sigm", "0.1")
    assert result.exit_code == 2
    assert "--sigma" in output(result)  # click suggests the option meant


@pytest.mark.parametrize("args, reason", [
    (["-e", "full-es", "--truncation-length", "10"], "takes no truncation_length"),
    (["-e", "full-bptt", "-K", "10"], "takes no truncation_length"),
    (["-e", "tes", "--truncation-length", "101"], "longer than the horizon"),
    (["-e", "tbptt", "--truncation-length", "500"], "longer than the horizon"),
    (["-e", "tbptt", "--sigma", "0.1"], "sigma"),
    (["-e", "pes", "--num-particles", "3"], "even"),
    (["-e", "pes", "--optimizer", "sgd", "--b1", "0.9"], "b1"),
    (["-e", "pes", "--num-steps", "0"], "num_steps=0"),
    (["-e", "pes", "--sigma", "-1"], "sigma=-1"),
])
def test_contradictory_or_bad_settings_refused(tmp_path, args, reason):
    result = cli("run", "toy-regression", *args, "--out", tmp_path / "x", "--no-progress")
    text = output(result)
    assert result.exit_code == 2, text
    assert reason in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("estimator", ["full-es", "full-bptt", "nres"])
def test_full_episode_estimators_refused_without_horizon(tmp_path, estimator):
    result = cli("run", "influence-balancing", "-e", estimator, "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "never resets" in output(result)


@pytest.mark.parametrize("error, exit_code, status", [
    (lambda theta: NonFiniteGradientError("non-finite gradient at outer step 4", 4, theta,
                                          float("nan")), 1, "failed"),
    (lambda theta: KeyboardInterrupt(), 130, "interrupted"),
])
def test_stopped_run_keeps_what_it_wrote(tmp_path, monkeypatch, error, exit_code, status):
    real_train = run_module.train

    def stopping_train(*args, callback, **kwargs):
        def stop_after_3(record, theta):
            callback(record, theta)
            if record.step == 3:
                raise error(theta)

        return real_train(*args, callback=stop_after_3, **kwargs)

    monkeypatch.setattr(run_module, "train", stopping_train)
    out = tmp_path / "run"
    result = cli("run", "toy-regression", "-e", "tbptt", "--num-steps", 10, "--out", out,
                 "--no-progress")
    assert result.exit_code == exit_code, output(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == status and summary["outer_steps"] == 3
    assert summary["final_meta_loss"] is not None
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert summary["final_theta"] == read_metrics(out)[-1]["theta"]
    assert (out / "meta_objective.png").is_file()


def test_run_config_validation_and_round_trip():
    config = RunConfig(task="lorenz", estimator="nres", seed=3).resolve()
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.resolve() == config
    assert (config.num_particles, config.sigma, config.truncation_length) == (400, 0.04, 100)
    with pytest.raises(ConfigError, match="unknown setting 'sigmaa'.*sigma"):
        RunConfig.from_dict({"task": "lorenz", "estimator": "pes", "sigmaa": 1.0})
    with pytest.raises(ConfigError, match="num_steps='10' must be an integer"):
        RunConfig(task="lorenz", estimator="pes", num_steps="10")
    with pytest.raises(ConfigError, match="lacks the required setting 'estimator'"):
        RunConfig.from_dict({"task": "lorenz"})
    setup = build("toy-regression", "tes", num_particles=4)
    assert setup.estimator.sigma == 1.0 and setup.estimator.num_particles == 4
    assert setup.theta0.shape == (2,)


@pytest.mark.slow
def test_compare_writes_plots_and_table(tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "influence-balancing", "--seeds", "0", "--num-steps", 5, "--out",
                 out, "--no-progress")
    assert result.exit_code == 0, output(result)
    assert (out / "meta_objective.png").stat().st_size > 0
    assert (out / "theta.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    labels = ["pes", "tes", "tbptt-depth1", "tbptt-depth10", "tbptt-depth100", "rtrl", "uoro"]
    assert [a["label"] for a in results["arms"]] == labels
    for arm in results["arms"]:
        assert f"| {arm['label']} |" in table
        if not arm["skipped"]:
            assert (out / arm["label"] / "seed-0" / "summary.json").is_file()
            assert arm["completed"] == 1
    assert "K=1, depth=100" in table
    # Refused the second time without --overwrite.
    again = cli("compare", "influence-balancing", "--seeds", "0", "--num-steps", 5, "--out", out,
                "--no-progress", "--estimators", "pes")
    assert again.exit_code == 2 and "--overwrite" in output(again)


@pytest.mark.slow
def test_compare_several_seeds_subset(tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", "toy-regression", "--seeds", "0,1", "--num-steps", 3,
                 "--estimators", "pes,tbptt", "--out", out, "--no-progress")
    assert result.exit_code == 0, output(result)
    results = json.loads((out / "results.json").read_text())
    assert [a["label"] for a in results["arms"]] == ["pes", "tbptt"]
    assert all(a["seeds"] == [0, 1] and len(a["final_theta_mean"]) == 2
               for a in results["arms"])
    assert "±" in (out / "results.md").read_text()

    png = tmp_path / "surface.png"
    surf = cli("surface", "toy-regression", "--resolution", 9, "--runs", out, "--out", png)
    assert surf.exit_code == 0, output(surf)
    assert "4 trajectories" in surf.output
    assert png.stat().st_size > 0


def test_surface_png_and_bad_runs(tmp_path):
    png = tmp_path / "s.png"
    result = cli("surface", "toy-regression", "--resolution", 9, "--out", png)
    assert result.exit_code == 0, output(result)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = cli("surface", "toy-regression", "--resolution", 9, "--runs",
                  tmp_path / "nope", "--out", png)
    assert missing.exit_code == 2 and "does not exist" in output(missing)
    bad = cli("surface", "toy-regression", "--resolution", 1, "--out", png)
    assert bad.exit_code == 2 and "resolution" in output(bad)
