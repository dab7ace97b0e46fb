"""Guidance terms: pure tensor math, one method per file."""

from .base import COND, UNCOND, Branch, GuidanceTerm, StepInfo, Window
from .cfg import CFG
from .embedded import EmbeddedGuidance
from .layer_skip import LayerSkip
from .pag import PAG
from .prompt_shuffle import PromptShuffle
from .seg import SEG
from .slg import SLG
from .tpg import TPG
from .uncond_query_shuffle import UncondQueryShuffle

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
    "LayerSkip",
    "PromptShuffle",
    "StepInfo",
    "UncondQueryShuffle",
    "Window",
]
