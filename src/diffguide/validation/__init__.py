"""Validation sampling for trainers: :func:`sample_validation` (see docs/validation.md).

The same code path as ``diffguide generate`` on the model being trained, used in place; the
training state is left exactly as it was (:mod:`.isolation`); per-family defaults from one table
(:mod:`.presets`); prompt files (:mod:`.prompts`); memory options (:mod:`.memory`).
"""

from __future__ import annotations

from .memory import MemoryOptions
from .presets import FAMILY_DEFAULTS, FamilyDefaults, family_defaults
from .prompts import PromptSet, ValidationPrompt, load_prompts
from .sample import ValidationResult, sample_validation

__all__ = [
    "FAMILY_DEFAULTS",
    "FamilyDefaults",
    "MemoryOptions",
    "PromptSet",
    "ValidationPrompt",
    "ValidationResult",
    "family_defaults",
    "load_prompts",
    "sample_validation",
]
