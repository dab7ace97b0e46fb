"""Guidance terms by method name, and their reconstruction from a manifest.

The registry itself lives in :mod:`.term` (``@register`` fills it); importing
:mod:`diffguide.guidance` imports every method module, so it is complete here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import GuidanceTerm
from .term import REGISTRY, Term

#: method name -> term class (the registry; kept under its old name)
METHODS = REGISTRY


def term_class(method: object, where: str = "") -> type[Term]:
    """The registered class of ``method``; a one-line ConfigError naming the known ones."""
    if not isinstance(method, str) or method not in REGISTRY:
        raise ConfigError(f"unknown guidance method '{method}'{where}; known: {', '.join(REGISTRY)}")
    return REGISTRY[method]


def term_from_dict(d: Mapping[str, Any]) -> GuidanceTerm:
    """Rebuild a term from its ``describe()`` dict (as stored in manifests)."""
    return term_class(d.get("method"), " in manifest").from_dict(d)
