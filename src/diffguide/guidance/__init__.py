"""Guidance terms: pure tensor math, one method per file.

A method registers itself (``@register("name")`` on a frozen :class:`Term` dataclass, see
:mod:`.term`); every module of this package is imported here, so a new ``<method>.py`` is
known everywhere without further edits.
"""

import importlib
import pkgutil

from .base import COND, UNCOND, Branch, GuidanceTerm, StepInfo, Window
from .cfg import CFG
from .embedded import EmbeddedGuidance
from .pag import PAG
from .slg import SLG
from .term import REGISTRY, Term, register
from .tpg import TPG

for _module in pkgutil.iter_modules(__path__):  # the other method files register themselves
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CFG",
    "COND",
    "PAG",
    "REGISTRY",
    "SLG",
    "TPG",
    "UNCOND",
    "Branch",
    "EmbeddedGuidance",
    "GuidanceTerm",
    "StepInfo",
    "Term",
    "Window",
    "register",
]
