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

from ..errors import LayerSpecError

_PATHS = {"d": "down_blocks", "m": "mid_block", "u": "up_blocks"}
_SHORT = re.compile(r"^([dmu])(\d+)(?:\.(\d+)(?:-(\d+))?)?$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


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


def _prefixes(item: str, names: set[str], units: list[AttentionUnit]) -> list[str]:
    if item in ("down", "mid", "up"):
        return [_PATHS[item[0]]]
    short = _SHORT.match(item)
    if short:
        unit = next((u for u in units if u.alias == f"{short[1]}{short[2]}"), None)
        if unit is None:
            raise LayerSpecError(f"layer '{item}': no attention unit {short[1]}{short[2]}. {_valid(units)}")
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
        close = difflib.get_close_matches(missing[0], sorted(names), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise LayerSpecError(f"layer '{missing[0]}' is not a module of this model.{hint} {_valid(units)}")
    return expanded


def _valid(units: list[AttentionUnit]) -> str:
    listing = ", ".join(f"{u.alias}={u.name} ({u.blocks} blocks)" for u in units)
    return (
        f"Valid: down, mid, up, exact module names, or units {listing}. Run `diffguide layers` to list them."
    )


def select(model: nn.Module, spec: str, is_target: Callable[[str, nn.Module], bool]) -> list[str]:
    """Names of the modules, in model order, that ``spec`` selects and ``is_target`` accepts."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise LayerSpecError("empty layer spec: name at least one layer (e.g. 'mid' or 'd2.2-9')")
    modules = dict(model.named_modules())
    units = attention_units(model)
    chosen: set[str] = set()
    for item in items:
        prefixes = _prefixes(item, set(modules), units)
        found = {
            name
            for name, module in modules.items()
            if any(name == p or name.startswith(p + ".") for p in prefixes) and is_target(name, module)
        }
        if not found:
            raise LayerSpecError(
                f"layer spec item '{item}' selects no module of the needed kind. {_valid(units)}"
            )
        chosen |= found
    return [name for name in modules if name in chosen]


def unit_table(model: nn.Module) -> list[AttentionUnit]:
    """Public alias of :func:`attention_units`, for the ``layers`` command."""
    return attention_units(model)
