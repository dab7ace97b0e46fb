"""More perturbations on ComfyUI's models, the branch's rows only: block skip on a UNet
(LayerSkip), query edits of ``attn1`` (SEG's blur, the uncond query shuffle), and the text-token
shuffle of the model's conditioning (PromptShuffle).

Each is a pair of module hooks installed for one model call (removed in ``finally`` by the
caller's ExitStack). The rows come from ComfyUI's labels in the ``transformer_options`` the
module is called with (:func:`~.rows.branch_rows`); a query edit reads them in a pre-hook on the attention
module, edits the output of its ``to_q`` projection, and forgets them when the attention returns.
The edits are diffguide's own functions (:mod:`diffguide.perturb.query_blur`,
:mod:`~diffguide.perturb.query_shuffle`, :mod:`~diffguide.perturb.text_shuffle`), with the same
per-image generators, so a node's branch equals the diffguide engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DiffguideError
from ..perturb.base import ForwardContext, branch_seed
from ..perturb.query import token_grid
from ..perturb.query_blur import blur_queries
from ..perturb.query_shuffle import shuffle_queries
from ..perturb.text_shuffle import permute_rows
from .rows import branch_rows, per_image, row_images

# edit(queries of the branch's rows (R, N, C), the call's transformer_options, each row's image)
Edit = Callable[[Tensor, dict[str, Any], list[int]], Tensor]


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["x"]  # type: ignore[no-any-return]


def install_skip(stack: ExitStack, block: nn.Module, branch: str) -> None:
    """The branch's rows leave the transformer block as they entered it (kept from before the
    call: blocks may add to their input in place)."""
    saved: list[tuple[slice, Tensor]] = []

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _hidden(args, kwargs)
        rows = branch_rows(kwargs.get("transformer_options") or {}, branch, x.shape[0])
        if rows is not None:
            saved.append((rows, x[rows].clone()))

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Any:
        if not saved:
            return None
        rows, before = saved.pop()
        out = out.clone()
        out[rows] = before
        return out

    for handle in (
        block.register_forward_pre_hook(pre, with_kwargs=True),
        block.register_forward_hook(post, with_kwargs=True),
    ):
        stack.callback(handle.remove)


def install_sublayer_skip(stack: ExitStack, block: nn.Module, branch: str, mode: str) -> None:
    """LayerSkip ``attn`` / ``ff``: the outputs of the block's attentions (``attn1``, ``attn2``) or
    of its feed-forward (``ff``) zeroed on the branch's rows, as diffguide's engine zeroes them."""
    names = ("attn1", "attn2") if mode == "attn" else ("ff",)
    subs = [m for n, m in block.named_children() if n in names]
    if not subs:
        raise DiffguideError(f"block skip mode '{mode}': {type(block).__name__} has no {' or '.join(names)}")
    current: list[slice | None] = []

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        options = kwargs.get("transformer_options") or {}
        current.append(branch_rows(options, branch, _hidden(args, kwargs).shape[0]))

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        current.pop()

    def zero(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Any:
        rows = current[-1] if current else None
        if rows is None:
            return None
        out = out.clone()
        out[rows] = 0
        return out

    handles = [
        block.register_forward_pre_hook(pre, with_kwargs=True),
        block.register_forward_hook(post, with_kwargs=True),
    ]
    handles += [m.register_forward_hook(zero) for m in subs]
    for handle in handles:
        stack.callback(handle.remove)


def install_query_edit(stack: ExitStack, attn: nn.Module, branch: str, edit: Edit) -> None:
    """``edit`` the branch's rows of ``attn.to_q``'s output while ``attn`` runs."""
    to_q = getattr(attn, "to_q", None)
    if not isinstance(to_q, nn.Module):
        raise DiffguideError(f"{type(attn).__name__} has no to_q projection; a query perturbation needs one")
    current: list[tuple[slice, dict[str, Any], list[int]] | None] = []

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        options = kwargs.get("transformer_options") or {}
        n = _hidden(args, kwargs).shape[0]
        rows = branch_rows(options, branch, n)
        current.append(None if rows is None else (rows, options, row_images(options, rows, n)))

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        current.pop()

    def on_q(module: nn.Module, args: tuple[Any, ...], q: Tensor) -> Any:
        now = current[-1] if current else None
        if now is None or q.ndim != 3:
            return None
        rows, options, images = now
        q = q.clone()
        q[rows] = edit(q[rows], options, images)
        return q

    for handle in (
        attn.register_forward_pre_hook(pre, with_kwargs=True),
        attn.register_forward_hook(post, with_kwargs=True),
        to_q.register_forward_hook(on_q),
    ):
        stack.callback(handle.remove)


def latent_grid(options: dict[str, Any], tokens: int) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` queries, from the UNet input's ``original_shape``."""
    shape = options.get("original_shape")
    if not shape:
        raise DiffguideError("a query perturbation needs ComfyUI's original_shape (a UNet model)")
    return token_grid(tokens, (int(shape[-2]), int(shape[-1])))


def blur_edit(sigma: float) -> Edit:
    """SEG: the queries blurred on their token grid (diffguide's kernel)."""

    def edit(q: Tensor, options: dict[str, Any], images: list[int]) -> Tensor:
        return blur_queries(q, latent_grid(options, q.shape[1]), sigma)

    return edit


def query_shuffle_edit(
    branch: str, name: str, strength: float, ctx: ForwardContext, clock: list[float]
) -> Edit:
    """The uncond query shuffle: one permutation per image, layer (diffusers ``name``) and
    timestep (``clock[0]``, the model call's), seeded as diffguide's engine seeds it."""

    def edit(q: Tensor, options: dict[str, Any], images: list[int]) -> Tensor:
        key = f"{branch}/{name}/{clock[0]:.3f}"

        def draw(i: int) -> Tensor:
            return torch.randperm(
                q.shape[1], generator=torch.Generator().manual_seed(branch_seed(ctx.seeds[i], key))
            )

        return shuffle_queries(q, per_image(images, draw), strength)

    return edit


def install_clock(stack: ExitStack, model: nn.Module, clock: list[float]) -> None:
    """Record each diffusion-model call's timestep (ComfyUI passes it second) in ``clock[0]``."""

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("timestep"))
        clock[0] = float(t.flatten()[0]) if isinstance(t, Tensor) else float(t or 0.0)

    stack.callback(model.register_forward_pre_hook(pre, with_kwargs=True).remove)


def install_text_shuffle(stack: ExitStack, model: nn.Module, branch: str, ctx: ForwardContext) -> None:
    """PromptShuffle: the text tokens (``context``) of the branch's rows permuted, per image a fresh
    permutation per model call; a per-token ``attention_mask`` follows them."""

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        context = kwargs.get("context")
        if not isinstance(context, Tensor) or context.ndim != 3:
            raise DiffguideError(
                f"prompt shuffle: {type(module).__name__} was called without a context (B, L, D)"
            )
        options = kwargs.get("transformer_options") or {}
        rows = branch_rows(options, branch, context.shape[0])
        if rows is None:
            return None
        n = context.shape[1]
        images = row_images(options, rows, context.shape[0])
        perms = per_image(images, lambda i: torch.randperm(n, generator=ctx.generator(branch, i)))
        kwargs = {**kwargs, "context": permute_rows(context, rows.start, perms)}
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[1] == n:
            kwargs["attention_mask"] = permute_rows(mask, rows.start, perms)
        return args, kwargs

    stack.callback(model.register_forward_pre_hook(pre, with_kwargs=True).remove)
