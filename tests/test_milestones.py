"""The per-run milestone table of comparisons whose metric grows (the swimmer's return)."""

from pathlib import Path

from pes.paper.compare import ArmResult, _milestone_lines, milestone_rows
from pes.paper.experiments import Arm, get_experiment
from pes.runs.run import RunResult


def fake_run(seed, curve, final):
    records = [{"step": i, "inner_steps": s, "eval": {"reward": v}}
               for i, (s, v) in enumerate(curve)]
    summary = {"seed": seed, "final_metrics": {"reward": final}}
    return RunResult(config=None, run_dir=Path("."), summary=summary, records=records)


def test_milestones_first_crossings_budget_and_level():
    experiment = get_experiment("swimmer")
    pes_runs = [fake_run(0, [(0, -5), (100_000, 310), (200_000, 400)], 400),
                fake_run(1, [(0, 2), (140_000, 250), (160_000, 290), (300_000, 300)], 300)]
    es_runs = [fake_run(0, [(0, 1), (150_000, 59.9), (400_000, 340)], 340)]
    results = [ArmResult(Arm("pes", "pes"), None, pes_runs),
               ArmResult(Arm("full-es", "full-es"), None, es_runs)]
    levels, rows = milestone_rows(experiment, results, "reward")
    assert levels == [60.0, 300.0, 0.95 * 350]
    by = {(r["label"], r["seed"]): r for r in rows}
    assert by["pes", 0]["first_reached"] == [100_000, 100_000, 200_000]
    assert by["pes", 0]["within_budget"] == 310  # the last evaluation at <= 150k steps
    assert by["pes", 1]["first_reached"] == [140_000, 300_000, None]
    assert by["pes", 1]["within_budget"] == 250
    assert by["full-es", 0]["first_reached"] == [400_000, 400_000, 400_000]
    assert by["full-es", 0]["best"] == 340 and by["full-es", 0]["final"] == 340
    lines = _milestone_lines(experiment, levels, rows)
    assert "steps to 332.5 (95% of pes's mean final)" in lines[2]
    assert "| pes | 1 | 250 | 300 | 300 | 140,000 | 300,000 | never |" in lines
