"""diffguide: guided sampling for diffusion image models.

CFG, PAG and TPG (and their relatives) composed as an explicit list of terms, all branches
of a step in one batched forward, with manifests and tools that make runs reproducible.

    >>> from diffguide import GuidedPipeline, CFG, PAG
    >>> pipe = GuidedPipeline.from_pretrained("path/to/model")          # doctest: +SKIP
    >>> out = pipe("a photo of a cat", guidance=[CFG(5.0), PAG(3.0)])    # doctest: +SKIP
"""

from .engine import GuidedModel, StepResult
from .errors import ConfigError, DiffguideError, LayerSpecError
from .guidance import CFG, PAG, SLG, TPG, Branch, EmbeddedGuidance, GuidanceTerm, StepInfo, Window
from .models.denoiser import Conditioning, UNetDenoiser
from .pipeline import GenerateConfig, GenerationResult, GuidedPipeline

__version__ = "0.1.0"

__all__ = [
    "CFG",
    "PAG",
    "SLG",
    "TPG",
    "Branch",
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
]
