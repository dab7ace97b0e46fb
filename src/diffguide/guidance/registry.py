"""Guidance terms by method name, and their reconstruction from a manifest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import GuidanceTerm, Window
from .cfg import CFG
from .cfgnorm import CFGNorm
from .embedded import EmbeddedGuidance
from .pag import PAG
from .slg import SLG
from .tpg import TPG

METHODS: dict[str, type] = {
    "cfg": CFG,
    "cfgnorm": CFGNorm,
    "pag": PAG,
    "tpg": TPG,
    "slg": SLG,
    "embedded_guidance": EmbeddedGuidance,
}


def term_from_dict(d: Mapping[str, Any]) -> GuidanceTerm:
    """Rebuild a term from its ``describe()`` dict (as stored in manifests)."""
    method = d.get("method")
    if method not in METHODS:
        raise ConfigError(f"unknown guidance method '{method}' in manifest; known: {', '.join(METHODS)}")
    kwargs = {k: v for k, v in d.items() if k != "method"}
    if "window" in kwargs:
        kwargs["window"] = Window.from_dict(kwargs["window"])
    term: GuidanceTerm = METHODS[method](**kwargs)
    return term
