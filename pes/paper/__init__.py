"""The paper's comparisons and their pictures, built on the run layer (:mod:`pes.runs`).

* :mod:`~pes.paper.comparisons`: the paper's comparisons as data (:class:`Experiment`);
  :mod:`~pes.paper.compare` runs one over estimators and seeds;
* :mod:`~pes.paper.surface`: the toy-regression meta-loss surface with trajectories;
* :mod:`~pes.paper.images`, :mod:`~pes.paper.learned_optimizer`,
  :mod:`~pes.paper.variance_compare`, :mod:`~pes.paper.random_search`: the comparisons with
  their own protocol; :mod:`~pes.paper.diagnose`: `pes diagnose`.
"""

from pes.paper.compare import ComparisonResult, parse_seeds, run_comparison
from pes.paper.comparisons import EXPERIMENT_NAMES, EXPERIMENTS, Arm, Experiment
from pes.paper.surface import SurfaceResult, draw_surface

__all__ = [
    "EXPERIMENTS", "EXPERIMENT_NAMES", "Arm", "ComparisonResult", "Experiment", "SurfaceResult",
    "draw_surface", "parse_seeds", "run_comparison",
]
