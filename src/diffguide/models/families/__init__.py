"""Model families: one adapter per kind of model (see :mod:`.base`).

:data:`FAMILIES` is checked in order; the first family whose ``matches(pipe)`` is true serves
the pipeline. Adding a family: write ``families/<name>.py`` (a :class:`Family` subclass) and
list an instance here.
"""

from __future__ import annotations

from typing import Any

from ...errors import DiffguideError
from .auraflow import AuraFlowFamily
from .base import Family
from .flux import FluxFamily
from .qwen_image import QwenImageFamily
from .sd import SDFamily
from .sd3 import SD3Family

FAMILIES: tuple[Family, ...] = (SD3Family(), FluxFamily(), AuraFlowFamily(), QwenImageFamily(), SDFamily())


def family_of(pipe: Any) -> Family:
    """The family serving a diffusers pipeline, or a one-line error naming the supported ones."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    names = ", ".join(f.name for f in FAMILIES)
    raise DiffguideError(f"{type(pipe).__name__} is not a supported model family (supported: {names})")


__all__ = ["FAMILIES", "Family", "family_of"]
