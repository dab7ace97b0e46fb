"""SLG / LayerSkip modes ``attn`` and ``ff`` inside ComfyUI's DiT blocks, the branch's rows only.

diffguide's engine (:mod:`diffguide.perturb.block_skip`) zeroes, on the branch's rows, the
output of every attention module of a selected block (``attn``: both streams, after their
output projections; SD3.5's ``attn2`` too) or of every feed-forward (``ff``: image and text
MLPs; a Flux single block's MLP branch), so the sub-layer adds nothing to the residual stream.
The pack zeroes the same numbers in ComfyUI's modules with forward hooks, armed by a ``"dit"``
block replacement that knows the rows (:func:`~.dit_query.armed_block`):

* SD3's MMDiT: ``x_block.attn.proj`` / ``attn2.proj`` and ``context_block.attn.proj``;
  ``x_block.mlp`` and ``context_block.mlp``.
* Flux double blocks: ``img_attn.proj`` / ``txt_attn.proj``; ``img_mlp`` / ``txt_mlp``. Flux
  single blocks: the input of ``linear2`` (``[attention, activated MLP]``), its attention part
  or its MLP part (the MLP's activation maps 0 to 0, as diffusers' ``proj_mlp`` zeroed).
* Qwen-Image: the block's ``attn`` (both outputs); ``img_mlp`` / ``txt_mlp``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from torch import Tensor, nn

from ..errors import DiffguideError
from .dit import Replace
from .dit_query import Now, armed_block

_SUBLAYERS: dict[str, dict[str, tuple[str, ...]]] = {  # model -> mode -> module paths in a block
    "MMDiT": {
        "attn": ("x_block.attn.proj", "x_block.attn2.proj", "context_block.attn.proj"),
        "ff": ("x_block.mlp", "context_block.mlp"),
    },
    "Flux": {"attn": ("img_attn.proj", "txt_attn.proj"), "ff": ("img_mlp", "txt_mlp")},
    "QwenImageTransformer2DModel": {"attn": ("attn",), "ff": ("img_mlp", "txt_mlp")},
}
_STACKS = {
    "MMDiT": "joint_blocks",
    "Flux": "double_blocks",
    "QwenImageTransformer2DModel": "transformer_blocks",
}


def _model(dm: nn.Module) -> str:
    names = [c.__name__ for c in type(dm).__mro__ if c.__name__ in _SUBLAYERS]
    if not names:
        raise DiffguideError(f"block skip modes attn/ff do not know ComfyUI's {type(dm).__name__}")
    return names[0]


def _zero_rows(out: Any, rows: slice) -> Any:
    if isinstance(out, tuple):
        return tuple(_zero_rows(o, rows) for o in out)
    if not isinstance(out, Tensor):
        return out
    out = out.clone()
    out[rows] = 0
    return out


def _output_hook(current: list[Now | None]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        now = current[-1] if current else None
        return None if now is None else _zero_rows(out, now[0])

    return hook


def _linear2_hook(current: list[Now | None], hidden: int, mode: str) -> Callable[..., Any]:
    """Flux single block: zero the attention (``[:hidden]``) or MLP part of ``linear2``'s input."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        now = current[-1] if current else None
        if now is None:
            return None
        x = args[0].clone()
        part = slice(None, hidden) if mode == "attn" else slice(hidden, None)
        x[now[0], :, part] = 0
        return (x, *args[1:])

    return hook


def sublayer_skip_block(
    stack: ExitStack, dm: nn.Module, key: tuple[str, int], branch: str, mode: str, previous: Replace | None
) -> Replace:
    """Hooks zeroing block ``key``'s attention or feed-forward outputs on ``branch``'s rows, and the
    ``"dit"`` replacement that arms them."""
    block, index = key
    replace, current = armed_block(branch, block == "single_block", previous)
    modules = dict(dm.named_modules())
    if block == "single_block":
        single = modules[f"single_blocks.{index}"]
        hook = _linear2_hook(current, int(single.hidden_size), mode)  # type: ignore[arg-type]
        stack.callback(single.linear2.register_forward_pre_hook(hook).remove)  # type: ignore[union-attr]
        return replace
    model = _model(dm)
    prefix = f"{_STACKS[model]}.{index}."
    found = [modules[prefix + p] for p in _SUBLAYERS[model][mode] if prefix + p in modules]
    if not found:
        raise DiffguideError(f"block skip mode '{mode}': ComfyUI's {block} {index} has no such sub-module")
    for module in found:
        stack.callback(module.register_forward_hook(_output_hook(current)).remove)
    return replace
