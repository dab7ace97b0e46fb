"""PAG and TPG inside ComfyUI's DiT blocks (Flux, Qwen-Image, SD3's MMDiT), perturbed rows only.

Both are ComfyUI ``"dit"`` block replacements (``patches_replace["dit"][("double_block", i)]`` /
``("single_block", i)``), set on a copy of the model options for one model call and chained with
any replacement another node set for the same block:

* **Identity attention (PAG).** The replacement calls the block with a copy of its
  ``transformer_options`` holding an ``optimized_attention_override`` (ComfyUI's attention
  override hook, honoured by every attention backend through ``wrap_attn``). The override runs
  the attention of the other rows as before (through any override already there) and, on the
  branch's rows, the identity map: ``"diagonal"`` adds a mask that lets image token i attend only
  to itself among the image tokens (text tokens stay visible; diffusers' SD3 PAG, diffguide's
  default), ``"value"`` returns the value projection ``V`` itself. ComfyUI's DiTs order the joint
  sequence ``[text, image]``; a single-stream block (Flux) gets the split from
  ``transformer_options["img_slice"]``; an image-only attention (SD3.5's second attention) is
  ``V`` in both readings.
* **Token shuffle (TPG).** The replacement permutes the image tokens entering the block on the
  branch's rows (text tokens untouched; in a Flux single block only the image part of the
  concatenated sequence), one permutation per image and block call from diffguide's per-image
  generator, as diffguide's TPG on a DiT.

Rows come from ComfyUI's ``cond_or_uncond`` labels (:func:`~.rows.branch_rows`), so a
memory-driven sub-batch split stays correct.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..errors import DiffguideError
from ..perturb.base import ForwardContext, put_rows, take_rows
from ..perturb.joint_identity import _combine, diagonal_mask
from ..perturb.token_shuffle import shuffle_tokens
from .rows import branch_rows, permutations, row_images

Replace = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
OVERRIDE = "optimized_attention_override"


def is_block_key(name: str) -> bool:
    """Whether ``name`` is a DiT block key (``double_block.3``, ``single_block.0``)."""
    block, _, index = name.partition(".")
    return block in ("double_block", "single_block") and index.isdigit()


def _call(previous: Replace | None, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return previous(args, extra) if previous is not None else extra["original_block"](args)


def image_span(args: dict[str, Any], single: bool) -> Callable[[int], tuple[int, int]]:
    """Where the image tokens sit in a joint sequence of length L built by this block."""
    options = args.get("transformer_options") or {}
    if single:
        sl = options.get("img_slice")
        if sl is None:
            raise DiffguideError("identity attention on a single-stream block needs ComfyUI's img_slice")
        n_txt, total = int(sl[0]), int(sl[1])
    else:
        txt = args.get("txt")
        n_txt = int(txt.shape[1]) if isinstance(txt, Tensor) else 0
        total = n_txt + int(args["img"].shape[1])
    n_img = total - n_txt

    def span(length: int) -> tuple[int, int]:
        if length == total:
            return n_txt, total
        if length == n_img:  # image-only attention (SD3.5's attn2)
            return 0, n_img
        raise DiffguideError(f"joint attention of {length} tokens, expected {n_img} image + {n_txt} text")

    return span


def _split_mask(mask: Any, rows: slice, n: int) -> tuple[Any, Any]:
    if isinstance(mask, Tensor) and mask.ndim >= 3 and mask.shape[0] == n:
        return take_rows(mask, rows, n)
    return mask, mask


def _as_4d(mask: Tensor) -> Tensor:
    """ComfyUI's attention mask rule: (L, L) -> (1, 1, L, L); (B, L, L) -> (B, 1, L, L)."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    return mask.unsqueeze(1) if mask.ndim == 3 else mask


def _value_out(v: Tensor, heads: int, skip_reshape: bool, skip_output_reshape: bool) -> Tensor:
    """``V`` in the layout the attention function returns."""
    if not skip_reshape:  # (b, L, h*d), or MMDiT's (b, L, h, d) -> (b, h, L, d)
        v = v.reshape(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
    if skip_output_reshape:
        return v
    return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)


def identity_override(
    rows: slice, semantics: str, span: Callable[[int], tuple[int, int]], previous: Any
) -> Callable[..., Tensor]:
    """An ``optimized_attention_override``: identity attention on ``rows``, the rest unchanged."""

    def override(func: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        call = dict(zip(("q", "k", "v", "heads", "mask"), args, strict=False))
        call.update(kwargs)
        q, k, v, heads = call.pop("q"), call.pop("k"), call.pop("v"), call.pop("heads")
        mask = call.pop("mask", None)
        n = q.shape[0]
        (kq, pq), (kk, pk), (kv, pv) = (take_rows(t, rows, n) for t in (q, k, v))
        keep_mask, p_mask = _split_mask(mask, rows, n)
        skip_reshape = bool(call.get("skip_reshape", False))
        if semantics == "value":
            out_p = _value_out(pv, heads, skip_reshape, bool(call.get("skip_output_reshape", False)))
        else:
            length = q.shape[2] if skip_reshape else q.shape[1]
            diag = diagonal_mask(length, span(length), q)
            combined = _combine(diag, None if p_mask is None else _as_4d(p_mask))
            out_p = func(pq, pk, pv, heads, mask=combined, **call)
        if kq.shape[0] == 0:
            return out_p
        if previous is not None:
            out_keep = previous(func, kq, kk, kv, heads, mask=keep_mask, **call)
        else:
            out_keep = func(kq, kk, kv, heads, mask=keep_mask, **call)
        return put_rows(out_keep, out_p, rows, n)

    return override


def identity_block(branch: str, semantics: str, single: bool, previous: Replace | None) -> Replace:
    """A ``"dit"`` replacement: identity attention in this block on ``branch``'s rows."""

    def replace(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        options = args.get("transformer_options") or {}
        rows = branch_rows(options, branch, args["img"].shape[0])
        if rows is None:
            return _call(previous, args, extra)
        override = identity_override(rows, semantics, image_span(args, single), options.get(OVERRIDE))
        return _call(previous, {**args, "transformer_options": {**options, OVERRIDE: override}}, extra)

    return replace


def shuffle_block(
    branch: str,
    ctx: ForwardContext,
    single: bool,
    previous: Replace | None,
    shared: dict[object, Tensor] | None = None,
) -> Replace:
    """A ``"dit"`` replacement: the image tokens entering this block shuffled on ``branch``'s rows
    (``shared``: one permutation for all of them, see :func:`~.rows.permutations`)."""
    site = object()

    def replace(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        options = args.get("transformer_options") or {}
        img = args["img"]
        rows = branch_rows(options, branch, img.shape[0])
        if rows is None:
            return _call(previous, args, extra)
        start, stop = image_span(args, single)(img.shape[1]) if single else (0, img.shape[1])
        images = row_images(options, rows, img.shape[0])
        perms = permutations(ctx, branch, stop - start, images, shared, site)
        img = img.clone()
        img[rows, start:stop] = shuffle_tokens(img[rows, start:stop], perms.to(img.device))
        return _call(previous, {**args, "img": img}, extra)

    return replace
