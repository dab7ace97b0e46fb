"""diffguide: guided sampling for diffusion image models.

CFG, PAG and TPG (and their relatives) composed as an explicit list of terms, all branches
of a step in one batched forward, with manifests and tools that make runs reproducible.

    >>> from diffguide import GuidedPipeline, CFG, PAG
    >>> pipe = GuidedPipeline.from_pretrained("path/to/model")          # doctest: +SKIP
    >>> out = pipe("a photo of a cat", guidance=[CFG(5.0), PAG(3.0)])    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DiffguideError, LayerSpecError

__version__ = "0.1.0"

# Public name -> the submodule that defines it. Imported on first use (PEP 562), so that
# `import diffguide` and the CLI's `--help` do not load torch and diffusers.
_LAZY = {
    "DEFAULTS": ".defaults",
    "default_model": ".defaults",
    "GuidedModel": ".engine",
    "StepResult": ".engine",
    "CFG": ".guidance",
    "CFGNorm": ".guidance",
    "PAG": ".guidance",
    "SLG": ".guidance",
    "TPG": ".guidance",
    "EmbeddedGuidance": ".guidance",
    "Branch": ".guidance",
    "GuidanceTerm": ".guidance",
    "StepInfo": ".guidance",
    "Window": ".guidance",
    "Conditioning": ".models.denoiser",
    "UNetDenoiser": ".models.denoiser",
    "GenerateConfig": ".pipeline",
    "GenerationResult": ".pipeline",
    "GuidedPipeline": ".pipeline",
}

if TYPE_CHECKING:
    from .defaults import DEFAULTS, default_model
    from .engine import GuidedModel, StepResult
    from .guidance import (
        CFG,
        PAG,
        SLG,
        TPG,
        Branch,
        CFGNorm,
        EmbeddedGuidance,
        GuidanceTerm,
        StepInfo,
        Window,
    )
    from .models.denoiser import Conditioning, UNetDenoiser
    from .pipeline import GenerateConfig, GenerationResult, GuidedPipeline


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffguide' has no attribute '{name}'")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CFG",
    "DEFAULTS",
    "PAG",
    "SLG",
    "TPG",
    "Branch",
    "CFGNorm",
    "Conditioning",
    "ConfigError",
    "DiffguideError",
    "EmbeddedGuidance",
    "GenerateConfig",
    "GenerationResult",
    "GuidanceTerm",
    "GuidedModel",
    "GuidedPipeline",
    "LayerSpecError",
    "StepInfo",
    "StepResult",
    "UNetDenoiser",
    "Window",
    "__version__",
    "default_model",
]
