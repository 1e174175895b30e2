"""``pes compare variance``: the variance study (:mod:`pes.paper.variance_study`) as a
comparison directory.

Writes ``variance.json`` (settings, every point, references, claims), ``variance.png``
(normalised variance against the number of unrolls, log-log, one panel per variant) and
``results.md`` (the claims of issue 5 as a table, then the plot), plus the comparison marker
``comparison.json`` so that ``--overwrite`` can replace it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pes.paper.compare import MARKER, CompareOptions, ComparisonResult, prepare_comparison_dir
from pes.paper.experiments import get_experiment
from pes.paper.variance_study import (
    Claim,
    VarianceStudyConfig,
    VarianceStudyResult,
    check_claims,
    plot_variance_study,
    run_variance_study,
)
from pes.runs.errors import ConfigError
from pes.runs.run import write_json

NAME = "variance"
# --size: 'default' (under 15 minutes on 2 cores; 'cpu' is the same, the image tasks' word
# for it), 'paper' (the paper's size, slow) or 'tiny' (seconds; tests).
SIZES = ("default", "cpu", "paper", "tiny")


def study_config(size: str | None) -> VarianceStudyConfig:
    size = size or "default"
    if size not in SIZES:
        raise ConfigError(f"size={size!r} is not a size of the variance study; valid sizes: "
                          "default (or cpu), paper, tiny", field="size")
    if size == "paper":
        return VarianceStudyConfig.paper()
    if size == "tiny":
        return VarianceStudyConfig.tiny()
    return VarianceStudyConfig()


def compare_variance(name: str, options: CompareOptions,
                     echo: Callable[[str], Any]) -> ComparisonResult:
    """The runner of ``pes compare variance``: it takes --size, --out and --overwrite only;
    prints one line per claim (holds or FAILS)."""
    options.refuse(("seeds", "num_steps", "estimators", "data_dir", "dataset", "objective",
                    "heatmap_points"), NAME, "--size (default, paper or tiny), --out and "
                   "--overwrite")
    res = run_variance_comparison(size=options.size, out=options.out,
                                  overwrite=options.overwrite, echo=echo)
    lines = [f"[{'holds' if c.holds else 'FAILS'}] {c.claim}: {c.detail}" for c in res["claims"]]
    return ComparisonResult(get_experiment(name), res["out_dir"], None, res["files"],
                            res["wall_time_s"], lines, details=res)


def run_variance_comparison(
    *,
    size: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Run the study at ``size`` and write its directory (default runs/compare/variance).

    Returns {'result': VarianceStudyResult, 'claims': [Claim], 'files': [Path],
    'out_dir': Path, 'wall_time_s': float}.
    """
    echo = echo or (lambda line: None)
    config = study_config(size)
    size = size or "default"
    out_dir = Path(out) if out is not None else Path("runs") / "compare" / NAME
    cmd = f"pes compare {NAME} --size {size} --out {out_dir}"
    prepare_comparison_dir(out_dir, overwrite)
    write_json(out_dir / MARKER, {"experiment": NAME, "size": size, "command": cmd,
                                  "config": config.to_dict()})
    start = time.perf_counter()
    result = run_variance_study(config, log=echo)
    claims = check_claims(result)
    files = [result.save_json(out_dir / "variance.json"),
             plot_variance_study(result, out_dir / "variance.png")]
    md = out_dir / "results.md"
    md.write_text(results_markdown(result, claims, cmd))
    files.append(md)
    return {"result": result, "claims": claims, "files": files, "out_dir": out_dir,
            "wall_time_s": time.perf_counter() - start}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def results_markdown(result: VarianceStudyResult, claims: list[Claim], command: str) -> str:
    c = result.config
    held = sum(cl.holds for cl in claims)
    lines = [
        "# The variance study (PES paper, PAPER.md experiment 7)",
        "",
        f"Command: `{command}` ({result.wall_time_s:.0f} s in all).",
        "",
        f"Normalised variance E|g - g_ref|^2 / |g_ref|^2 of full-episode estimates made of T/K "
        f"windows, on a {c.hidden_size}-unit character LSTM over T = {c.sequence_length} "
        f"characters (variants: {', '.join(c.variants)}); K in "
        f"{', '.join(map(str, c.truncation_lengths))}; {c.num_particles} particles, sigma = "
        f"{c.sigma}, {c.num_replicates} replicates per point; reference: {c.reference} "
        f"({c.reference_samples} antithetic pairs). Seed {c.seed}.",
        "",
        f"## Claims ({held} of {len(claims)} hold)",
        "",
        "| claim | holds | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {_cell(cl.claim)} | {'yes' if cl.holds else '**no**'} | {_cell(cl.detail)} |"
              for cl in claims]
    lines += ["", "![normalised variance against the number of unrolls](variance.png)", ""]
    return "\n".join(lines)
