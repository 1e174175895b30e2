"""The paper's tasks, each a pes.System carrying its defaults and evaluation metric.

Every task has ``horizon``, ``init(key)``, ``step(state, theta, t, key)``, ``defaults()``
(a :class:`TaskDefaults`) and ``evaluate(theta, key)``: a dict of float scalars whose
``'meta_loss'`` entry is the task's headline metric.
"""

from pes.tasks.base import ESTIMATOR_NAMES, OptimizerSpec, TaskDefaults
from pes.tasks.influence_balancing import InfluenceBalancing
from pes.tasks.lorenz import Lorenz, LorenzState
from pes.tasks.many_hyperparameters import ManyHyperparameters
from pes.tasks.mlp import Hyperparameters, MLPState, MLPSystem
from pes.tasks.mnist_lr_schedule import MnistLRSchedule
from pes.tasks.text_lstm import TextLSTM
from pes.tasks.toy_regression import ToyRegression, inner_loss

__all__ = [
    "ESTIMATOR_NAMES",
    "Hyperparameters",
    "InfluenceBalancing",
    "Lorenz",
    "LorenzState",
    "MLPState",
    "MLPSystem",
    "ManyHyperparameters",
    "MnistLRSchedule",
    "OptimizerSpec",
    "TaskDefaults",
    "TextLSTM",
    "ToyRegression",
    "inner_loss",
]
