"""Prefix sharing: a perturbed branch reuses the conditional branch's work up to its first perturbed module.

A perturbed branch sees the conditional branch's latents, timestep and prompt, so every layer
before its first perturbed module computes exactly the conditional rows' numbers. The model's
forward is a sequence of *units* (:func:`~diffguide.models.layers.forward_units`: a DiT's
blocks; a UNet's down blocks, mid block and up blocks), and some units are sequences of known
*steps* in turn (:func:`~diffguide.models.layers.forward_steps`: a UNet block's resnets,
attentions and down/upsampler; a ``Transformer2DModel``'s ``proj_in`` and transformer blocks).
Each perturbed branch declares its first perturbed module
(:func:`~diffguide.perturb.base.first_perturbed_module`); the plan (:class:`PrefixPlan`) knows the
exact modules the forward runs wholly before it (:func:`~diffguide.models.layers.runs_before`):
the units before the one holding it, then the steps before it inside that unit, and so on. PAG on
an SDXL mid block shares the down blocks, ``mid_block.resnets.0`` and the attention's
``proj_in``; a block type without known steps (a DiT block) fans out whole. Each shared module
runs only on the rows that differ (unconditional, conditional, and the branches already fanned
out) and its outputs are copied into the shared branch's row slots, so what follows sees all
rows again. A shared step inside a shared unit (another branch fans out inside that unit) runs
on the rows the unit was given, less its own sharing branches' rows.

Everything that flows from module to module is an argument or a return value and is copied with
it: the hidden states, a joint block's text stream (``encoder_hidden_states``), and a UNet down
block's residuals (the skip connections its up block reads later; an up block's resnet gets them
concatenated with its input). What every module reads from the model's forward (``temb``, the
text embeddings, rotary embeddings) is computed on all rows outside the units (cheap) and cut to
the computed rows at each shared module.

The model computes the same numbers as without sharing, up to the last bits a smaller batch may
change in a matrix product (float32: well under 1e-5 on final latents, tested per family). A
branch whose first perturbed module lies outside every unit, or that has no ``first_module``,
shares nothing; so does a branch that perturbs the conditional or unconditional rows in place
(NAG, PLADIS, an unconditional query shuffle: those rows are what the others share from). The
engine says, per forward chunk, which rows there are (:meth:`PrefixPlan.chunk`); a row whose
conditional twin is in another chunk is computed itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DiffguideError
from .guidance.base import Branch
from .models.layers import forward_path, runs_before
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
    """How one shared module runs on one chunk: of the n rows it is given, it computes those at
    positions ``keep`` (m rows); row r of its output is row ``gather[r]`` of what it computed.
    ``computed``: the chunk rows (chunk-relative indices) those m rows are, for the modules nested
    inside it. ``rows``: each perturbed branch's rows among the m computed rows (the engine's
    ``ctx.rows`` while the module runs)."""

    keep: Tensor
    gather: Tensor
    computed: tuple[int, ...]
    rows: dict[str, BranchRows]
    span: tuple[int, int] | None  # keep as one range [a, b): cut by slicing (no copy, no .item())


@dataclass
class ChunkRows:
    """One forward chunk's rows [start, stop) of the step's branches, and, per (rows a shared
    module is given, branches that share it), how it runs (computed once, then cached)."""

    branches: list[Branch]
    batch: int
    start: int
    stop: int
    device: torch.device
    _cache: dict[tuple[tuple[int, ...], frozenset[str]], UnitRows | None] = field(default_factory=dict)

    @property
    def every_row(self) -> tuple[int, ...]:
        return tuple(range(self.stop - self.start))

    def plan(self, given: tuple[int, ...], shared: frozenset[str]) -> UnitRows | None:
        """How a module shared by the branches ``shared`` runs on the chunk rows ``given``
        (None: it computes every row given)."""
        key = (given, shared)
        if key not in self._cache:
            self._cache[key] = _unit_rows(self, given, shared)
        return self._cache[key]


@dataclass
class ChunkState:
    """The engine's current chunk (None: every module runs every row), and the chunk rows each
    shared module now running was given (innermost last; empty: the whole chunk)."""

    units: ChunkRows | None = None
    given: list[tuple[int, ...]] = field(default_factory=list)


class PrefixPlan:
    """Which modules each perturbed branch shares with the conditional rows, on one model.

    ``fan``: per branch, the module at which it fans out (the innermost known step holding its
    first perturbed module: a whole unit, or e.g. ``mid_block.attentions.0.transformer_blocks.0``).
    ``shared``: per module the forward runs wholly before some branch's fan-out, the branches
    that share it (:func:`~diffguide.models.layers.runs_before`: the units before the fan-out
    unit, then inside it the steps before, e.g. ``mid_block.resnets.0``)."""

    def __init__(self, model: nn.Module, branches: Iterable[Branch]) -> None:
        branches = list(branches)
        self.fan: dict[str, str] = {}
        shared: dict[str, set[str]] = {}
        for b in branches:
            # an in-place branch (a perturbed cond or uncond) is the rows the others share from
            if b.perturbation is None or b.prompt != "cond" or b.name in ("cond", "uncond"):
                continue
            first = first_perturbed_module(b.perturbation, model)
            path = forward_path(model, first) if first is not None else []
            before = runs_before(model, first) if first is not None else []
            if before:
                self.fan[b.name] = path[-1][0]
            for name in before:
                shared.setdefault(name, set()).add(b.name)
        if any(not _allows_sharing(b.perturbation, model) for b in branches):
            # e.g. NAG on a DiT: the conditional rows differ from the perturbed ones from the start
            self.fan, shared = {}, {}
        order = list(dict(model.named_modules()))
        self.shared = {n: frozenset(shared[n]) for n in sorted(shared, key=order.index)}
        self._cache: dict[tuple[Any, ...], ChunkRows] = {}

    @property
    def shared_units(self) -> int:
        """How many modules may run on fewer rows (0: sharing does nothing)."""
        return len(self.shared)

    def chunk(
        self, branches: list[Branch], batch: int, start: int, stop: int, device: torch.device
    ) -> ChunkRows:
        """The chunk's rows [start, stop): which of them each shared module computes (cached)."""
        key = (tuple(b.name for b in branches), batch, start, stop, str(device))
        if key not in self._cache:
            self._cache[key] = ChunkRows(branches, batch, start, stop, device)
        return self._cache[key]


def _allows_sharing(perturbation: object, model: nn.Module) -> bool:
    """A perturbation's optional ``allows_prefix_sharing(model)`` (default True): False when it
    changes the conditional rows but not the rows of the branches that would copy them."""
    method = getattr(perturbation, "allows_prefix_sharing", None)
    return bool(method(model)) if callable(method) else True


def _unit_rows(chunk: ChunkRows, given: tuple[int, ...], shared: frozenset[str]) -> UnitRows | None:
    """A row of a sharing branch is copied from its conditional twin when the twin is given too
    (conditional rows are never dropped, so the twin is given whenever it is in the chunk)."""
    branches, batch, start = chunk.branches, chunk.batch, chunk.start
    cond = next(k for k, b in enumerate(branches) if b.name == "cond")
    position = {r: p for p, r in enumerate(given)}
    source = list(range(len(given)))
    for p, r in enumerate(given):
        k, i = divmod(start + r, batch)
        twin = cond * batch + i - start
        if branches[k].name in shared and twin in position:
            source[p] = position[twin]
    keep = [p for p in range(len(given)) if source[p] == p]
    if len(keep) == len(given):
        return None
    computed = tuple(given[p] for p in keep)
    new = {p: q for q, p in enumerate(keep)}
    rows: dict[str, BranchRows] = {}
    for k, b in enumerate(branches):
        if b.perturbation is None:
            continue
        for key, part in row_parts(b):
            mine = [
                (q, (start + r) % batch)
                for q, r in enumerate(computed)
                if in_scope(branches, k, (start + r) // batch, part)
            ]
            if mine:
                rows[key] = BranchRows(slice(mine[0][0], mine[-1][0] + 1), tuple(i for _, i in mine))
    return UnitRows(
        keep=torch.tensor(keep, dtype=torch.long, device=chunk.device),
        gather=torch.tensor(
            [new[source[p]] for p in range(len(given))], dtype=torch.long, device=chunk.device
        ),
        computed=computed,
        rows=rows,
        span=(keep[0], keep[-1] + 1) if keep == list(range(keep[0], keep[-1] + 1)) else None,
    )


@contextmanager
def sharing(model: nn.Module, plan: PrefixPlan, ctx: ForwardContext, state: ChunkState) -> Iterator[None]:
    """Wrap the forward of each module that may be shared (this model instance only); restored on exit.

    Install after the perturbations, so that a module a perturbation also wraps (a skipped DiT
    block) sees its rows cut first and the branch's rows renumbered in ``ctx.rows``."""
    modules = dict(model.named_modules())
    with ExitStack() as stack:
        for name, shared in plan.shared.items():
            wrapper = _wrapper(name, shared, modules[name], ctx, state)
            stack.enter_context(scoped_forward(modules[name], wrapper))
        yield


def _wrapper(
    name: str, shared: frozenset[str], module: nn.Module, ctx: ForwardContext, state: ChunkState
) -> Any:
    forward = type(module).forward.__get__(module)  # the class's signature, not a wrapper's
    named = arg_namer(forward)
    first = next(iter(inspect.signature(forward).parameters))  # the hidden states (input_tensor, input)

    def make(original: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            chunk = state.units
            if chunk is None:
                return original(*args, **kwargs)
            given = state.given[-1] if state.given else chunk.every_row
            call = named(args, kwargs)
            rows = call[first].shape[0]
            if rows != len(given):
                raise DiffguideError(
                    f"prefix sharing: {name} got {rows} rows, the engine planned {len(given)}"
                )
            plan = chunk.plan(given, shared)
            if plan is None:
                return original(*args, **kwargs)
            sub = {k: _cut(name, k, v, plan, len(given), k == first) for k, v in call.items()}
            saved = ctx.rows
            ctx.rows = plan.rows
            state.given.append(plan.computed)
            try:
                out = original(**sub)
            finally:
                ctx.rows = saved
                state.given.pop()
            return _spread(name, out, plan)

        return wrapped

    return make


def _rows(x: Tensor, plan: UnitRows) -> Tensor:
    if plan.span is not None:
        return x[plan.span[0] : plan.span[1]]
    return x.index_select(0, plan.keep)


def _has_rows(value: Any, n: int) -> bool:
    if isinstance(value, Tensor):
        return value.ndim > 0 and value.shape[0] == n
    if isinstance(value, (tuple, list)):
        return any(_has_rows(v, n) for v in value)
    if isinstance(value, dict):
        return any(_has_rows(v, n) for v in value.values())
    return False


def _cut(unit: str, key: str, value: Any, plan: UnitRows, n: int, per_row: bool = False) -> Any:
    """A module argument cut to the computed rows (per-row), or as it is (shared)."""
    if key in PER_ROW or per_row:
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(_cut(unit, key, v, plan, n, per_row) for v in value)
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
