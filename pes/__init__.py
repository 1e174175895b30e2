"""pes: Persistent Evolution Strategies and its rivals, on JAX."""

from pes import learned_optimizer
from pes.estimators import (
    NRES,
    PES,
    RTRL,
    TBPTT,
    UORO,
    EstimateInfo,
    FullBPTT,
    FullES,
    ParticleState,
    TruncatedES,
)
from pes.system import System, evaluate, unroll
from pes.training import (
    History,
    NonFiniteGradientError,
    Record,
    TrainResult,
    TrainState,
    train,
)

__all__ = [
    "System", "evaluate", "unroll",
    "train", "TrainResult", "TrainState", "History", "Record", "NonFiniteGradientError",
    "Checkpointer", "abstract_state",
    "PES", "TruncatedES", "FullES", "NRES", "TBPTT", "FullBPTT", "RTRL", "UORO", "EstimateInfo",
    "ParticleState", "learned_optimizer",
]
__version__ = "0.1.0"

# The checkpoint API lives in the run layer and pulls in orbax: imported on first use only.
_LAZY = {"Checkpointer": "pes.runs.checkpoint", "abstract_state": "pes.runs.checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pes' has no attribute {name!r}")
