"""Per-family validation defaults: ONE table, each row with its source.

A validation prompt that does not set steps, guidance or the scheduler gets its family's row
(``architecture`` as the manifest records it: ``sd15``, ``sdxl``, ``sd3``, ``sd3.5``,
``flux-dev``, ``flux-schnell``, ``qwen-image``, ``auraflow``). The size defaults to the model's
native size. docs/validation.md prints this table (:func:`markdown_table`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..guidance.base import GuidanceTerm
from ..guidance.cfg import CFG
from ..guidance.embedded import EmbeddedGuidance
from ..guidance.slg import SLG


@dataclass(frozen=True)
class FamilyDefaults:
    """What a validation sample of one family runs with when the prompt file says nothing."""

    steps: int
    cfg: float | None  # None: no CFG term (guidance-distilled models)
    embedded: float | None = None  # Flux dev: the embedded guidance scale
    slg: float | None = None  # SD3.5: Skip Layer Guidance scale on the family's preset layers
    scheduler: str = "euler"
    source: str = ""
    cfg_renorm: bool = False  # Qwen-Image's true CFG keeps the conditional prediction's norm

    def guidance(self) -> tuple[GuidanceTerm, ...]:
        terms: list[GuidanceTerm] = []
        if self.cfg is not None:
            terms.append(CFG(self.cfg, renorm=self.cfg_renorm))
        if self.slg is not None:
            terms.append(SLG(self.slg))
        if self.embedded is not None:
            terms.append(EmbeddedGuidance(self.embedded))
        return tuple(terms)


#: architecture -> defaults. The one table (docs/validation.md quotes it).
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "sd15": FamilyDefaults(
        30,
        7.5,
        source="diffusers StableDiffusionPipeline guidance_scale 7.5; 30 steps: seed 002's speed range (20-30)",
    ),
    "sdxl": FamilyDefaults(
        30,
        7.0,
        source="seed 002 (SDXL CFG 7-9, 20-30 steps) and issue #15; diffusers' own default is 5.0 / 50",
    ),
    "sd3": FamilyDefaults(
        28, 7.0, source="diffusers StableDiffusion3Pipeline defaults (guidance_scale 7.0, 28 steps)"
    ),
    "sd3.5": FamilyDefaults(
        28,
        4.5,
        slg=2.8,
        source="SD3.5 model card (CFG 4.5) and seed 002 (4-7); SLG 2.8 on b7-9, steps 1..5 of 28: "
        "diffusers StableDiffusion3Pipeline skip_guidance_layers [7, 8, 9] (Stability's recommendation)",
    ),
    "flux-dev": FamilyDefaults(
        28,
        None,
        embedded=3.5,
        source="diffusers FluxPipeline defaults (28 steps, guidance_scale 3.5, no true CFG)",
    ),
    "flux-schnell": FamilyDefaults(
        4, None, source="FLUX.1 [schnell] model card: 4 steps, guidance 0 (no guidance embedding, no CFG)"
    ),
    "qwen-image": FamilyDefaults(
        50,
        4.0,
        cfg_renorm=True,
        source="diffusers QwenImagePipeline defaults (true_cfg_scale 4.0 with its norm rescale, 50 steps)",
    ),
    "auraflow": FamilyDefaults(
        50, 3.5, source="diffusers AuraFlowPipeline defaults (guidance_scale 3.5, 50 steps)"
    ),
}


def family_defaults(name: str) -> FamilyDefaults:
    """The row for ``name``, or a one-line error listing the known ones."""
    if name not in FAMILY_DEFAULTS:
        raise ConfigError(f"unknown family default '{name}'; one of: {', '.join(FAMILY_DEFAULTS)}")
    return FAMILY_DEFAULTS[name]


def markdown_table() -> str:
    """The table as markdown (docs/validation.md)."""
    rows = [
        "| family | steps | CFG | embedded | SLG | scheduler | source |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in FAMILY_DEFAULTS.items():
        cells = [name, d.steps, d.cfg or "off", d.embedded or "-", d.slg or "-", d.scheduler, d.source]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)
