"""The locomotion comparisons (PES against ARS-style full ES on the MuJoCo suite)."""

import json

import pytest
from typer.testing import CliRunner

from pes.cli import app
from pes.paper.experiments import EXPERIMENTS, LOCOMOTION
from pes.runs.config import RunConfig

pytest.importorskip("gymnasium")


@pytest.mark.parametrize("name", sorted(LOCOMOTION))
def test_every_arm_resolves_with_arss_settings(name):
    spec, experiment = LOCOMOTION[name], EXPERIMENTS[f"locomotion-{name}"]
    configs = {arm.label: RunConfig(task=experiment.task, estimator=arm.estimator,
                                    **dict(arm.overrides)).resolve() for arm in experiment.arms}
    ars = configs["ars"]
    assert (ars.estimator, ars.num_particles, ars.top_b, ars.lr) == (
        "full-es", 2 * spec.directions, spec.top_b, spec.alpha)
    for cfg in configs.values():  # one set of augmentations for every arm
        assert cfg.obs_norm and cfg.normalize_losses and cfg.optimizer == "sgd"
        assert cfg.survival_bonus_shift == spec.shift and cfg.sigma == spec.nu
        assert cfg.env_steps == spec.env_steps
    assert configs["pes"].truncation_length == 100
    assert experiment.milestones == (spec.threshold,)


@pytest.mark.slow
def test_a_one_step_comparison_reports_the_threshold(tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "locomotion-hopper", "--seeds", "0",
                                      "--num-steps", "1", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["milestone_levels"][0] == 3120.0
    assert {row["label"] for row in res["milestones"]} == {"ars", "pes"}
    assert "3120" in (out / "results.md").read_text()
