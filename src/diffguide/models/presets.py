"""Default layers per method and architecture (the papers' choices).

* PAG (Ahn et al. 2024): every self-attention layer of the mid block, on SD1.5 and SDXL
  (diffusers' ``pag_applied_layers="mid"``).
* TPG (Rajabi et al. 2025): on SDXL, transformer blocks 2..9 of ``down_blocks.2.attentions.0``
  and all of ``down_blocks.2.attentions.1`` (``d2.2-9,d3``). The paper gives no SD1.5 layers;
  on other UNets diffguide uses every transformer block of the deepest down block that has
  attention (SD1.5: ``down_blocks.2``), the analogue of the SDXL choice.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..errors import LayerSpecError
from .layers import attention_units

Method = Literal["pag", "tpg"]


def default_layers(model: nn.Module, method: Method) -> str:
    """The preset layer spec for ``method`` on ``model``."""
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
