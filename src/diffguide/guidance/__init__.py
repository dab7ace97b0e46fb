"""Guidance terms: pure tensor math, one method per file."""

from .adaptive_cfg import AdaptiveCFG
from .apg import APG
from .base import COND, UNCOND, Branch, GuidanceTerm, RunState, StepInfo, Window
from .cfg import CFG
from .cfg_norm import CFGNorm
from .cfg_zero_star import CFGZeroStar
from .embedded import EmbeddedGuidance
from .fdg import FDG
from .interval import INTERVALS, guidance_interval, interval_window
from .mag import MagnitudeAware
from .pag import PAG
from .rescale_cfg import RescaleCFG
from .slg import SLG
from .tcfg import TCFG
from .tpg import TPG

__all__ = [
    "APG",
    "CFG",
    "COND",
    "FDG",
    "INTERVALS",
    "PAG",
    "SLG",
    "TCFG",
    "TPG",
    "UNCOND",
    "AdaptiveCFG",
    "Branch",
    "CFGNorm",
    "CFGZeroStar",
    "EmbeddedGuidance",
    "GuidanceTerm",
    "MagnitudeAware",
    "RescaleCFG",
    "RunState",
    "StepInfo",
    "Window",
    "guidance_interval",
    "interval_window",
]
