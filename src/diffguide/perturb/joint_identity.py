"""Identity attention for transformer (joint / single-stream) attention: PAG on DiTs.

A DiT attention layer attends over one sequence that holds the image tokens and (in joint and
single-stream blocks) the text tokens. "The identity attention map" has two readings, both
offered, named by ``semantics``:

* ``"diagonal"`` -- diffusers' ``StableDiffusion3PAGPipeline`` (``PAGJointAttnProcessor2_0``):
  an additive mask sets image->image scores to -inf off the diagonal, so image token i attends
  to itself and to every text token; image->text and text->all attention are kept::

      out = softmax(Q K^T / sqrt(d) + M) V,   M[i, j] = -inf for image i != image j, else 0

* ``"value"`` -- diffusers' modular PAG guider and the "attention output = V" reading of the
  paper: the whole joint map is the identity, every token (image and text) outputs its own value
  projection, ``out = V`` (then each stream's output projection, as usual).

For an image-only attention (SD3.5's ``attn2``) both readings are ``out = V``.

The layer's own processor does everything else (projections, qk-norm, rotary embeddings, text
masks, output projections): the perturbation only changes the call to
``torch.nn.functional.scaled_dot_product_attention`` it makes for the branch's rows, through a
:class:`torch.overrides.TorchFunctionMode` active during that call only. A processor that never
calls it (another attention backend) is an error, never a silent no-op.

Token layout: SD3's ``JointAttnProcessor2_0`` orders the joint sequence [image, text]; Flux,
AuraFlow and Qwen-Image order it [text, image]; a single-stream attention (Flux single blocks,
AuraFlow single blocks) sees [text, image] concatenated, the image tokens last (their count is
recorded from the model's input, see :class:`~diffguide.perturb.dit.ImageTokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError, DiffguideError
from .base import ForwardContext
from .dit import ImageTokens, arg_namer, row_split, scoped_forward

Semantics = Literal["diagonal", "value"]
SEMANTICS: tuple[str, ...] = ("diagonal", "value")

# CompactJointAttnProcessor: JointAttnProcessor2_0 with SD3 text compaction's key bias (sd3_compact)
IMAGE_FIRST = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "CompactJointAttnProcessor")
TEXT_FIRST = (
    "FluxAttnProcessor",
    "FluxAttnProcessor2_0",
    "FusedFluxAttnProcessor2_0",
    "QwenDoubleStreamAttnProcessor2_0",
    "AuraFlowAttnProcessor2_0",
    "FusedAuraFlowAttnProcessor2_0",
)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ConfigError(
            f"identity attention semantics must be one of {', '.join(SEMANTICS)}, got {semantics!r}"
        )


def diagonal_mask(length: int, span: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """The additive (1, 1, L, L) mask: -inf between different image tokens (``span``), 0 elsewhere."""
    start, stop = span
    mask = torch.zeros((length, length), dtype=like.dtype, device=like.device)
    block = mask[start:stop, start:stop]
    block.fill_(float("-inf"))
    block.fill_diagonal_(0)
    return mask[None, None]


def _combine(mask: torch.Tensor, existing: torch.Tensor | None) -> torch.Tensor:
    if existing is None:
        return mask
    if existing.dtype == torch.bool:
        return torch.where(existing, mask, torch.tensor(float("-inf"), dtype=mask.dtype, device=mask.device))
    return existing + mask


class ScoreMode(TorchFunctionMode):
    """Changes every self-attention call to scaled_dot_product_attention made while active."""

    def __init__(self, semantics: Semantics, span: Callable[[int], tuple[int, int]]) -> None:
        super().__init__()
        self.semantics, self.span, self.calls = semantics, span, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
        q, v = call["query"], call["value"]
        if q.shape[-2] != v.shape[-2]:  # cross-attention (e.g. an IP-adapter branch): untouched
            return func(**call)
        self.calls += 1
        if self.semantics == "value":
            return v
        call["attn_mask"] = _combine(
            diagonal_mask(q.shape[-2], self.span(q.shape[-2]), q), call.get("attn_mask")
        )
        return func(**call)


def _span_of(
    attn: nn.Module, call: dict[str, Any], tokens: ImageTokens, semantics: Semantics
) -> Callable[[int], tuple[int, int]]:
    """Where the image tokens sit in the joint sequence this attention call builds."""
    hs, ehs = call["hidden_states"], call.get("encoder_hidden_states")
    if ehs is None:
        return tokens.image_span
    n_img, n_txt = hs.shape[1], ehs.shape[1]
    name = type(getattr(attn, "processor", None)).__name__
    if name in IMAGE_FIRST:
        span = (0, n_img)
    elif name in TEXT_FIRST or semantics == "value":
        span = (n_txt, n_txt + n_img)
    else:
        raise DiffguideError(
            f"identity attention 'diagonal' does not know the token order of processor {name}; "
            f"use semantics 'value' or one of {', '.join(IMAGE_FIRST + TEXT_FIRST)}"
        )

    def fixed(length: int) -> tuple[int, int]:
        if length != n_img + n_txt:
            raise DiffguideError(f"joint attention of {length} tokens, expected {n_img} image + {n_txt} text")
        return span

    return fixed


def _perturbed(
    attn: nn.Module,
    original: Callable[..., Any],
    call: dict[str, Any],
    tokens: ImageTokens,
    semantics: Semantics,
) -> Any:
    mode = ScoreMode(semantics, _span_of(attn, call, tokens, semantics))
    with mode:
        out = original(**call)
    if mode.calls == 0:
        raise DiffguideError(
            f"identity attention: {type(attn).__name__} with processor {type(attn.processor).__name__} made no "
            "call to torch's scaled_dot_product_attention (another attention backend?); use the native backend"
        )
    return out


@contextmanager
def install_joint_identity(
    model: nn.Module, names: list[str], semantics: Semantics, branch: str, ctx: ForwardContext
) -> Iterator[None]:
    """Identity attention on the attention modules ``names`` of DiT ``model``, rows of ``branch``."""
    check_semantics(semantics)
    modules = dict(model.named_modules())
    tokens = ImageTokens()

    def make(attn: nn.Module) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            named = arg_namer(original)

            def forward(*args: Any, **kwargs: Any) -> Any:
                sel = ctx.rows_of(branch)
                if sel is None:
                    return original(*args, **kwargs)
                call = named(args, kwargs)
                n = call["hidden_states"].shape[0]

                def inside(c: dict[str, Any], _: Any) -> Any:
                    with ctx.sub_batch(sel.rows, n, inside=True):  # other perturbations: these rows only
                        return _perturbed(attn, original, c, tokens, semantics)

                return row_split(original, call, sel.rows, inside)

            return forward

        return wrap

    with ExitStack() as stack:
        stack.enter_context(tokens.recording(model))
        for name in names:
            stack.enter_context(scoped_forward(modules[name], make(modules[name])))
        yield
