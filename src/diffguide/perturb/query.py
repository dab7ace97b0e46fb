"""Perturbations of self-attention *queries*, on one branch's rows (SEG's blur, the query shuffle).

The query of an attention layer is the output of its ``to_q`` projection, (R, N, C) before the
split into heads. :func:`install_query_edit` wraps ``to_q`` of each selected attention module
(this instance's ``forward`` only, restored on exit): the projection runs on every row as usual,
then the branch's rows of its output are replaced by ``edit(queries, call)``. Keys, values and
the other rows are untouched, and every attention processor that calls ``to_q`` (diffusers'
UNet and DiT processors) sees the edited queries. A selected layer without a ``to_q``
projection is an error, never a silent no-op; fused QKV projections (``fuse_qkv_projections``)
bypass ``to_q`` and are not supported.

:class:`LatentGrid` records, per model call, what a query edit needs about the image: the
latent's (height, width) (from a (B, C, H, W) input, Flux's ``img_ids`` or Qwen-Image's
``img_shapes``), and the call's timestep. :func:`token_grid` maps a layer's token count to its
(h, w) grid: the latent grid halved (rounding up, as a stride-2 convolution) until it has that
many tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import DiffguideError
from .base import BranchRows, ForwardContext, put_rows, take_rows
from .dit import arg_namer, scoped_forward

# edit(queries of the branch's rows (R, N, C), the rows, the layer's name) -> edited (R, N, C)
QueryEdit = Callable[[torch.Tensor, BranchRows, str], torch.Tensor]


def is_self_attention_module(name: str, module: nn.Module) -> bool:
    """An attention module whose queries come from the image tokens (not a UNet cross-attention)."""
    if isinstance(module, Attention):
        return not module.is_cross_attention
    return isinstance(module, AttentionModuleMixin)


def _halved(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The latent grid halved (rounding up) until it has at most ``tokens`` cells."""
    h, w = latent
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def token_grid(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` image tokens at some depth of a model whose latent is ``latent``."""
    h, w = _halved(tokens, latent)
    if h * w != tokens:
        raise DiffguideError(
            f"cannot lay {tokens} query tokens out on a grid of the {latent[0]}x{latent[1]} latent"
        )
    return h, w


@dataclass
class LatentGrid:
    """The latent (height, width) and timestep of the current model call (recorded by a pre-hook)."""

    size: tuple[int, int] | None = None
    timestep: float = 0.0
    names: Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]] | None = field(
        default=None, repr=False
    )

    def hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.names is None:
            self.names = arg_namer(model.forward)
        call = self.names(args, kwargs)
        x = next(iter(call.values()))
        ids = call.get("img_ids")
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self.size = (int(x.shape[-2]), int(x.shape[-1]))
        elif isinstance(ids, torch.Tensor):  # Flux: (N, 3) ids (0, row, col) of the packed tokens
            ids = ids[0] if ids.ndim == 3 else ids
            self.size = (int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1)
        elif call.get("img_shapes"):  # Qwen-Image: [[(frames, rows, cols)]] of the packed tokens
            _, rows, cols = call["img_shapes"][0][0]
            self.size = (int(rows), int(cols))
        else:
            self.size = None
        t = call.get("timestep")
        self.timestep = float(t.flatten()[0].item()) if isinstance(t, torch.Tensor) else float(t or 0.0)

    def grid(self, tokens: int) -> tuple[int, int]:
        if self.size is None:
            raise DiffguideError(
                "a query perturbation needs the latent grid; this model's input does not give it"
            )
        return token_grid(tokens, self.size)

    def image_span(self, tokens: int) -> tuple[int, int]:
        """(start, stop) of the image tokens among ``tokens`` queries: all, or the last h*w ([text, image])."""
        if self.size is None:
            return 0, tokens
        h, w = _halved(tokens, self.size)
        return tokens - h * w, tokens

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.size, self.names = None, None


def _wrap_to_q(name: str, branch: str, ctx: ForwardContext, edit: QueryEdit) -> Any:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            sel = ctx.rows_of(branch)
            if sel is None or not isinstance(out, torch.Tensor) or out.ndim != 3:
                return out
            n = out.shape[0]
            keep, rows = take_rows(out, sel.rows, n)
            edited = edit(rows, sel, name)
            return edited if keep.shape[0] == 0 else put_rows(keep, edited, sel.rows, n)

        return forward

    return wrap


@contextmanager
def install_query_edit(
    model: nn.Module, names: list[str], branch: str, ctx: ForwardContext, edit: QueryEdit
) -> Iterator[None]:
    """Edit the queries of the attention modules ``names`` on the rows of ``branch``."""
    modules = dict(model.named_modules())
    with ExitStack() as stack:
        for name in names:
            to_q = getattr(modules[name], "to_q", None)
            if not isinstance(to_q, nn.Module):
                raise DiffguideError(
                    f"{name} has no to_q projection (fused QKV?); a query perturbation needs one"
                )
            stack.enter_context(scoped_forward(to_q, _wrap_to_q(name, branch, ctx, edit)))
        yield
