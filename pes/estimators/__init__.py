"""Gradient estimators for unrolled computation graphs, one family per module."""

from pes.estimators._particles import EpisodeParticleState, EstimateInfo, ParticleState
from pes.estimators.backprop import TBPTT, FullBPTT
from pes.estimators.full_es import FullES
from pes.estimators.nres import NRES
from pes.estimators.pes import PES
from pes.estimators.rtrl import RTRL
from pes.estimators.truncated_es import TruncatedES
from pes.estimators.uoro import UORO

__all__ = [
    "PES", "TruncatedES", "FullES", "NRES", "TBPTT", "FullBPTT", "RTRL", "UORO", "EstimateInfo",
    "ParticleState", "EpisodeParticleState",
]
