"""Block skip: the perturbation of Skip Layer Guidance (SLG; SD3.5, ComfyUI SkipLayerGuidanceDiT).

On the branch's rows, each selected transformer block is skipped in one of three ways:

* ``mode="block"``: the whole block is the identity, ``out = in``; a joint block passes both
  streams through (image and text). This is diffusers' ``SD3Transformer2DModel(...,
  skip_layers=[...])`` (the ``StableDiffusion3Pipeline`` SLG branch) and ComfyUI's SLG node.
* ``mode="attn"``: every attention module of the block outputs zeros (both streams of a joint
  attention; SD3.5's ``attn2`` too), so the attention adds nothing to the residual stream.
* ``mode="ff"``: every feed-forward of the block outputs zeros (``ff`` and ``ff_context``;
  Qwen-Image's ``img_mlp`` / ``txt_mlp``; in a Flux single block the MLP branch ``proj_mlp``).

With zero outputs, ``attn`` + ``ff`` together equal ``block`` wherever the block is a sum of
residual updates (SD3, Flux double, AuraFlow, Qwen-Image). A Flux single block mixes both
through one ``proj_out`` whose bias stays. diffusers' ``LayerSkipConfig(skip_attention=True,
skip_ff=False)`` instead makes the skipped sub-layer return its *input* (an identity sub-layer,
which still adds the normalised input to the residual stream): a different perturbation.

The selected blocks (or sub-modules) run only on the other rows (a sub-batch): the skipped rows
cost nothing there. The other rows equal an unperturbed forward up to the last bits a smaller
batch may change in a matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import ConfigError
from ..models.layers import is_dit
from .base import ForwardContext, first_target, select_targets
from .dit import arg_namer, is_dit_block, row_split_outside, scoped_forward, zeros_like_rows
from .token_shuffle import is_transformer_block

SkipMode = Literal["block", "attn", "ff"]
MODES: tuple[str, ...] = ("block", "attn", "ff")

# what a block returns: the names of its outputs, in order
RETURNS: dict[str, tuple[str, ...]] = {
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "QwenImageTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "AuraFlowJointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "AuraFlowSingleTransformerBlock": ("hidden_states",),
    "SD3SingleTransformerBlock": ("hidden_states",),
    "BasicTransformerBlock": ("hidden_states",),
}
_FF_NAMES = ("proj_mlp",)  # Flux single blocks: the MLP branch


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, (Attention, AttentionModuleMixin))


def _is_ff(name: str, module: nn.Module) -> bool:
    return (
        isinstance(module, FeedForward) or type(module).__name__ == "AuraFlowFeedForward" or name in _FF_NAMES
    )


def _children(block: nn.Module, mode: SkipMode) -> list[nn.Module]:
    """The sub-modules of ``block`` that ``mode`` zeroes (direct children only)."""
    if mode == "attn":
        return [m for m in block.children() if _is_attention(m)]
    return [m for n, m in block.named_children() if _is_ff(n, m)]


# (forward, call on the branch's rows, the other rows' output or None)
Inside = Callable[[Callable[..., Any], dict[str, Any], Any], Any]


def _passthrough(block: nn.Module) -> Inside:
    names = RETURNS[type(block).__name__]

    def inside(forward: Callable[..., Any], call: dict[str, Any], out: Any) -> Any:
        values = tuple(call.get(n) for n in names)
        return values if len(values) > 1 else values[0]

    return inside


def _zeros(forward: Callable[..., Any], call: dict[str, Any], out: Any) -> Any:
    """Zeros shaped like ``out`` (the other rows' output), one per row of the branch."""
    if out is None:  # every row is the branch's: compute once for the shapes
        out = forward(**call)
    return zeros_like_rows(out, call["hidden_states"].shape[0])


@dataclass(frozen=True)
class BlockSkip:
    """Skip the selected transformer blocks (or their attention, or feed-forward) on a branch's rows."""

    layers: str | None = None  # None: the model's SLG preset (see models.presets)
    mode: SkipMode = "block"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"block skip mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    def targets(self, model: nn.Module) -> list[str]:
        return select_targets(
            model, self.layers, "slg", is_dit_block if is_dit(model) else is_transformer_block
        )

    def first_module(self, model: nn.Module) -> str | None:
        """The first selected module in forward order: the branch equals the conditional one before it."""
        return first_target(model, self.targets(model))

    def _check(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        for name in names:
            block = modules[name]
            if self.mode == "block" and type(block).__name__ not in RETURNS:
                known = ", ".join(RETURNS)
                raise ConfigError(
                    f"block skip: unknown block type {type(block).__name__} at {name}; known: {known}"
                )
            if self.mode != "block" and not _children(block, self.mode):
                raise ConfigError(f"block skip mode '{self.mode}': {name} has no such sub-module")

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        names = self.targets(model)
        self._check(model, names)
        modules = dict(model.named_modules())
        targets: list[tuple[nn.Module, Inside]] = []
        for name in names:
            block = modules[name]
            if self.mode == "block":
                targets.append((block, _passthrough(block)))
            else:
                targets.extend((m, _zeros) for m in _children(block, self.mode))
        with ExitStack() as stack:
            for module, inside in targets:
                stack.enter_context(scoped_forward(module, _row_wrapper(branch, ctx, inside)))
            yield


def _row_wrapper(
    branch: str, ctx: ForwardContext, inside: Inside
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        named = arg_namer(original)

        def forward(*args: Any, **kwargs: Any) -> Any:
            sel = ctx.rows_of(branch)
            if sel is None:
                return original(*args, **kwargs)
            call = named(args, kwargs)
            first = next(iter(call))
            fn = original
            if first != "hidden_states":  # nn.Linear(input), AuraFlowFeedForward(x): name it hidden_states
                call = {"hidden_states": call.pop(first), **call}

                def fn(hidden_states: Any, **kw: Any) -> Any:
                    return original(hidden_states, **kw)

            return row_split_outside(fn, call, sel.rows, lambda c, out: inside(fn, c, out), ctx)

        return forward

    return wrap
