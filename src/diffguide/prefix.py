"""Prefix sharing: a perturbed branch reuses the conditional branch's work up to its first perturbed unit.

A perturbed branch sees the conditional branch's latents, timestep and prompt, so every layer
before its first perturbed module computes exactly the conditional rows' numbers. The model's
forward is a sequence of *units* (:func:`~diffguide.models.layers.forward_units`: a DiT's
blocks; a UNet's down blocks, mid block and up blocks); each perturbed branch declares its first
perturbed module (:func:`~diffguide.perturb.base.first_perturbed_module`), which fixes its
*fan-out unit*. For every unit before a branch's fan-out unit, the unit runs only on the rows
that differ (unconditional, conditional, and the branches already fanned out) and its outputs
are copied into the shared branch's row slots, so the next unit sees all rows again.

Everything that flows from unit to unit is an argument or a return value of the unit and is
copied with it: the hidden states, a joint block's text stream (``encoder_hidden_states``), and
a UNet down block's residuals (the skip connections its up block reads later). What every unit
reads from the model's forward (``temb``, the text embeddings, rotary embeddings) is computed on
all rows outside the units (cheap) and cut to the computed rows at each shared unit.

The model computes the same numbers as without sharing, up to the last bits a smaller batch may
change in a matrix product (float32: well under 1e-5 on final latents, tested per family). A
branch whose first perturbed module lies outside every unit, or that has no ``first_module``,
shares nothing. The engine says, per forward chunk, which rows each unit computes
(:meth:`PrefixPlan.chunk`); a row whose conditional twin is in another chunk is computed itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DiffguideError
from .guidance.base import Branch
from .models.layers import forward_units, unit_index
from .perturb.base import BranchRows, ForwardContext, first_perturbed_module, in_scope, row_parts
from .perturb.dit import arg_namer, scoped_forward

#: Unit arguments holding one entry per row (cut to the computed rows at a shared unit).
PER_ROW = (
    "hidden_states",
    "encoder_hidden_states",
    "temb",
    "attention_mask",
    "encoder_attention_mask",
    "encoder_hidden_states_mask",
    "res_hidden_states_tuple",
    "additional_residuals",
)
#: Unit arguments the same for every row (passed as they are).
SHARED = (
    "image_rotary_emb",
    "joint_attention_kwargs",
    "attention_kwargs",
    "cross_attention_kwargs",
    "modulate_index",
    "upsample_size",
)


@dataclass(frozen=True)
class UnitRows:
    """How one unit runs on one chunk: it computes rows ``keep`` (m of the chunk's n rows); row r
    of its output is row ``gather[r]`` of what it computed. ``rows``: each perturbed branch's rows
    among the m computed rows (the engine's ``ctx.rows`` while the unit runs)."""

    keep: Tensor
    gather: Tensor
    rows: dict[str, BranchRows]
    contiguous: bool  # keep is one range: cut by slicing (no copy)


@dataclass
class ChunkState:
    """The engine's per-chunk plan (one entry per shared unit; None: every unit runs all rows)."""

    units: list[UnitRows | None] | None = None


class PrefixPlan:
    """Each perturbed branch's fan-out unit on one model."""

    def __init__(self, model: nn.Module, branches: Iterable[Branch]) -> None:
        self.units = forward_units(model)
        self.fan: dict[str, int] = {}
        for b in branches:
            if b.perturbation is None or b.prompt != "cond":
                continue
            first = first_perturbed_module(b.perturbation, model)
            index = unit_index(self.units, first) if first is not None else None
            if index:  # None or 0: differs from the first unit on
                self.fan[b.name] = index
        if any(not _allows_sharing(b.perturbation, model) for b in branches):
            self.fan = {}  # e.g. NAG on a DiT: the conditional rows differ from the perturbed ones from unit 0
        self._cache: dict[tuple[Any, ...], list[UnitRows | None]] = {}

    @property
    def shared_units(self) -> int:
        """How many leading units may run on fewer rows (0: sharing does nothing)."""
        return max(self.fan.values(), default=0)

    def chunk(
        self, branches: list[Branch], batch: int, start: int, stop: int, device: torch.device
    ) -> list[UnitRows | None]:
        """Per unit before the last fan-out: which of the chunk's rows [start, stop) it computes."""
        key = (tuple(b.name for b in branches), batch, start, stop, str(device))
        if key not in self._cache:
            by_shared: dict[frozenset[str], UnitRows | None] = {}
            plans: list[UnitRows | None] = []
            for j in range(self.shared_units):
                shared = frozenset(b.name for b in branches if self.fan.get(b.name, 0) > j)
                if shared not in by_shared:
                    by_shared[shared] = _unit_rows(branches, batch, start, stop, shared, device)
                plans.append(by_shared[shared])
            self._cache[key] = plans
        return self._cache[key]


def _allows_sharing(perturbation: object, model: nn.Module) -> bool:
    """A perturbation's optional ``allows_prefix_sharing(model)`` (default True): False when it
    changes the conditional rows but not the rows of the branches that would copy them."""
    method = getattr(perturbation, "allows_prefix_sharing", None)
    return bool(method(model)) if callable(method) else True


def _unit_rows(
    branches: list[Branch], batch: int, start: int, stop: int, shared: frozenset[str], device: torch.device
) -> UnitRows | None:
    cond = next(k for k, b in enumerate(branches) if b.name == "cond")
    n = stop - start
    source = list(range(n))
    for r in range(n):
        k, i = divmod(start + r, batch)
        twin = cond * batch + i - start
        if branches[k].name in shared and 0 <= twin < n:
            source[r] = twin
    keep = [r for r in range(n) if source[r] == r]
    if len(keep) == n:
        return None
    position = {r: p for p, r in enumerate(keep)}
    rows: dict[str, BranchRows] = {}
    for k, b in enumerate(branches):
        if b.perturbation is None:
            continue
        for key, part in row_parts(b):
            mine = [
                (position[r], (start + r) % batch)
                for r in keep
                if in_scope(branches, k, (start + r) // batch, part)
            ]
            if mine:
                rows[key] = BranchRows(slice(mine[0][0], mine[-1][0] + 1), tuple(i for _, i in mine))
    return UnitRows(
        keep=torch.tensor(keep, dtype=torch.long, device=device),
        gather=torch.tensor([position[source[r]] for r in range(n)], dtype=torch.long, device=device),
        rows=rows,
        contiguous=keep == list(range(keep[0], keep[-1] + 1)),
    )


@contextmanager
def sharing(model: nn.Module, plan: PrefixPlan, ctx: ForwardContext, state: ChunkState) -> Iterator[None]:
    """Wrap the forward of each unit that may be shared (this model instance only); restored on exit.

    Install after the perturbations, so that a unit a perturbation also wraps (a skipped DiT
    block) sees its rows cut first and the branch's rows renumbered in ``ctx.rows``."""
    modules = dict(model.named_modules())
    with ExitStack() as stack:
        for j in range(plan.shared_units):
            name = plan.units[j]
            stack.enter_context(scoped_forward(modules[name], _wrapper(j, name, modules[name], ctx, state)))
        yield


def _wrapper(j: int, name: str, module: nn.Module, ctx: ForwardContext, state: ChunkState) -> Any:
    named = arg_namer(type(module).forward.__get__(module))  # the class's signature, not a wrapper's

    def make(original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            plan = state.units[j] if state.units is not None else None
            if plan is None:
                return original(*args, **kwargs)
            call = named(args, kwargs)
            n = int(plan.gather.shape[0])
            rows = call["hidden_states"].shape[0]
            if rows != n:
                raise DiffguideError(f"prefix sharing: {name} got {rows} rows, the engine planned {n}")
            sub = {k: _cut(name, k, v, plan, n) for k, v in call.items()}
            saved = ctx.rows
            ctx.rows = plan.rows
            try:
                out = original(**sub)
            finally:
                ctx.rows = saved
            return _spread(name, out, plan)

        return forward

    return make


def _rows(x: Tensor, plan: UnitRows) -> Tensor:
    if plan.contiguous:
        first = int(plan.keep[0])
        return x[first : first + plan.keep.shape[0]]
    return x.index_select(0, plan.keep)


def _has_rows(value: Any, n: int) -> bool:
    if isinstance(value, Tensor):
        return value.ndim > 0 and value.shape[0] == n
    if isinstance(value, (tuple, list)):
        return any(_has_rows(v, n) for v in value)
    if isinstance(value, dict):
        return any(_has_rows(v, n) for v in value.values())
    return False


def _cut(unit: str, key: str, value: Any, plan: UnitRows, n: int) -> Any:
    """A unit argument cut to the computed rows (per-row), or as it is (shared)."""
    if key in PER_ROW:
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(_cut(unit, key, v, plan, n) for v in value)
        if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != n:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise DiffguideError(
                f"prefix sharing: {unit} argument '{key}' is {shape}, not one entry per row ({n}); "
                "run with --no-prefix-sharing"
            )
        return _rows(value, plan)
    if _has_rows(value, n) and (key not in SHARED or isinstance(value, dict)):  # kwargs dicts: rows?
        raise DiffguideError(
            f"prefix sharing: {unit} takes '{key}', which may hold per-row values it cannot cut; "
            "run with --no-prefix-sharing"
        )
    return value


def _spread(unit: str, out: Any, plan: UnitRows) -> Any:
    """A unit's output on the computed rows, copied out to every row of the chunk."""
    if out is None:
        return None
    if isinstance(out, tuple):
        return tuple(_spread(unit, o, plan) for o in out)
    if isinstance(out, Tensor) and out.ndim > 0 and out.shape[0] == plan.keep.shape[0]:
        return out.index_select(0, plan.gather)
    raise DiffguideError(
        f"prefix sharing: cannot spread the output of {unit} ({type(out).__name__}) over rows"
    )
