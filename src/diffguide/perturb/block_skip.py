"""Block skip (the perturbation of Skip Layer Guidance), minimal: whole blocks only.

TEMPORARY: the full version (attention-only and feed-forward-only skips, every DiT family,
presets) comes from the h5-dit-perturb branch and replaces this file on merge; the interface
(``BlockSkip(layers, mode="block")``) is the same.

On the branch's rows each selected transformer block is the identity: its outputs are its
inputs (a joint block passes both streams, image and text, through unchanged), as diffusers'
``SD3Transformer2DModel(..., skip_layers=[...])`` does for the ``StableDiffusion3Pipeline``
SLG branch. The block still runs on all rows (other rows are bit-identical to no perturbation).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.layers import select
from .base import ForwardContext

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|joint_transformer_blocks)\.\d+$")
#: Output order of the joint blocks: (encoder_hidden_states, hidden_states).
_JOINT = ("encoder_hidden_states", "hidden_states")


def is_dit_block(name: str, module: nn.Module) -> bool:
    return _BLOCK.match(name) is not None


def _arg(name: str, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs[name] if name in kwargs else (args[index] if index < len(args) else None)


def _replace_rows(out: Any, inp: Any, rows: slice) -> Any:
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return out  # e.g. a last block that returns no text stream
    out = out.clone()
    out[rows] = inp[rows]
    return out


@dataclass(frozen=True)
class BlockSkip:
    """Skip the selected transformer blocks on a branch's rows (``mode="block"`` only here)."""

    layers: str | None = None
    mode: str = "block"

    def __post_init__(self) -> None:
        if self.mode != "block":
            raise ConfigError(f"block skip mode '{self.mode}' is not available in this build (only 'block')")

    def targets(self, model: nn.Module) -> list[str]:
        if self.layers is None:
            raise ConfigError("skip layer guidance needs explicit layers here, e.g. 'transformer_blocks.7-9'")
        return select(model, self.layers, is_dit_block)

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        modules = dict(model.named_modules())

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            sel = ctx.rows_of(branch)
            if sel is None:
                return out
            if isinstance(out, tuple):  # joint block: (encoder_hidden_states, hidden_states)
                ehs = _arg("encoder_hidden_states", 1, args, kwargs)
                hs = _arg("hidden_states", 0, args, kwargs)
                return (_replace_rows(out[0], ehs, sel.rows), _replace_rows(out[1], hs, sel.rows))
            return _replace_rows(out, _arg("hidden_states", 0, args, kwargs), sel.rows)

        handles = []
        try:
            for name in self.targets(model):
                handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
