"""diffguide terms as ComfyUI MODEL patches, every branch in ComfyUI's one batched model call.

How one sampling step runs (ComfyUI's ``sampling_function``) with the pack's patches:

1. ComfyUI asks ``calc_cond_batch`` for ``[cond, uncond]``. The pack's ``calc_cond_batch``
   wrapper (a ComfyUI wrapper under the key ``"diffguide"``, chained with any other pack's
   wrappers) appends one copy of the positive (or negative) conditioning per *perturbed branch*
   of the terms active at this step: ``[cond, uncond, pag, tpg, ...]``. ComfyUI batches all of
   them into one model call (memory permitting: its own sub-batch split is still correct, see 3).
2. The rows are labelled by ComfyUI itself: ``transformer_options["cond_or_uncond"]`` lists the
   index of each chunk of the batch; the pack puts ``{index: branch}`` in
   ``transformer_options["diffguide_rows"]``. Each perturbation acts on its own chunk only:
   on a UNet, identity self-attention (PAG) and token shuffle (TPG) as forward hooks on the
   ``attn1`` / transformer-block modules, installed on the model for this call and removed in
   ``finally``; on a DiT (SD3's MMDiT, Flux, Qwen-Image) PAG, TPG, SEG, the query shuffle and
   block skip (SLG, LayerSkip) as ComfyUI ``"dit"`` block replacements (PAG through an
   ``optimized_attention_override`` for the block, see :mod:`.dit`; the query edits and the
   ``attn`` / ``ff`` skips through module hooks the replacement arms, see :mod:`.dit_query`,
   :mod:`.dit_skip`), set on a copy of the model options for this call, calling any
   replacement another pack set for the same block.
3. A memory-driven split runs chunks in several calls; each call carries its own
   ``cond_or_uncond``, so a perturbation finds its rows (or none) in every call.
4. The wrapper returns ``[cond, uncond]`` to ComfyUI and keeps the perturbed predictions for this
   step. ComfyUI's CFG runs (``sampler_cfg_function`` of any node, untouched), then the
   post-CFG functions in the order they were added: each diffguide node added one that adds its
   term to the result. Terms are applied in the model's output space (epsilon, or velocity on
   flow models), as diffguide applies them: ``g = result + delta(c, u, p, step)``, then the term's
   ``post`` (CFG rescale, ...), and the result is turned back into ComfyUI's x0.

Fallback: when the perturbed predictions of this step are missing (another node replaced
``calc_cond_batch`` with a ``sampler_calc_cond_batch_function`` that does not call it), the
post-CFG function makes one extra ``calc_cond_batch`` call for them.

ComfyUI (GPL-3.0) is imported only inside functions that ComfyUI itself calls; nothing here
copies its code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..guidance.base import StepInfo
from ..guidance.term import Term
from ..perturb.base import ForwardContext
from ..perturb.block_skip import BlockSkip
from ..perturb.identity_attention import IdentityAttention
from ..perturb.layer_skip import UNET_DEFAULT as LAYER_SKIP_UNET
from ..perturb.layer_skip import LayerSkipBlocks
from ..perturb.query_blur import QueryBlur
from ..perturb.query_shuffle import DEFAULT_LAYERS as QUERY_SHUFFLE_LAYERS
from ..perturb.query_shuffle import QueryShuffle
from ..perturb.text_shuffle import TextShuffle
from ..perturb.token_shuffle import TokenShuffle, shuffle_tokens
from ..sampling.noise import image_seeds
from .dit import identity_block, is_block_key, shuffle_block
from .dit_query import CallInfo, blur_dit, install_call_info, query_block, shuffle_dit
from .dit_skip import sublayer_skip_block
from .layers import DIT_STACKS, Resolved, resolve_dit, resolve_unet
from .rows import ROWS, branch_rows, permutations, row_images
from .unet import (
    blur_edit,
    install_clock,
    install_query_edit,
    install_skip,
    install_sublayer_skip,
    install_text_shuffle,
    query_shuffle_edit,
)

KEY = "diffguide"  # transformer_options: the chain of Entry; also the wrappers' key
RUN = "diffguide_run"  # transformer_options of one sampling run: its ForwardContext (seeds)
STASH = "diffguide_step"  # model_options: this step's perturbed predictions (a Stash)


@dataclass(frozen=True)
class Plan:
    """One perturbed branch on one ComfyUI model: what to do to which modules."""

    branch: str
    prompt: str  # "cond" | "uncond"
    kind: str  # "identity" | "shuffle" | "skip"
    targets: Resolved
    semantics: str = "diagonal"  # identity attention on a DiT's joint attention
    perturbation: Any = None  # the term's perturbation spec (SEG's blur sigma, a shuffle's strength)

    @property
    def in_place(self) -> bool:
        """Acts on ComfyUI's own cond / uncond rows (the uncond query shuffle), adds no rows."""
        return self.branch in ("cond", "uncond")


@dataclass(frozen=True)
class Entry:
    """One term in the model's chain, with its perturbed branches resolved on the model."""

    term: Term
    plans: tuple[Plan, ...]

    @property
    def needs_uncond(self) -> bool:
        return any(b.prompt == "uncond" and b.perturbation is None for b in self.term.branches())


@dataclass
class Stash:
    """The perturbed predictions (x0) of the step whose model input is ``x``."""

    x: Tensor
    step: StepInfo
    preds: dict[str, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# node time: resolve a term's perturbations on the model
# ------------------------------------------------------------------------------------------------


def _kind(perturbation: object) -> tuple[str, str | None]:
    if isinstance(perturbation, IdentityAttention):
        return "identity", perturbation.layers
    if isinstance(perturbation, TokenShuffle):
        return "shuffle", perturbation.layers
    if isinstance(perturbation, QueryBlur):
        return "blur", perturbation.layers
    if isinstance(perturbation, QueryShuffle):
        return "query_shuffle", perturbation.layers
    if isinstance(perturbation, TextShuffle):
        return "text", None
    if isinstance(perturbation, BlockSkip):  # LayerSkipBlocks too
        return "skip", perturbation.layers
    raise ConfigError(f"the ComfyUI nodes cannot apply the perturbation {type(perturbation).__name__} yet")


_METHOD = {"identity": "pag", "shuffle": "tpg", "skip": "slg", "blur": "pag", "query_shuffle": "pag"}
_ATTN1 = ("identity", "blur", "query_shuffle")  # kinds acting on a UNet's attn1 (else: its blocks)


def _unet_targets(patcher: Any, kind: str, layers: str | None, branch: Any) -> Resolved:
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    if kind == "skip" and layers is None and isinstance(branch.perturbation, LayerSkipBlocks):
        layers = LAYER_SKIP_UNET
    if kind == "query_shuffle" and layers is None:
        layers = QUERY_SHUFFLE_LAYERS

    def is_target(name: str) -> bool:
        if kind in _ATTN1:
            return name.endswith(".attn1")
        return name.split(".")[-2:-1] == ["transformer_blocks"]

    return resolve_unet(layers, _METHOD[kind], key_map, is_target)  # type: ignore[arg-type]


def plan_branches(patcher: Any, term: Term) -> tuple[Plan, ...]:
    """The perturbed branches of ``term`` resolved on the ComfyUI ``patcher``'s model."""
    dm = patcher.model.diffusion_model
    known = [c.__name__ for c in type(dm).__mro__ if c.__name__ in DIT_STACKS or c.__name__ == "UNetModel"]
    cls = known[0] if known else type(dm).__name__
    plans = []
    for branch in term.branches():
        if branch.perturbation is None:
            continue
        kind, layers = _kind(branch.perturbation)
        if kind == "text":  # the model's input: no layers
            targets = Resolved("", (), ())
        elif cls in DIT_STACKS and kind == "query_shuffle" and layers is None:
            raise ConfigError("query shuffle has no preset for transformers; give its layers (e.g. b7-9)")
        elif cls in DIT_STACKS:
            _, joint, single = DIT_STACKS[cls]
            n_single = len(getattr(dm, single)) if single else 0
            method: Any = _METHOD[kind]
            targets = resolve_dit(layers, method, cls, len(getattr(dm, joint)), n_single)
        elif cls == "UNetModel":
            targets = _unet_targets(patcher, kind, layers, branch)
        else:
            raise ConfigError(f"the diffguide nodes do not support ComfyUI's {cls} model yet")
        semantics = getattr(branch.perturbation, "semantics", "diagonal")
        plans.append(Plan(branch.name, branch.prompt, kind, targets, semantics, branch.perturbation))
    return tuple(plans)


# ------------------------------------------------------------------------------------------------
# run time: rows, step, output space
# ------------------------------------------------------------------------------------------------


def _prediction(model_sampling: Any) -> str:
    names = {c.__name__ for c in type(model_sampling).__mro__}
    if "CONST" in names:
        return "flow"
    if "V_PREDICTION" in names:
        return "v_prediction"
    if "EPS" in names:
        return "epsilon"
    raise ConfigError(f"the diffguide nodes do not support {type(model_sampling).__name__} models")


def step_info(model: Any, x: Tensor, sigma: Tensor, options: dict[str, Any]) -> StepInfo:
    """Where the sampler is: the position of ``sigma`` in ``sample_sigmas``, ComfyUI's timestep."""
    ms = model.model_sampling
    s = float(sigma.flatten()[0])
    sigmas = options.get("sample_sigmas")
    index, count = 0, 1
    if sigmas is not None and len(sigmas) > 1:
        count = len(sigmas) - 1
        index = int((sigmas[:-1].float().cpu() - s).abs().argmin())
    t = float(ms.timestep(sigma.flatten()[:1]).flatten()[0])
    return StepInfo(index, count, s, t, ms.calculate_input(sigma, x), _prediction(ms))


class Space:
    """ComfyUI's x0 <-> the model's output space (epsilon, v, or flow velocity) at one step.

    In float64 (on the CPU's float64-capable devices; MPS keeps float32): ``(x - x0) / sigma`` and
    back would lose ~1e-4 of x0 in float32 at large sigma, more than the branches differ by."""

    def __init__(self, prediction: str, x: Tensor, sigma: Tensor) -> None:
        self.dtype = x.dtype
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        self.prediction, self.x = prediction, x.to(wide)
        self.s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(wide)

    def out(self, x0: Tensor) -> Tensor:
        x0 = x0.to(self.x.dtype)
        if self.prediction == "v_prediction":
            a = self.s * self.s + 1.0
            return (self.x / a - x0) * a.sqrt() / self.s
        return (self.x - x0) / self.s

    def x0(self, m: Tensor) -> Tensor:
        if self.prediction == "v_prediction":
            a = self.s * self.s + 1.0
            return (self.x / a - m * self.s / a.sqrt()).to(self.dtype)
        return (self.x - self.s * m).to(self.dtype)


# ------------------------------------------------------------------------------------------------
# run time: perturbations for one model call
# ------------------------------------------------------------------------------------------------


def _identity_hook(branch: str) -> Callable[..., Any]:
    """attn1 forward hook: the branch's rows output ``to_out(to_v(.))`` (identity attention map)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Any:
        rows = branch_rows(kwargs.get("transformer_options") or {}, branch, output.shape[0])
        if rows is None:
            return None
        x = args[0] if args else kwargs["x"]
        value, context = kwargs.get("value"), kwargs.get("context")
        src = value if value is not None else context if context is not None else x
        out = output.clone()
        out[rows] = module.to_out(module.to_v(src[rows]))  # type: ignore[operator]
        return out

    return hook


def _shuffle_hook(
    branch: str, ctx: ForwardContext, shared: dict[object, Tensor] | None
) -> Callable[..., Any]:
    """Transformer-block pre-hook: the branch's rows enter with their tokens permuted, one
    permutation per image from diffguide's per-image generator, or one for all rows
    (``permutation=shared``), as diffguide's TPG draws them."""
    site = object()

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        h = args[0] if args else kwargs["x"]
        options = kwargs.get("transformer_options") or {}
        rows = branch_rows(options, branch, h.shape[0])
        if rows is None:
            return None
        images = row_images(options, rows, h.shape[0])
        perms = permutations(ctx, branch, h.shape[1], images, shared, site)
        h = h.clone()
        h[rows] = shuffle_tokens(h[rows], perms.to(h.device))
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "x": h}

    return hook


def _skip_block(branch: str, previous: Callable[..., Any] | None) -> Callable[..., Any]:
    """A ``"dit"`` block replacement: the branch's rows leave the block as they entered it."""

    def replace(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        rows = branch_rows(args.get("transformer_options") or {}, branch, args["img"].shape[0])
        # the rows as they enter, copied first: Flux's blocks add to their inputs in place
        old: dict[str, Tensor] = {}
        for key in ("img", "txt") if rows is not None else ():
            value = args.get(key)
            if isinstance(value, Tensor):
                old[key] = value[rows].clone()
        out = previous(args, extra) if previous is not None else extra["original_block"](args)
        if rows is None:
            return out
        out = dict(out)
        for key, before in old.items():
            new = out.get(key)
            if isinstance(new, Tensor) and new.shape[1:] == before.shape[1:]:
                new = new.clone()
                new[rows] = before
                out[key] = new
        return out

    return replace


def _dit_replacement(
    plan: Plan, single: bool, ctx: ForwardContext, previous: Any, shared: dict[object, Tensor]
) -> Callable[..., Any]:
    if plan.kind == "skip":
        return _skip_block(plan.branch, previous)
    if plan.kind == "identity":
        return identity_block(plan.branch, plan.semantics, single, previous)
    return shuffle_block(plan.branch, ctx, single, previous, _shared(plan, shared))


def _shared(plan: Plan, shared: dict[object, Tensor]) -> dict[object, Tensor] | None:
    """TPG's ``permutation=shared``: the call's per-block draws; None: per image."""
    return shared if getattr(plan.perturbation, "permutation", "per_image") == "shared" else None


def _dit_edit(plan: Plan, ctx: ForwardContext, info: CallInfo) -> Any:
    if plan.kind == "blur":
        return blur_dit(plan.perturbation.sigma, info)
    return shuffle_dit(plan.branch, plan.perturbation.strength, ctx, info)


@contextmanager
def perturbed(model: Any, model_options: dict[str, Any], rows: dict[int, Plan]) -> Iterator[dict[str, Any]]:
    """Model options for one call with ``rows`` labelled and their perturbations in place."""
    options = dict(model_options.get("transformer_options", {}))
    options[ROWS] = rows
    ctx = options.get(RUN)
    if ctx is None:
        ctx = ForwardContext(tuple(range(1024)))
    replace = dict(options.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    dm = model.diffusion_model
    modules = dict(dm.named_modules())
    clock = [0.0]  # the timestep of the model call (the uncond query shuffle's seeds)
    info = CallInfo()  # a DiT call's latent grid and timestep (its query edits)
    shared: dict[object, Tensor] = {}  # TPG permutation=shared: each block's draw of this call
    with ExitStack() as stack:
        if any(plan.kind == "query_shuffle" for plan in rows.values()):
            install_clock(stack, dm, clock)
        if any(plan.kind in ("blur", "query_shuffle") for plan in rows.values()):
            install_call_info(stack, dm, info)
        for plan in rows.values():
            if plan.kind == "text":
                install_text_shuffle(stack, dm, plan.branch, ctx)
            names = zip(plan.targets.comfy, plan.targets.diffusers, strict=True)
            for name, diffusers_name in names:
                if is_block_key(name):
                    block, index = name.split(".")
                    key = (block, int(index))
                    if plan.kind in ("blur", "query_shuffle"):
                        dit_edit = _dit_edit(plan, ctx, info)
                        dit[key] = query_block(stack, dm, key, plan.branch, dit_edit, dit.get(key))
                    elif plan.kind == "skip" and plan.perturbation.mode != "block":
                        mode = plan.perturbation.mode
                        dit[key] = sublayer_skip_block(stack, dm, key, plan.branch, mode, dit.get(key))
                    else:
                        single = block == "single_block"
                        dit[key] = _dit_replacement(plan, single, ctx, dit.get(key), shared)
                elif plan.kind == "identity":
                    handle = modules[name].register_forward_hook(
                        _identity_hook(plan.branch), with_kwargs=True
                    )
                    stack.callback(handle.remove)
                elif plan.kind == "skip" and plan.perturbation.mode != "block":
                    install_sublayer_skip(stack, modules[name], plan.branch, plan.perturbation.mode)
                elif plan.kind == "skip":
                    install_skip(stack, modules[name], plan.branch)
                elif plan.kind == "blur":
                    edit = blur_edit(plan.perturbation.sigma)
                    install_query_edit(stack, modules[name], plan.branch, edit)
                elif plan.kind == "query_shuffle":
                    strength = plan.perturbation.strength
                    edit = query_shuffle_edit(plan.branch, diffusers_name, strength, ctx, clock)
                    install_query_edit(stack, modules[name], plan.branch, edit)
                else:
                    hook = _shuffle_hook(plan.branch, ctx, _shared(plan, shared))
                    handle = modules[name].register_forward_pre_hook(hook, with_kwargs=True)
                    stack.callback(handle.remove)
        replace["dit"] = dit
        options["patches_replace"] = replace
        yield {**model_options, "transformer_options": options}


# ------------------------------------------------------------------------------------------------
# ComfyUI entry points: wrappers and post-CFG functions
# ------------------------------------------------------------------------------------------------


def _plans_at(entries: Sequence[Entry], step: StepInfo) -> list[Plan]:
    return [p for e in entries if e.term.active(step) for p in e.plans]


def calc_cond_batch_wrapper(
    executor: Any, model: Any, conds: list[Any], x_in: Tensor, timestep: Tensor, model_options: dict[str, Any]
) -> list[Tensor]:
    """ComfyUI CALC_COND_BATCH wrapper: the perturbed branches join ComfyUI's batched call."""
    options = model_options.get("transformer_options", {})
    entries = options.get(KEY)
    if not entries or ROWS in options or len(conds) < 2:  # not the sampler's [cond, uncond] call
        return executor(model, conds, x_in, timestep, model_options)  # type: ignore[no-any-return]
    step = step_info(model, x_in, timestep, options)
    plans = _plans_at(entries, step)
    stash = Stash(x_in, step)
    model_options[STASH] = stash
    own = {0 if p.prompt == "cond" else 1: p for p in plans if p.in_place and conds[int(p.prompt != "cond")]}
    plans = [p for p in plans if not p.in_place]
    if not plans and not own:
        return executor(model, conds, x_in, timestep, model_options)  # type: ignore[no-any-return]
    base = len(conds)
    extra = [conds[0] if p.prompt == "cond" else conds[1] for p in plans]
    if any(c is None for c in extra):
        raise ConfigError(
            "a diffguide branch on the negative prompt needs CFG (the negative is not evaluated)"
        )
    rows = {**own, **{base + k: p for k, p in enumerate(plans)}}
    with perturbed(model, model_options, rows) as options_now:
        out = executor(model, list(conds) + extra, x_in, timestep, options_now)
    stash.preds = {p.branch: out[base + k] for k, p in enumerate(plans)}
    return out[:base]  # type: ignore[no-any-return]


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """ComfyUI OUTER_SAMPLE wrapper: one ForwardContext per sampling run, image i seeded
    ``seed + i`` (TPG's permutations: as diffguide's, run after run)."""
    noise = args[0]
    seed = args[7] if len(args) > 7 else kwargs.get("seed")
    options = executor.class_obj.model_options.setdefault("transformer_options", {})
    options[RUN] = ForwardContext(tuple(image_seeds(int(seed or 0), int(noise.shape[0]))))
    try:
        return executor(*args, **kwargs)
    finally:
        options.pop(RUN, None)


def _fallback(args: dict[str, Any], entries: Sequence[Entry]) -> Stash:
    """The perturbed predictions by one extra ``calc_cond_batch`` call (see the module docstring)."""
    import comfy.samplers

    model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
    step = step_info(model, x, sigma, options.get("transformer_options", {}))
    plans = _plans_at(entries, step)
    if any(p.in_place for p in plans):
        raise ConfigError(
            "the uncond query shuffle acts in ComfyUI's own batch; another node replaced calc_cond_batch"
        )
    stash = Stash(x, step)
    if plans:
        conds = [args["cond"] if p.prompt == "cond" else args["uncond"] for p in plans]
        with perturbed(model, options, dict(enumerate(plans))) as options_now:
            out = comfy.samplers.calc_cond_batch(model, conds, x, sigma, options_now)
        stash.preds = {p.branch: out[k] for k, p in enumerate(plans)}
    return stash


def make_post_cfg(entries: Sequence[Entry]) -> Callable[[dict[str, Any]], Tensor]:
    """The post-CFG function of one node: ``g + sum(delta)``, then each term's ``post``."""

    def post_cfg(args: dict[str, Any]) -> Tensor:
        x, sigma, options = args["input"], args["sigma"], args["model_options"]
        stash = options.get(STASH)
        if not isinstance(stash, Stash) or stash.x is not x:
            stash = _fallback(args, entries)
        step = stash.step
        active = [e for e in entries if e.term.active(step)]
        if not active:
            return args["denoised"]  # type: ignore[no-any-return]
        space = Space(step.prediction, x, sigma)
        preds = {"cond": space.out(args["cond_denoised"])}
        if any(e.needs_uncond for e in active):
            preds["uncond"] = space.out(args["uncond_denoised"])
        preds.update({name: space.out(p) for name, p in stash.preds.items()})
        guided = space.out(args["denoised"])
        for e in active:
            guided = guided + e.term.delta(preds, step)
        for e in active:
            guided = e.term.post(guided, preds, step)
        return space.x0(guided)

    return post_cfg


def _unique(term: Term, taken: set[str]) -> Term:
    if term.name not in taken:
        return term
    k = 2
    while f"{term.name}_{k}" in taken:
        k += 1
    return dataclasses.replace(term, name=f"{term.name}_{k}")  # type: ignore[type-var]


def patch_model(model: Any, terms: Sequence[Term]) -> tuple[Any, str]:
    """A clone of the ComfyUI ``model`` with ``terms`` appended to its diffguide chain, and the
    dry-run listing of the modules each perturbed branch acts on."""
    import comfy.patcher_extension as pe

    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    chain: list[Entry] = list(options.get(KEY, []))
    taken = {e.term.name for e in chain}
    new: list[Entry] = []
    for term in terms:
        term = _unique(term, taken)
        taken.add(term.name)
        new.append(Entry(term, plan_branches(m, term)))
    options[KEY] = chain + new
    if not m.get_wrappers(pe.WrappersMP.CALC_COND_BATCH, KEY):
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, calc_cond_batch_wrapper)
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.set_model_sampler_post_cfg_function(
        make_post_cfg(new), disable_cfg1_optimization=any(e.needs_uncond for e in new)
    )
    lines = [f"# {e.term.name} ({p.kind}): {p.targets.listing()}" for e in new for p in e.plans]
    return m, "\n".join(lines) or "# no perturbed branch"
