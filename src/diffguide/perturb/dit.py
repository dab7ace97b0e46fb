"""Shared machinery for perturbations on transformer (DiT) blocks, any family.

* Module kinds: a DiT *block* is an element of one of the model's block stacks
  (``transformer_blocks.7``); a DiT *attention* is an attention module directly inside one
  (``transformer_blocks.7.attn``, and SD3.5's image-only ``attn2``).
* Row splitting: :func:`row_split` runs a module on all rows and replaces the branch's rows by
  something else (:func:`row_split_outside`: on the other rows only, for block skip), slicing only the per-row arguments it knows by name (the hidden
  states of both streams, their masks, ``temb``), and reassembles outputs that are a tensor or a
  tuple of tensors (joint blocks and joint attention return two).
* :func:`scoped_forward` replaces one module instance's ``forward`` for the ``with`` block and
  puts back exactly what was there (no class is touched).
* :class:`ImageTokens` records, per forward call, how many image tokens the model works on, so
  that a single-stream block that sees ``[text, image]`` concatenated (AuraFlow's single blocks,
  and Flux's single-block attention) can tell the image tokens (the last ones) from the text.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import DiffguideError
from ..models.layers import block_stacks
from .base import ForwardContext, put_rows, take_rows

PER_ROW = ("hidden_states", "encoder_hidden_states", "attention_mask", "encoder_hidden_states_mask", "temb")
_BLOCK = re.compile(r"^(transformer_blocks|joint_transformer_blocks|single_transformer_blocks)\.\d+$")


def is_dit_block(name: str, module: nn.Module) -> bool:
    return _BLOCK.match(name) is not None


def is_dit_attention(name: str, module: nn.Module) -> bool:
    parent, _, _ = name.rpartition(".")
    return _BLOCK.match(parent) is not None and isinstance(module, (Attention, AttentionModuleMixin))


def arg_namer(fn: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]]:
    """A function that turns a call's positional ``args`` into keyword arguments by ``fn``'s
    parameter names (read once, here) and merges them with its ``kwargs``."""
    params = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]

    def named(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > len(params):
            raise DiffguideError(f"cannot name the {len(args)} positional arguments of {fn.__qualname__}")
        return {**dict(zip(params, args, strict=False)), **kwargs}

    return named


def _part(x: Any, rows: slice, n: int, inside: bool) -> Any:
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
        return take_rows(x, rows, n)[1 if inside else 0]
    return x


def rows_of_call(call: dict[str, Any], rows: slice, n: int, inside: bool) -> dict[str, Any]:
    """The call's per-row arguments cut to the rows inside (or outside) ``rows``; others as they are."""
    return {k: _part(v, rows, n, inside) if k in PER_ROW else v for k, v in call.items()}


def merge_rows(keep: Any, inside: Any, rows: slice, n: int) -> Any:
    """Reassemble a module output (tensor, tuple of tensors, None) from its two row parts."""
    if isinstance(keep, tuple):
        return tuple(merge_rows(k, i, rows, n) for k, i in zip(keep, inside, strict=True))
    if keep is None or inside is None:
        return None
    return put_rows(keep, inside, rows, n)


def zeros_like_rows(out: Any, count: int) -> Any:
    """Zeros shaped like ``out`` (tensor / tuple / None) with ``count`` rows."""
    if isinstance(out, tuple):
        return tuple(zeros_like_rows(o, count) for o in out)
    if out is None:
        return None
    return out.new_zeros((count, *out.shape[1:]))


def row_split(
    forward: Callable[..., Any],
    call: dict[str, Any],
    rows: slice,
    inside: Callable[[dict[str, Any], Any], Any],
) -> Any:
    """``forward`` on every row, then the rows inside ``rows`` replaced by ``inside(call, out)``.

    ``call`` holds the named arguments (its ``hidden_states`` fixes the row count n);
    ``inside`` gets the call cut to the branch's rows and ``forward``'s output on those rows.
    The other rows are computed on the full batch, exactly as without the perturbation, so they
    stay bit-identical to an unperturbed forward (a sub-batch could differ in the last bits).
    When every row is inside, ``forward`` is not called and ``inside`` gets None.
    """
    n = call["hidden_states"].shape[0]
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else n
    if start == 0 and stop >= n:
        return inside(call, None)
    out = forward(**call)
    out_inside = inside(rows_of_call(call, rows, n, inside=True), _rows(out, rows, n))
    return merge_rows(_rows(out, rows, n, outside=True), out_inside, rows, n)


def row_split_outside(
    forward: Callable[..., Any],
    call: dict[str, Any],
    rows: slice,
    inside: Callable[[dict[str, Any], Any], Any],
    ctx: ForwardContext,
) -> Any:
    """Like :func:`row_split`, but ``forward`` runs on the rows outside ``rows`` only (a sub-batch):
    for perturbations whose rows never need the module's own output there (block skip).
    ``inside`` gets the call cut to the branch's rows and the outside rows' output (for its
    shapes; None when every row is inside). The outside rows equal an unperturbed forward up to
    the last bits a smaller batch may change in a matrix product. While ``forward`` runs, ``ctx``
    gives every branch's rows in the sub-batch's coordinates (another perturbation inside the
    module edits its own rows)."""
    n = call["hidden_states"].shape[0]
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else n
    if start == 0 and stop >= n:
        return inside(call, None)
    with ctx.sub_batch(rows, n, inside=False):
        keep = forward(**rows_of_call(call, rows, n, inside=False))
    return merge_rows(keep, inside(rows_of_call(call, rows, n, inside=True), keep), rows, n)


def _rows(out: Any, rows: slice, n: int, outside: bool = False) -> Any:
    if isinstance(out, tuple):
        return tuple(_rows(o, rows, n, outside) for o in out)
    if out is None:
        return None
    return take_rows(out, rows, n)[0 if outside else 1]


@contextmanager
def scoped_forward(
    module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replace ``module.forward`` (this instance only) by ``make(original_forward)``; restore on exit."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = make(module.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            module.__dict__["forward"] = previous
        else:
            del module.forward


class ImageTokens:
    """How many image tokens the current forward call of a DiT works on (recorded by a pre-hook)."""

    def __init__(self) -> None:
        self.count: int | None = None

    def hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        if h.ndim == 4:  # (B, C, H, W): SD3, AuraFlow patchify inside
            p = int(getattr(model.config, "patch_size", 1))
            self.count = (h.shape[-2] // p) * (h.shape[-1] // p)
        else:  # (B, N, C): Flux, Qwen-Image take packed tokens
            self.count = h.shape[1]

    def image_span(self, length: int) -> tuple[int, int]:
        """(start, stop) of the image tokens in a sequence of ``length`` tokens laid out [text, image]."""
        if self.count is None or self.count >= length:
            return 0, length
        return length - self.count, length

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        handle = model.register_forward_pre_hook(self.hook, with_kwargs=True) if block_stacks(model) else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            self.count = None
