"""Default layers per method and architecture (the papers' and references' choices).

UNets (SD1.5, SDXL):

* PAG (Ahn et al. 2024): every self-attention layer of the mid block, on SD1.5 and SDXL
  (diffusers' ``pag_applied_layers="mid"``).
* TPG (Rajabi et al. 2025): on SDXL, transformer blocks 2..9 of ``down_blocks.2.attentions.0``
  and all of ``down_blocks.2.attentions.1`` (``d2.2-9,d3``). The paper gives no SD1.5 layers;
  on other UNets diffguide uses every transformer block of the deepest down block that has
  attention (SD1.5: ``down_blocks.2``), the analogue of the SDXL choice.
* SLG: no preset (the method was published for DiTs); give the layers.

Transformers (``b`` = joint blocks, ``s`` = single-stream blocks; see :mod:`.layers`):

* SLG, SD3/SD3.5: ``b7-9``. diffusers' ``StableDiffusion3Pipeline`` docstring: "Recommended value
  by StabilityAI for Stable Diffusion 3.5 Medium is [7, 8, 9]"; ComfyUI's SkipLayerGuidanceDiT
  node defaults to double layers "7, 8, 9" (and single layers "7, 8, 9", which SD3 lacks).
* SLG, Flux: ``b7-9,s7-9``: ComfyUI's SkipLayerGuidanceDiT defaults, both stacks (diffusers has
  no SLG for Flux). AuraFlow: ``s7-9`` (its 4 joint blocks stop before 7; ComfyUI's single-layer
  default). Qwen-Image: ``b7-9`` (ComfyUI's double-layer default; no Qwen-specific reference).
* PAG, SD3/SD3.5: ``b13``: the example in diffusers' ``StableDiffusion3PAGPipeline`` docstring
  (``pag_applied_layers=["blocks.13"]``). Its *default* ``"blocks.1"`` is not used: as a regex it
  also selects blocks 10..19, eleven blocks, which is not what it says.
* PAG on Flux, AuraFlow, Qwen-Image and TPG on every transformer: no published layers exist
  (ComfyUI's PAG node does nothing on DiTs; the TPG paper and code are SDXL-only). diffguide uses
  the SLG blocks of the family, the blocks that the SD3.5 and ComfyUI references single out for
  perturbation guidance: SD3/Flux/Qwen-Image ``b7-9``, AuraFlow ``s7-9``. A choice, not a
  reference: tune it per model.

A preset that names blocks a (small) model does not have is a one-line error asking for layers.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..errors import LayerSpecError
from .layers import attention_units, block_stacks

Method = Literal["pag", "tpg", "slg"]

# transformer class -> (family, {method: preset})
DIT_PRESETS: dict[str, tuple[str, dict[str, str]]] = {
    "SD3Transformer2DModel": ("SD3", {"slg": "b7-9", "pag": "b13", "tpg": "b7-9"}),
    "FluxTransformer2DModel": ("Flux", {"slg": "b7-9,s7-9", "pag": "b7-9", "tpg": "b7-9"}),
    "AuraFlowTransformer2DModel": ("AuraFlow", {"slg": "s7-9", "pag": "s7-9", "tpg": "s7-9"}),
    "QwenImageTransformer2DModel": ("Qwen-Image", {"slg": "b7-9", "pag": "b7-9", "tpg": "b7-9"}),
}


def default_layers(model: nn.Module, method: Method) -> str:
    """The preset layer spec for ``method`` on ``model``."""
    if block_stacks(model):
        return _dit_preset(model, method)
    if method == "slg":
        raise LayerSpecError("SLG has no preset for UNets (it was published for DiTs); give its layers")
    units = attention_units(model)
    if method == "pag":
        return "mid"
    down = [u for u in units if u.alias.startswith("d")]
    if not down:
        raise LayerSpecError("this model has no attention in its down path; give TPG layers explicitly")
    by_alias = {u.alias: u for u in down}
    if "d2" in by_alias and "d3" in by_alias and by_alias["d2"].blocks >= 10:
        return "d2.2-9,d3"
    deepest = down[-1].name.split(".attentions.")[0]
    return deepest


def _dit_preset(model: nn.Module, method: Method) -> str:
    cls = type(model).__name__
    if cls not in DIT_PRESETS:
        raise LayerSpecError(f"no {method.upper()} preset for {cls}; give its layers (e.g. b7-9)")
    family, presets = DIT_PRESETS[cls]
    preset = presets[method]
    counts = {s.letter: s.blocks for s in block_stacks(model)}
    for item in preset.split(","):
        letter, last = item[0], int(item.split("-")[-1].lstrip("bs"))
        if counts.get(letter, 0) <= last:
            raise LayerSpecError(
                f"the {family} {method.upper()} preset '{preset}' needs block {item[0]}{last}, but this model "
                f"has {counts.get(letter, 0)} {'joint' if letter == 'b' else 'single-stream'} blocks; give its layers"
            )
    return preset
