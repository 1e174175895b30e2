"""The paper's comparisons and their pictures, built on the run layer (:mod:`pes.runs`).

* :mod:`~pes.paper.experiments`: the paper's comparisons as data (:class:`Experiment`),
  each naming its runner; :mod:`~pes.paper.compare`: :func:`run_experiment` (``pes compare``)
  and the runner of comparisons of training runs (every arm over every seed); every runner
  returns a :class:`ComparisonResult`;
* :mod:`~pes.paper.surface`: the toy-regression meta-loss surface with trajectories;
* :mod:`~pes.paper.images`, :mod:`~pes.paper.learned_optimizer_comparison`,
  :mod:`~pes.paper.variance_comparison`, :mod:`~pes.paper.random_search`: the comparisons with
  their own protocol; :mod:`~pes.paper.diagnose_sweep`: `pes diagnose`.
"""

from pes.paper.compare import (
    CompareOptions,
    ComparisonResult,
    parse_seeds,
    run_comparison,
    run_experiment,
)
from pes.paper.experiments import EXPERIMENT_NAMES, EXPERIMENTS, Arm, Experiment
from pes.paper.surface import SurfaceResult, draw_surface

__all__ = [
    "EXPERIMENTS", "EXPERIMENT_NAMES", "Arm", "CompareOptions", "ComparisonResult", "Experiment",
    "SurfaceResult", "draw_surface", "parse_seeds", "run_comparison", "run_experiment",
]
