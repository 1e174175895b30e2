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
from pes.train import History, NonFiniteGradientError, Record, TrainResult, train

__all__ = [
    "System", "evaluate", "unroll",
    "train", "TrainResult", "History", "Record", "NonFiniteGradientError",
    "PES", "TruncatedES", "FullES", "NRES", "TBPTT", "FullBPTT", "RTRL", "UORO", "EstimateInfo",
    "ParticleState", "learned_optimizer",
]
__version__ = "0.1.0"
