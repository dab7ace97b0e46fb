"""Guidance terms: pure tensor math, one method per file.

A method registers itself (``@register("name")`` on a frozen :class:`Term` dataclass, see
:mod:`.term`); every module of this package is imported here, so a new ``<method>.py`` is
known everywhere without further edits.
"""

import importlib
import pkgutil

from .base import COND, UNCOND, Branch, GuidanceTerm, RunState, StepInfo, Window
from .cfg import CFG
from .embedded import EmbeddedGuidance
from .pag import PAG
from .slg import SLG
from .term import REGISTRY, Term, register
from .tpg import TPG

for _module in pkgutil.iter_modules(__path__):  # the other method files register themselves
    importlib.import_module(f"{__name__}.{_module.name}")

# Below the built-ins (sorted imports would put adaptive_cfg and apg before cfg): the registry lists
# the built-ins first.
from .adaptive_cfg import AdaptiveCFG  # noqa: E402
from .apg import APG  # noqa: E402
from .cfg_norm import CFGNorm  # noqa: E402
from .cfg_zero_star import CFGZeroStar  # noqa: E402
from .fdg import FDG  # noqa: E402
from .interval import INTERVALS, guidance_interval, interval_window  # noqa: E402
from .layer_skip import LayerSkip  # noqa: E402
from .mag import MagnitudeAware  # noqa: E402
from .nag import NAG  # noqa: E402
from .pladis import PLADIS  # noqa: E402
from .prompt_shuffle import PromptShuffle  # noqa: E402
from .rescale_cfg import RescaleCFG  # noqa: E402
from .seg import SEG  # noqa: E402
from .tcfg import TCFG  # noqa: E402
from .uncond_query_shuffle import UncondQueryShuffle  # noqa: E402

__all__ = [
    "APG",
    "CFG",
    "COND",
    "FDG",
    "INTERVALS",
    "NAG",
    "PAG",
    "PLADIS",
    "REGISTRY",
    "SEG",
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
    "LayerSkip",
    "MagnitudeAware",
    "PromptShuffle",
    "RescaleCFG",
    "RunState",
    "StepInfo",
    "Term",
    "UncondQueryShuffle",
    "Window",
    "guidance_interval",
    "interval_window",
    "register",
]
