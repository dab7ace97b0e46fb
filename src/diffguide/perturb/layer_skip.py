"""Layer skip with a UNet default: :class:`~diffguide.perturb.BlockSkip` whose ``layers=None``
means the mid block's transformer blocks on a UNet (SLG itself has no UNet preset) and the
family's SLG preset on a transformer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.layers import is_dit, select
from .block_skip import BlockSkip
from .token_shuffle import is_transformer_block

UNET_DEFAULT = "mid"


@dataclass(frozen=True)
class LayerSkipBlocks(BlockSkip):
    """Skip the selected transformer blocks (or their attention / feed-forward) on the branch's rows."""

    def targets(self, model: nn.Module) -> list[str]:
        if self.layers is None and not is_dit(model):
            return select(model, UNET_DEFAULT, is_transformer_block)
        return super().targets(model)
