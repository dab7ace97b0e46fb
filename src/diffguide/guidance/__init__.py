"""Guidance terms: pure tensor math, one method per file."""

from .base import COND, UNCOND, Branch, GuidanceTerm, StepInfo, Window
from .cfg import CFG
from .cfgnorm import CFGNorm
from .embedded import EmbeddedGuidance
from .pag import PAG
from .slg import SLG
from .tpg import TPG

__all__ = [
    "CFG",
    "COND",
    "PAG",
    "SLG",
    "TPG",
    "UNCOND",
    "Branch",
    "CFGNorm",
    "EmbeddedGuidance",
    "GuidanceTerm",
    "StepInfo",
    "Window",
]
