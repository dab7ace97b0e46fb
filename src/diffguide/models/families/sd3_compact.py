"""SD3 text compaction: a run of identical trailing text tokens runs as ONE token.

Without T5 (``text_encoder_3`` None), diffusers' ``StableDiffusion3Pipeline`` appends 256 all-zero
"T5" tokens to the 77 CLIP tokens, so every forward carries 333 text tokens (tiny-sd3: 16 image
tokens). SD3's text tokens have no position embedding and every operation on the text stream is
per token, except joint attention, whose output for a token depends only on that token's query.
So k identical text tokens stay identical through every joint block, and in attention

    softmax over k identical keys (identical values)  ==  one key with logit + log k

(the key's share of the softmax mass is k e^s / Z either way). :class:`TextCompaction` checks the
actual ``encoder_hidden_states`` of every model call: the trailing tokens that every row repeats
exactly (each row its own last token, so the unconditional rows and per-row prompts are fine),
if at least :data:`MIN_RUN`, are cut to one, and each joint attention adds ``log k`` to that key's
logit (an additive float ``attn_mask`` on ``scaled_dot_product_attention``). The final latents
agree with the uncompacted forward to float rounding (tests/test_sd3_compact.py: <= 1e-5).

Scope: installed for one run (``GuidedModel.installed``) on the model instance: the transformer's
``forward`` (this instance only) and the processors of its joint attention modules, all put back
in ``finally``. It composes with the perturbations that leave the text tokens' identity alone
(:func:`composes`: SLG / block skip, PAG identity attention (its mask is added to ours), TPG's
image-token shuffle, SEG's query blur, the query shuffle), with prefix sharing, chunking and any
batch. Anything else (a text-token shuffle, a processor other than diffusers'
``JointAttnProcessor2_0``, module traces, which record the text stream) turns it off for the run,
and the manifest says why (``engine.compact_text``).

Precision: in float32 the bias is exact to rounding; in float16 / bfloat16 ``log k`` itself is
rounded to the dtype (bfloat16: up to 0.016 on a logit, below that dtype's own error on q.k).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from torch import Tensor, nn

from ...perturb.dit import arg_namer, scoped_forward

#: A trailing run shorter than this is left alone (nothing to gain).
MIN_RUN = 2


def trailing_run(embeds: Tensor) -> int:
    """How many trailing tokens of (R, L, D) ``embeds`` equal their row's last token, exactly, in
    every row (the minimum over rows; 1 when the last two differ somewhere)."""
    same = (embeds == embeds[:, -1:]).all(dim=-1)  # (R, L)
    return int(same.flip(1).to(torch.int32).cumprod(dim=1).sum(dim=1).min())


@dataclass
class _Call:
    """The model call in progress: how many copies the last text token stands for (None: none)."""

    count: int | None = None
    masks: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = field(default_factory=dict)

    def mask(self, length: int, like: Tensor) -> Tensor | None:
        """The additive (1, 1, 1, length) key bias: log(count) on the last key, 0 elsewhere."""
        if self.count is None:
            return None
        key = (length, self.count, like.dtype, like.device)
        if key not in self.masks:
            bias = torch.zeros((1, 1, 1, length), dtype=like.dtype, device=like.device)
            bias[..., -1] = math.log(self.count)
            self.masks[key] = bias
        return self.masks[key]


class CompactJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (0.3x: the same projections, qk norm, concatenation
    [image, text] and output projections), plus the collapsed text token's key bias while a
    compacted call runs. Without one, the very same operations as the original."""

    def __init__(self, call: _Call) -> None:
        self.call = call

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: Tensor) -> Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = None
        if encoder_hidden_states is not None:
            eq = heads(attn.add_q_proj(encoder_hidden_states))
            ek = heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([a, b], dim=2) for a, b in ((query, eq), (key, ek), (value, ev)))
            mask = self.call.mask(key.shape[-2], query)  # the text tokens come last: its last key
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))  # type: ignore[no-any-return]
        hs, ehs = out[:, : residual.shape[1]], out[:, residual.shape[1] :]
        if not attn.context_pre_only:
            ehs = attn.to_add_out(ehs)
        return attn.to_out[1](attn.to_out[0](hs)), ehs


@dataclass
class TextCompaction:
    """One run's text compaction on an SD3 transformer, and what it did (for the manifest)."""

    tracing: bool = False  # the run records module outputs (a trace): compaction stays off
    fallback: str | None = None  # why it was off for the run (None: installed)
    compacted_calls: int = 0
    full_calls: int = 0
    tokens: tuple[int, int] | None = None  # (text tokens given, text tokens run) of the last compacted call

    def blocker(self, model: nn.Module, perturbations: Iterable[object]) -> str | None:
        """Why the run cannot be compacted, or None."""
        if type(model).__name__ != "SD3Transformer2DModel":
            return f"not an SD3 transformer ({type(model).__name__})"
        if self.tracing:
            return "module traces record the text stream at its full length"
        for p in perturbations:
            if not isinstance(p, composes()):
                return f"perturbation {type(p).__name__} may change the text tokens"
        for name, module in _joint_attentions(model):
            if type(module.processor) is not JointAttnProcessor2_0:
                return f"{name} runs attention processor {type(module.processor).__name__}"
        return None

    @contextmanager
    def installed(self, model: nn.Module, perturbations: Iterable[object]) -> Iterator[None]:
        """Compact every call of ``model`` while the block runs (or nothing, with :attr:`fallback` set)."""
        self.fallback = self.blocker(model, list(perturbations))
        if self.fallback is not None:
            yield
            return
        call = _Call()
        with ExitStack() as stack:
            for _, module in _joint_attentions(model):
                stack.enter_context(_processor(module, CompactJointAttnProcessor(call)))
            stack.enter_context(scoped_forward(model, self._forward(call)))
            yield

    def _forward(self, call: _Call) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            named = arg_namer(original)

            def forward(*args: Any, **kwargs: Any) -> Any:
                args_ = named(args, kwargs)
                text = args_.get("encoder_hidden_states")
                run = trailing_run(text) if isinstance(text, Tensor) and text.ndim == 3 else 1
                if run < MIN_RUN or not isinstance(text, Tensor):
                    self.full_calls += 1
                    return original(**args_)
                length = text.shape[1]
                args_["encoder_hidden_states"] = text[:, : length - run + 1]
                call.count = run
                try:
                    return original(**args_)
                finally:
                    call.count = None
                    self.compacted_calls += 1
                    self.tokens = (length, length - run + 1)

            return forward

        return make

    def record(self) -> dict[str, Any]:
        return {
            "on": True,
            "fallback": self.fallback,
            "compacted_calls": self.compacted_calls,
            "full_calls": self.full_calls,
            "text_tokens": list(self.tokens) if self.tokens else None,
        }


def composes() -> tuple[type, ...]:
    """Perturbations known to keep identical text tokens identical: they skip whole blocks or
    sub-layers, change image tokens or image-stream queries, or add a mask to the logits."""
    from ...perturb import BlockSkip, IdentityAttention, QueryBlur, QueryShuffle, TokenShuffle

    return (BlockSkip, IdentityAttention, TokenShuffle, QueryBlur, QueryShuffle)


def _joint_attentions(model: nn.Module) -> list[tuple[str, Attention]]:
    """The attention modules that take the text stream (``add_k_proj``): SD3's joint attentions."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, Attention) and getattr(m, "add_k_proj", None) is not None
    ]


@contextmanager
def _processor(module: Attention, processor: Any) -> Iterator[None]:
    previous = module.processor
    module.set_processor(processor)
    try:
        yield
    finally:
        module.set_processor(previous)


def compact_record(on: bool, compaction: TextCompaction | None, family: str) -> dict[str, Any]:
    """The manifest's ``engine.compact_text``: off, or on and what it did (why not, if it did not)."""
    if not on:
        return {"on": False}
    if compaction is None:
        return {"on": True, "fallback": f"{family} models have no text compaction", "compacted_calls": 0}
    return compaction.record()
