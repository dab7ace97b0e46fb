"""Guidance terms: pure tensor math, one method per file."""

from .base import COND, UNCOND, Branch, GuidanceTerm, StepInfo, Window
from .cfg import CFG
from .embedded import EmbeddedGuidance
from .pag import PAG
from .seg import SEG
from .slg import SLG
from .tpg import TPG

__all__ = [
    "CFG",
    "COND",
    "PAG",
    "SEG",
    "SLG",
    "TPG",
    "UNCOND",
    "Branch",
    "EmbeddedGuidance",
    "GuidanceTerm",
    "StepInfo",
    "Window",
]
