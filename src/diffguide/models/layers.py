"""Layer addressing: exact names, block shorthands, ranges, presets, and a dry run.

A *layer spec* is a comma-separated list of items; each item selects module prefixes:

* an exact fully-qualified module name: ``mid_block.attentions.0.transformer_blocks.0.attn1``;
* the same with ranges in numeric parts: ``down_blocks.2.attentions.0.transformer_blocks.2-9``;
* ``down``, ``mid``, ``up``: the whole ``down_blocks`` / ``mid_block`` / ``up_blocks``;
* ComfyUI-style unit shorthands (the notation of pamparamm's sd-perturbed-attention):
  ``dN`` / ``m0`` / ``uN`` is the N-th attention unit (``*.attentions.j``, a Transformer2DModel)
  of the down / mid / up path, counted in model order; ``dN.K`` or ``dN.A-B`` narrows it to
  transformer blocks K or A..B. On SDXL ``d2`` is ``down_blocks.2.attentions.0`` (the first
  down block has no attention), so the TPG paper's layers are ``d2.2-9,d3``.

Transformer (DiT) models are addressed by their block stacks (direct children of the model):

* exact names and indices: ``transformer_blocks.7``, ``transformer_blocks.7.attn``, with ranges
  ``transformer_blocks.7-9``, ``single_transformer_blocks.0-37``;
* short forms: ``b7`` / ``b7-9`` for the joint (double-stream) blocks -- ``transformer_blocks`` on
  SD3, Flux and Qwen-Image, ``joint_transformer_blocks`` on AuraFlow -- and ``s0-37`` for the
  single-stream blocks (``single_transformer_blocks`` on Flux and AuraFlow).

A block index past the last block is a :class:`BlockIndexError` naming the valid range.

Matching is by whole dotted components: ``blocks.1`` never selects ``blocks.10`` (the
regex search of diffusers' ``pag_applied_layers`` does). A perturbation then takes the
modules of its kind (self-attention, or transformer block) at or below each prefix.
Every item must select something; otherwise :class:`LayerSpecError` lists valid names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import BlockIndexError, LayerSpecError

_PATHS = {"d": "down_blocks", "m": "mid_block", "u": "up_blocks"}
_SHORT = re.compile(r"^([dmu])(\d+)(?:\.(\d+)(?:-(\d+))?)?$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")
# DiT block stacks (direct children of the model) and their short letters
_STACKS = (("transformer_blocks", "b"), ("joint_transformer_blocks", "b"), ("single_transformer_blocks", "s"))
_DIT_SHORT = re.compile(r"^([bs])(\d+)(?:-(\d+))?$")
_STACK_INDEX = re.compile(r"^([a-z_]+)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class AttentionUnit:
    """One Transformer2DModel: its shorthand (``d2``), full name, and transformer-block count."""

    alias: str
    name: str
    blocks: int


def attention_units(model: nn.Module) -> list[AttentionUnit]:
    """The Transformer2DModel units of a UNet, in model order, with their shorthands."""
    counters = {"d": 0, "m": 0, "u": 0}
    units: list[AttentionUnit] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        is_unit = len(parts) >= 2 and parts[-2] == "attentions" and hasattr(module, "transformer_blocks")
        if not is_unit:
            continue
        letter = next((k for k, v in _PATHS.items() if parts[0] == v), None)
        if letter is None:
            continue
        alias = f"{letter}{counters[letter]}"
        counters[letter] += 1
        units.append(AttentionUnit(alias, name, len(module.transformer_blocks)))  # type: ignore[arg-type]
    return sorted(units, key=lambda u: "dmu".index(u.alias[0]))  # down, mid, up (stable within a path)


def _expand_ranges(item: str) -> list[str]:
    names = [""]
    for part in item.split("."):
        m = _RANGE.match(part)
        values = [str(i) for i in range(int(m[1]), int(m[2]) + 1)] if m else [part]
        if m and int(m[1]) > int(m[2]):
            raise LayerSpecError(f"range '{part}' in layer spec '{item}' is empty (start above end)")
        names = [f"{n}.{v}" if n else v for n in names for v in values]
    return names


@dataclass(frozen=True)
class BlockStack:
    """One stack of DiT blocks: its short letter (``b`` / ``s``), attribute name, and block count."""

    letter: str
    name: str
    blocks: int

    @property
    def alias(self) -> str:
        return f"{self.letter}0-{self.blocks - 1}"


def block_stacks(model: nn.Module) -> list[BlockStack]:
    """The non-empty DiT block stacks of ``model`` (direct children), joint before single."""
    stacks: list[BlockStack] = []
    for name, letter in _STACKS:
        stack = model._modules.get(name)
        if isinstance(stack, nn.ModuleList) and len(stack) and letter not in [s.letter for s in stacks]:
            stacks.append(BlockStack(letter, name, len(stack)))
    return stacks


def is_dit(model: nn.Module) -> bool:
    """True for a transformer whose blocks are direct children (SD3, Flux, AuraFlow, Qwen-Image)."""
    return bool(block_stacks(model))


@dataclass(frozen=True)
class _Scheme:
    """How a model is addressed: UNet attention units, or DiT block stacks."""

    units: list[AttentionUnit]
    stacks: list[BlockStack]

    def valid(self) -> str:
        if self.stacks:
            listing = ", ".join(f"{s.alias}={s.name} ({s.blocks} blocks)" for s in self.stacks)
            return (
                f"Valid: exact module names, block indices and ranges ({self.stacks[0].name}.7-9), or short "
                f"forms {listing}. Run `diffguide layers` to list them."
            )
        listing = ", ".join(f"{u.alias}={u.name} ({u.blocks} blocks)" for u in self.units)
        return f"Valid: down, mid, up, exact module names, or units {listing}. Run `diffguide layers` to list them."


def _check_index(item: str, stack: BlockStack, lo: int, hi: int) -> None:
    if lo > hi:
        raise LayerSpecError(f"range '{lo}-{hi}' in layer spec '{item}' is empty (start above end)")
    if hi >= stack.blocks:
        raise BlockIndexError(
            f"layer '{item}': block {hi} is past the last block; {stack.name} has blocks "
            f"0..{stack.blocks - 1} ({stack.alias})"
        )


def _dit_short(item: str, scheme: _Scheme) -> list[str] | None:
    short = _DIT_SHORT.match(item)
    if short is None or not scheme.stacks:
        return None
    stack = next((s for s in scheme.stacks if s.letter == short[1]), None)
    if stack is None:
        kind = "joint" if short[1] == "b" else "single-stream"
        raise LayerSpecError(f"layer '{item}': this model has no {kind} blocks. {scheme.valid()}")
    lo, hi = int(short[2]), int(short[3] if short[3] is not None else short[2])
    _check_index(item, stack, lo, hi)
    return [f"{stack.name}.{k}" for k in range(lo, hi + 1)]


def _past_the_end(item: str, name: str, scheme: _Scheme) -> None:
    """Raise BlockIndexError if ``name`` is ``<stack>.<index>...`` with the index past the stack's end."""
    m = _STACK_INDEX.match(name)
    stack = next((s for s in scheme.stacks if m and s.name == m[1]), None)
    if m and stack is not None and int(m[2]) >= stack.blocks:
        _check_index(item, stack, int(m[2]), int(m[2]))


def _prefixes(item: str, names: set[str], scheme: _Scheme) -> list[str]:
    dit = _dit_short(item, scheme)
    if dit is not None:
        return dit
    if item in ("down", "mid", "up") and not scheme.stacks:
        return [_PATHS[item[0]]]
    short = _SHORT.match(item)
    if short and not scheme.stacks:
        units = scheme.units
        unit = next((u for u in units if u.alias == f"{short[1]}{short[2]}"), None)
        if unit is None:
            raise LayerSpecError(f"layer '{item}': no attention unit {short[1]}{short[2]}. {scheme.valid()}")
        if short[3] is None:
            return [unit.name]
        lo, hi = int(short[3]), int(short[4] if short[4] is not None else short[3])
        if lo > hi or hi >= unit.blocks:
            raise LayerSpecError(
                f"layer '{item}': {unit.alias} ({unit.name}) has transformer blocks 0..{unit.blocks - 1}"
            )
        return [f"{unit.name}.transformer_blocks.{k}" for k in range(lo, hi + 1)]
    expanded = _expand_ranges(item)
    missing = [n for n in expanded if n not in names]
    if missing:
        for name in missing:
            _past_the_end(item, name, scheme)
        close = difflib.get_close_matches(missing[0], sorted(names), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise LayerSpecError(f"layer '{missing[0]}' is not a module of this model.{hint} {scheme.valid()}")
    return expanded


def select(model: nn.Module, spec: str, is_target: Callable[[str, nn.Module], bool]) -> list[str]:
    """Names of the modules, in model order, that ``spec`` selects and ``is_target`` accepts."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise LayerSpecError("empty layer spec: name at least one layer (e.g. 'mid' or 'd2.2-9')")
    modules = dict(model.named_modules())
    stacks = block_stacks(model)
    scheme = _Scheme([] if stacks else attention_units(model), stacks)
    chosen: set[str] = set()
    for item in items:
        prefixes = _prefixes(item, set(modules), scheme)
        found = {
            name
            for name, module in modules.items()
            if any(name == p or name.startswith(p + ".") for p in prefixes) and is_target(name, module)
        }
        if not found:
            raise LayerSpecError(
                f"layer spec item '{item}' selects no module of the needed kind. {scheme.valid()}"
            )
        chosen |= found
    return [name for name in modules if name in chosen]


def unit_table(model: nn.Module) -> list[AttentionUnit]:
    """The addressable units for the ``layers`` command: a UNet's attention units, or a DiT's block
    stacks (alias ``b0-23`` / ``s0-37``, the stack's name, its block count)."""
    stacks = block_stacks(model)
    if stacks:
        return [AttentionUnit(s.alias, s.name, s.blocks) for s in stacks]
    return attention_units(model)


def forward_units(model: nn.Module) -> list[str]:
    """The model's top-level units in the order its forward runs them: a DiT's blocks
    (joint stack, then single stack), or a UNet's ``down_blocks.i``, ``mid_block``, ``up_blocks.i``
    (registration order puts ``up_blocks`` before ``mid_block``; execution order does not).
    Everything outside the units (embeddings, ``conv_in``, ``norm_out``) is cheap and runs on
    every row. Empty for a model of another shape."""
    stacks = block_stacks(model)
    if stacks:
        return [f"{s.name}.{i}" for s in stacks for i in range(s.blocks)]
    down, mid, up = (model._modules.get(n) for n in ("down_blocks", "mid_block", "up_blocks"))
    if not isinstance(down, nn.ModuleList) or not isinstance(up, nn.ModuleList):
        return []
    return (
        [f"down_blocks.{i}" for i in range(len(down))]
        + (["mid_block"] if mid is not None else [])
        + [f"up_blocks.{i}" for i in range(len(up))]
    )


def unit_index(units: list[str], name: str) -> int | None:
    """The index of the unit that holds module ``name`` (the unit itself or a module inside), or None."""
    for i, unit in enumerate(units):
        if name == unit or name.startswith(unit + "."):
            return i
    return None


# UNet blocks whose forward runs resnet i then attention i (if any), then the down/upsampler
_SAMPLERS = {
    "CrossAttnDownBlock2D": "downsamplers",
    "DownBlock2D": "downsamplers",
    "CrossAttnUpBlock2D": "upsamplers",
    "UpBlock2D": "upsamplers",
}


def _names(prefix: str, modules: object) -> list[str]:
    return [f"{prefix}.{i}" for i in range(len(modules))] if isinstance(modules, nn.ModuleList) else []


def forward_steps(model: nn.Module, name: str) -> list[str]:
    """The sub-modules that module ``name``'s forward runs one after another, each on the previous
    one's hidden states, in that order (full names); ``""``: the model's :func:`forward_units`.
    Known (explicit, by class): a UNet's down and up blocks (``resnets.i`` then ``attentions.i``,
    then the down/upsampler; an up block concatenates its skip residual before each resnet), its
    cross-attention mid block (``resnets.0``, then ``attentions.i`` and ``resnets.i+1``), and a
    continuous ``Transformer2DModel`` (``proj_in``, its transformer blocks, ``proj_out``; its
    input norm, cheap, is left out). Every other module: [] (not split)."""
    if name == "":
        return forward_units(model)
    module = model.get_submodule(name)
    kind = type(module).__name__
    resnets = _names(f"{name}.resnets", module._modules.get("resnets"))
    attentions = _names(f"{name}.attentions", module._modules.get("attentions"))
    if kind in _SAMPLERS and resnets and len(attentions) in (0, len(resnets)):
        pairs = [s for i, r in enumerate(resnets) for s in [r, *attentions[i : i + 1]]]
        return pairs + _names(f"{name}.{_SAMPLERS[kind]}", module._modules.get(_SAMPLERS[kind]))
    if kind == "UNetMidBlock2DCrossAttn" and len(resnets) == len(attentions) + 1:
        return [resnets[0], *(s for a, r in zip(attentions, resnets[1:], strict=True) for s in (a, r))]
    if kind == "Transformer2DModel" and getattr(module, "is_input_continuous", False):
        blocks = _names(f"{name}.transformer_blocks", module._modules.get("transformer_blocks"))
        return [f"{name}.proj_in", *blocks, f"{name}.proj_out"]
    return []


def _holder(steps: list[str], name: str) -> str | None:
    return next((s for s in steps if name == s or name.startswith(s + ".")), None)


def forward_path(model: nn.Module, name: str) -> list[tuple[str, int]]:
    """Where module ``name`` runs: the step holding it at each level of :func:`forward_steps`
    (its unit, the step inside the unit, ...), outermost first, with the step's index among its
    siblings. [] for a module outside every unit."""
    path: list[tuple[str, int]] = []
    container = ""
    while True:
        steps = forward_steps(model, container)
        step = _holder(steps, name)
        if step is None:
            return path
        path.append((step, steps.index(step)))
        if step == name:
            return path
        container = step


def runs_before(model: nn.Module, name: str) -> list[str]:
    """The modules the forward runs wholly before module ``name``, as far as the known steps tell:
    at each level of its :func:`forward_path`, the steps before the one holding it (units first).
    [] for a module outside every unit."""
    before: list[str] = []
    container = ""
    for step, index in forward_path(model, name):
        before += forward_steps(model, container)[:index]
        container = step
    return before


def first_in_forward_order(model: nn.Module, names: list[str]) -> str | None:
    """Of the module ``names``, the one the model's forward reaches first (by :func:`forward_path`;
    a name whose place inside a step is not known counts as that step's start; ties: model order).
    A name outside every unit may run anywhere (e.g. at the input): it is returned as the first.
    None for no names."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    ranked = [(tuple(i for _, i in forward_path(model, n)), order.get(n, 0), n) for n in names]
    outside = [n for path, _, n in ranked if not path]
    if outside:
        return outside[0]
    return min(ranked)[2] if ranked else None
