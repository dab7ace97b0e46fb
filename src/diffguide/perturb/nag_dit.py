"""NAG on transformers with joint attention (SD3/SD3.5, Flux), after the official implementation.

The official NAG pipelines for SD3 and Flux (``NAGJointAttnProcessor2_0``,
``NAGFluxAttnProcessor2_0``) run the negative prompt as a second *text stream* next to the
conditional rows, through every block:

* joint (dual-stream) attention: the image queries, keys and values of a conditional row are
  used twice, once with the prompt's text tokens (``z+``: the row itself) and once with the
  negative prompt's (``z-``); the image output becomes ``nag_mix(z+, z-)`` before the output
  projection; the negative text tokens take their own attention output and go on through the
  block's text stream;
* Flux's single-stream blocks: ``[negative text, image]`` runs as a row of its own (the image
  tokens copied from the conditional row when the single blocks start); after each attention the
  image part of both rows becomes the mixed output;
* the negative rows' adaLN modulation: Flux, the negative prompt's pooled embedding (the text
  stream and the single blocks); SD3, the prompt's (its pipeline pools the positive prompt for
  them); the image stream of a joint block always uses the conditional row's;
* the mix: SD3 ``nag_mix`` with L1 norms (as the UNet's), Flux with L2 norms and no epsilon
  (the official Flux processor's ``torch.norm(p=2)``).

Here the negative text stream is m extra rows appended to the model call (one per conditional
row; :attr:`ForwardContext.appended`): the model's own blocks compute them, the hooks of this
module only copy image inputs into them and mix outputs, so one forward call does everything.
An extra row's image stream is never read in a joint block (its attention takes the
conditional row's image input), so its value there does not matter.

Rows: NAG acts on the conditional rows only (the official SD3 NAG+PAG processor leaves the
perturbed branch's rows plain); the unconditional rows and every perturbed branch's rows run
as without NAG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DiffguideError
from .base import ForwardContext
from .dit import arg_namer, scoped_forward

#: the model arguments that hold one entry per row (extended by the appended rows)
_PER_ROW = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def nag_mix_l2(pos: Tensor, neg: Tensor, scale: float, tau: float, alpha: float) -> Tensor:
    """The official Flux NAG mix: extrapolate, clip the L2 norm ratio at ``tau``, blend (no epsilon)."""
    guided = pos * scale - neg * (scale - 1.0)
    ratio = torch.linalg.vector_norm(guided, dim=-1, keepdim=True) / torch.linalg.vector_norm(
        pos, dim=-1, keepdim=True
    )
    guided = guided * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guided * alpha + pos * (1.0 - alpha)


def is_flux(model: nn.Module) -> bool:
    return type(model).__name__ == "FluxTransformer2DModel"


def is_joint_dit(model: nn.Module) -> bool:
    return type(model).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def has_text_stream(module: nn.Module) -> bool:
    """A joint attention (it projects the text tokens itself): SD3's ``attn``, Flux's dual ``attn``."""
    return getattr(module, "add_k_proj", None) is not None


def cond_rows(ctx: ForwardContext, branch: str) -> list[int]:
    """The rows of the call that are the conditional branch's own: NAG's rows less every other
    branch's (its scope lists the prompt rows of perturbed branches too)."""
    sel = ctx.rows_of(branch)
    if sel is None:
        return []
    rows = set(range(sel.rows.start or 0, sel.rows.stop))
    for name, other in ctx.rows.items():
        if name != branch:
            rows -= set(range(other.rows.start or 0, other.rows.stop))
    return sorted(rows)


@dataclass
class _Run:
    """Per forward call: the appended rows' bookkeeping (shared by the hooks)."""

    text_len: int = 0
    mixing: list[int] = field(default_factory=list)  # ids of joint attentions inside their call


class NagDiT:
    """Installs NAG on one SD3/Flux transformer for one run (see the module docstring)."""

    def __init__(
        self, model: nn.Module, targets: list[str], branch: str, ctx: ForwardContext, nag: Any
    ) -> None:
        self.model, self.targets, self.branch, self.ctx, self.nag = model, targets, branch, ctx, nag
        self.flux = is_flux(model)
        self.run = _Run()

    # -- the rows -------------------------------------------------------------------------------
    def _where(self, n: int) -> tuple[list[int], int] | None:
        """(conditional rows, first appended row) when this call of n rows holds the appended rows."""
        appended = self.ctx.appended
        if appended is None or appended[0] != n:
            return None
        rows = cond_rows(self.ctx, self.branch)
        if len(rows) != appended[1]:
            raise DiffguideError(f"NAG: {len(rows)} conditional rows but {appended[1]} appended rows")
        return rows, n - appended[1]

    def _mix(self, pos: Tensor, neg: Tensor) -> Tensor:
        from .nag_attention import nag_mix

        scale, tau, alpha = self.nag.scale, self.nag.tau, self.nag.alpha
        return nag_mix_l2(pos, neg, scale, tau, alpha) if self.flux else nag_mix(pos, neg, scale, tau, alpha)

    # -- the model: append the negative text stream --------------------------------------------
    def _model_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        named = arg_namer(type(self.model).forward.__get__(self.model))

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = named(args, kwargs)
            n = call["hidden_states"].shape[0]
            rows = cond_rows(self.ctx, self.branch) if self.ctx.appended is None else []
            if not rows:
                return original(**call)
            sel = self.ctx.rows_of(self.branch)
            assert sel is not None
            start = sel.rows.start or 0
            images = [sel.images[r - start] for r in rows]
            index = torch.tensor(rows, device=call["hidden_states"].device)
            extended = {k: self._extend(k, v, n, index, images) for k, v in call.items()}
            self.ctx.appended = (n + len(rows), len(rows))
            self.run = _Run(text_len=call["encoder_hidden_states"].shape[1])
            try:
                out = original(**extended)
            finally:
                self.ctx.appended = None
            return _drop_rows(out, n)

        return forward

    def _extend(self, key: str, value: Any, n: int, index: Tensor, images: list[int]) -> Any:
        if key not in _PER_ROW or not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != n:
            return value
        if key == "encoder_hidden_states":
            extra = self._negative(self.ctx.negative, images, value, "text embeddings")
        elif key == "pooled_projections" and self.flux:
            extra = self._negative(self.ctx.negative_pooled, images, value, "pooled embedding")
        else:
            extra = value.index_select(0, index)
        return torch.cat([value, extra])

    @staticmethod
    def _negative(negative: Tensor | None, images: list[int], like: Tensor, what: str) -> Tensor:
        if negative is None:
            raise ConfigError(f"NAG needs the negative prompt's {what}; none was given")
        out = negative[images].to(device=like.device, dtype=like.dtype)
        if out.shape[1:] != like.shape[1:]:
            raise ConfigError(
                f"NAG: the negative prompt's {what} have shape {tuple(out.shape[1:])}, "
                f"the prompt's {tuple(like.shape[1:])}"
            )
        return out

    # -- joint attention: the conditional row's image input for its negative row; the mix --------
    def _joint_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        where = self._where(hidden.shape[0])
        if where is None:
            return None
        rows, first = where
        hidden = hidden.clone()
        hidden[first:] = hidden[rows]
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": hidden}
        else:
            args = (hidden, *args[1:])
        return args, kwargs

    def _mix_pre(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        """On the joint attention's output projection (its input: the image tokens' attention output)."""
        where = self._where(args[0].shape[0])
        if where is None or not self.run.mixing:
            return None
        rows, first = where
        x = args[0].clone()
        x[rows] = self._mix(x[rows], x[first:])
        return (x, *args[1:])

    # -- Flux's single blocks ------------------------------------------------------------------
    def _single_start(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The first single block: the negative rows' image tokens start as the conditional rows'."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        where = self._where(hidden.shape[0])
        if where is None:
            return None
        rows, first = where
        hidden = hidden.clone()
        hidden[first:] = hidden[rows]
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def _single_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """A single block's attention output [text, image]: both rows' image part mixed."""
        if not isinstance(out, Tensor):
            raise DiffguideError(
                f"NAG: a single-stream attention returned {type(out).__name__}, not a tensor"
            )
        where = self._where(out.shape[0])
        if where is None:
            return None
        rows, first = where
        t = self.run.text_len
        out = out.clone()
        mixed = self._mix(out[rows, t:], out[first:, t:])
        out[rows, t:] = mixed
        out[first:, t:] = mixed
        return out

    @contextmanager
    def installed(self) -> Iterator[None]:
        modules = dict(self.model.named_modules())
        chosen = set(self.targets)
        with ExitStack() as stack:
            stack.enter_context(scoped_forward(self.model, self._model_forward))
            for name, module in modules.items():
                if not (name.count(".") == 2 and name.endswith(".attn") and has_text_stream(module)):
                    continue
                if name.startswith("single_transformer_blocks"):
                    continue
                handles = [module.register_forward_pre_hook(self._joint_pre, with_kwargs=True)]
                if name in chosen:
                    handles += self._mixing(module)
                for h in handles:
                    stack.callback(h.remove)
            singles = [n for n in self.targets if n.startswith("single_transformer_blocks")]
            if "single_transformer_blocks.0" in modules:
                h = modules["single_transformer_blocks.0"].register_forward_pre_hook(
                    self._single_start, with_kwargs=True
                )
                stack.callback(h.remove)
            for name in singles:
                h = modules[name].register_forward_hook(self._single_post, with_kwargs=True)
                stack.callback(h.remove)
            yield

    def _mixing(self, module: nn.Module) -> list[Any]:
        """Mix on the output projection while this attention module runs (and only then)."""
        token = id(module)

        def enter(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.run.mixing.append(token)

        def leave(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            self.run.mixing.pop()

        out_proj = module.get_submodule("to_out.0")
        return [
            module.register_forward_pre_hook(enter, with_kwargs=True),
            module.register_forward_hook(leave, with_kwargs=True),
            out_proj.register_forward_pre_hook(self._mix_pre),
        ]


def _drop_rows(out: Any, n: int) -> Any:
    """The model's output without the appended rows (a tuple or a ``Transformer2DModelOutput``)."""
    if isinstance(out, tuple):
        return (out[0][:n], *out[1:])
    if hasattr(out, "sample"):
        out.sample = out.sample[:n]
        return out
    raise DiffguideError(f"NAG: cannot cut the model's output ({type(out).__name__}) to its rows")


def nag_targets(model: nn.Module, layers: str | None) -> list[str]:
    """NAG's attention layers on a joint-attention DiT: every attention with text (``layers`` narrows)."""
    from ..models.layers import select

    def is_target(name: str, module: nn.Module) -> bool:
        parent = name.rpartition(".")[0]
        if not (name.endswith(".attn") and parent.count(".") == 1):
            return False
        return has_text_stream(module) or parent.startswith("single_transformer_blocks")

    if not is_joint_dit(model):
        raise ConfigError(
            f"NAG is implemented for UNet cross-attention and SD3/Flux joint attention, not {type(model).__name__}"
        )
    if layers is None:
        return [name for name, m in model.named_modules() if is_target(name, m)]
    return select(model, layers, is_target)
