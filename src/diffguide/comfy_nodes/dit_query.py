"""Query edits (SEG's blur, the uncond query shuffle) inside ComfyUI's DiT blocks, the branch's rows only.

ComfyUI's DiTs project the image tokens' queries with a linear layer whose output *starts* with
the queries: SD3's MMDiT and Flux's double blocks a fused ``qkv`` (q, k, v), Flux's single blocks
``linear1`` (q, k, v, then the MLP input; over the ``[text, image]`` sequence), Qwen-Image a plain
``to_q``. diffusers' twins compute the same queries with a ``to_q`` projection, where diffguide's
engine edits them (:mod:`diffguide.perturb.query`): before the q-norm and RoPE. The pack edits
the same numbers: a forward hook on that linear layer replaces the query features of the
branch's rows, image tokens only, and leaves keys, values, the MLP input and the text tokens as
they were. So a node's branch equals the engine's.

The hook knows its rows from a ``"dit"`` block replacement (chained with any other pack's) that
reads ComfyUI's ``cond_or_uncond`` labels (:func:`~.rows.branch_rows`) and the image span
(``img_slice`` in a single block) while the block runs. The latent grid and the timestep come
from a pre-hook on the diffusion model (its ``x`` and ``timestep``); the query shuffle seeds as
the engine does, ``branch_seed(seed_i, "<branch>/<diffusers attention>/<timestep>")``. Hooks are
installed for one model call and removed in ``finally`` by the caller's ExitStack.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DiffguideError
from ..perturb.base import ForwardContext, branch_seed
from ..perturb.query import token_grid
from ..perturb.query_blur import blur_queries
from ..perturb.query_shuffle import shuffle_queries
from .dit import Replace, _call, image_span
from .rows import branch_rows, per_image, row_images

# edit(image queries of the branch's rows (R, N, C), each row's image, the diffusers attention name)
DitEdit = Callable[[Tensor, list[int], str], Tensor]


@dataclass(frozen=True)
class Site:
    """Where a block's image queries come out: the linear layer, its query width, the engine's name."""

    path: str  # under the diffusion model
    diffusers: str  # the diffusers attention module (the query shuffle's seed key)
    width: int  # the leading output features that are the queries


@dataclass
class CallInfo:
    """The current model call's latent (h, w) and timestep (recorded by a pre-hook)."""

    size: tuple[int, int] = (0, 0)
    timestep: float = 0.0


def _width(module: nn.Module, parts: int) -> int:
    out = getattr(module, "out_features", None)
    if not isinstance(out, int):
        raise DiffguideError(f"{type(module).__name__} is not a linear projection; cannot find its queries")
    return out // parts


def sites(dm: nn.Module, block: str, index: int) -> list[Site]:
    """The image-query projections of ComfyUI's DiT block ``(block, index)``."""
    modules = dict(dm.named_modules())
    cls = {c.__name__ for c in type(dm).__mro__}
    found: list[Site] = []
    if "MMDiT" in cls:
        for attn in ("attn", "attn2"):
            path = f"joint_blocks.{index}.x_block.{attn}.qkv"
            if path in modules:
                found.append(Site(path, f"transformer_blocks.{index}.{attn}", _width(modules[path], 3)))
    elif "Flux" in cls and block == "double_block":
        path = f"double_blocks.{index}.img_attn.qkv"
        found.append(Site(path, f"transformer_blocks.{index}.attn", _width(modules[path], 3)))
    elif "Flux" in cls:
        path = f"single_blocks.{index}.linear1"
        hidden = int(modules[f"single_blocks.{index}"].hidden_size)  # type: ignore[arg-type]
        found.append(Site(path, f"single_transformer_blocks.{index}.attn", hidden))
    elif "QwenImageTransformer2DModel" in cls:
        path = f"transformer_blocks.{index}.attn.to_q"
        found.append(Site(path, f"transformer_blocks.{index}.attn", _width(modules[path], 1)))
    if not found:
        raise DiffguideError(f"no query projection found in {type(dm).__name__}'s {block} {index}")
    return found


def blur_dit(sigma: float, info: CallInfo) -> DitEdit:
    """SEG: the image queries blurred on the latent's token grid (diffguide's kernel)."""

    def edit(q: Tensor, images: list[int], name: str) -> Tensor:
        return blur_queries(q, token_grid(q.shape[1], info.size), sigma)

    return edit


def shuffle_dit(branch: str, strength: float, ctx: ForwardContext, info: CallInfo) -> DitEdit:
    """The uncond query shuffle: one permutation per image, attention and timestep (the engine's seeds)."""

    def edit(q: Tensor, images: list[int], name: str) -> Tensor:
        key = f"{branch}/{name}/{info.timestep:.3f}"

        def draw(i: int) -> Tensor:
            gen = torch.Generator().manual_seed(branch_seed(ctx.seeds[i], key))
            return torch.randperm(q.shape[1], generator=gen)

        return shuffle_queries(q, per_image(images, draw), strength)

    return edit


def install_call_info(stack: ExitStack, dm: nn.Module, info: CallInfo) -> None:
    """Record each diffusion-model call's latent (h, w) (its ``x``'s last two sides) and timestep."""

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        info.size = (int(x.shape[-2]), int(x.shape[-1]))
        info.timestep = float(t.flatten()[0]) if isinstance(t, Tensor) else float(t or 0.0)

    stack.callback(dm.register_forward_pre_hook(pre, with_kwargs=True).remove)


# the rows, their images and the image span of the block running now (None: not the branch's call)
Now = tuple[slice, list[int], Callable[[int], tuple[int, int]]]


def _edit_hook(site: Site, current: list[Now | None], edit: DitEdit) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Any:
        now = current[-1] if current else None
        if now is None or out.ndim != 3:
            return None
        rows, images, span = now
        start, stop = span(out.shape[1])
        out = out.clone()
        q = out[rows, start:stop, : site.width]
        out[rows, start:stop, : site.width] = edit(q, images, site.diffusers)
        return out

    return hook


def armed_block(branch: str, single: bool, previous: Replace | None) -> tuple[Replace, list[Now | None]]:
    """A ``"dit"`` replacement that, while the block runs, holds the branch's rows, their images
    and the image span on top of the returned stack (None when the call has none of its rows)."""
    current: list[Now | None] = []

    def replace(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        options = args.get("transformer_options") or {}
        n = args["img"].shape[0]
        rows = branch_rows(options, branch, n)
        if rows is None:
            current.append(None)
        else:
            span = image_span(args, True) if single else (lambda length: (0, length))
            current.append((rows, row_images(options, rows, n), span))
        try:
            return _call(previous, args, extra)
        finally:
            current.pop()

    return replace, current


def query_block(
    stack: ExitStack,
    dm: nn.Module,
    key: tuple[str, int],
    branch: str,
    edit: DitEdit,
    previous: Replace | None,
) -> Replace:
    """Hooks on block ``key``'s query projections and the ``"dit"`` replacement that arms them."""
    block, index = key
    replace, current = armed_block(branch, block == "single_block", previous)
    modules = dict(dm.named_modules())
    for site in sites(dm, block, index):
        handle = modules[site.path].register_forward_hook(_edit_hook(site, current, edit))
        stack.callback(handle.remove)
    return replace
