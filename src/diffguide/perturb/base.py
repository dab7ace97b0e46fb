"""Scoped, row-aware model perturbations.

A perturbation is a *spec* (frozen dataclass: what to do and to which layers). ``install``
binds it to one model for one run and returns a context manager that puts its hooks or
attention processors in place on entry and removes them in ``finally``.

While installed, a perturbation acts only on the rows of its own branch. The engine says
which rows those are, per forward call, through the shared :class:`ForwardContext`; a
perturbation whose branch has no rows in the current call leaves the model untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..models.layers import first_in_forward_order, select
from ..models.presets import Method, default_layers


@dataclass(frozen=True)
class BranchRows:
    """Rows ``rows`` of the current forward call belong to the branch; row r shows image ``images[r]``."""

    rows: slice
    images: tuple[int, ...]


@dataclass
class ForwardContext:
    """Mutable state the engine shares with installed perturbations during one run.

    Perturbations draw their random values from :meth:`generator`. When the engine has to
    repeat a step's forwards (out-of-memory retry), :meth:`rollback` returns every generator to
    its :meth:`checkpoint` and tells the ``retry_listeners`` (e.g. a trace recorder's module
    hooks) to drop what the abandoned attempt produced.
    """

    seeds: tuple[int, ...]
    rows: dict[str, BranchRows] = field(default_factory=dict)
    generators: dict[tuple[str, int], torch.Generator] = field(default_factory=dict)
    retry_listeners: list[Callable[[], None]] = field(default_factory=list)
    negative: torch.Tensor | None = None  # (B, L, D) the negative prompt's text embeddings (NAG)
    negative_pooled: torch.Tensor | None = None  # (B, D) its pooled embedding, where the model takes one
    #: ``(rows of a call that holds them, count)``: rows an in-model perturbation appended after the
    #: engine's rows for the current forward (NAG on a DiT: the negative text stream); None: none.
    appended: tuple[int, int] | None = None

    def rows_of(self, branch: str) -> BranchRows | None:
        return self.rows.get(branch)

    @contextmanager
    def sub_batch(self, rows: slice, n: int, inside: bool) -> Iterator[None]:
        """While a perturbation runs a module on part of its n rows (the rows inside ``rows``, or the
        rest), every branch's rows are given in that part's coordinates (so a second perturbation
        on the same module edits the right rows); restored on exit."""
        saved, appended = self.rows, self.appended
        relabelled = {k: _relabel(v, rows, n, inside) for k, v in saved.items()}
        self.rows = {k: v for k, v in relabelled.items() if v is not None}
        if appended is not None:  # appended rows lie after every branch's rows: in the outside part
            a, b = _bounds(rows, n)
            self.appended = None if inside or n != appended[0] else (n - (b - a), appended[1])
        try:
            yield
        finally:
            self.rows, self.appended = saved, appended

    def generator(self, branch: str, image: int) -> torch.Generator:
        """Image ``image``'s CPU generator for ``branch``, seeded ``branch_seed(seed_i, branch)``."""
        key = (branch, image)
        if key not in self.generators:
            self.generators[key] = torch.Generator().manual_seed(branch_seed(self.seeds[image], branch))
        return self.generators[key]

    def checkpoint(self) -> dict[tuple[str, int], torch.Tensor]:
        return {k: g.get_state() for k, g in self.generators.items()}

    def rollback(self, state: dict[tuple[str, int], torch.Tensor]) -> None:
        """Undo an abandoned attempt: generators back to ``state``, listeners told."""
        for key in [k for k in self.generators if k not in state]:  # created during the attempt
            del self.generators[key]
        for key, value in state.items():
            self.generators[key].set_state(value)
        for listener in self.retry_listeners:
            listener()


@runtime_checkable
class Perturbation(Protocol):
    """A model-side perturbation applied to one branch's rows."""

    @property
    def layers(self) -> str | None:
        """The layer spec, or None for the method's preset."""
        ...

    def targets(self, model: nn.Module) -> list[str]:
        """Fully-qualified names of the modules the spec selects on ``model`` (a dry run)."""
        ...

    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> AbstractContextManager[None]:
        """Install on ``model`` for rows of ``branch``; removed when the context exits."""
        ...

    # Optional (read through :func:`first_perturbed_module`, so a perturbation without it still
    # satisfies this protocol): ``first_module(model) -> str | None``, the module at which the
    # branch first differs from the conditional branch. The engine computes everything the
    # model's forward runs before that module's unit once for the branch and the conditional
    # rows (prefix sharing). None, the default, means "differs from the input on": nothing shared.


def row_parts(branch: Any) -> list[tuple[str, object]]:
    """``(row key, perturbation)`` pairs the engine lists rows for: the branch's own, or each part
    of a stacked perturbation (:class:`~diffguide.perturb.stacked.Stacked`) under its own key."""
    method = getattr(branch.perturbation, "row_parts", None)
    return method(branch.name) if callable(method) else [(branch.name, branch.perturbation)]  # type: ignore[no-any-return]


def in_scope(branches: Sequence[Any], k: int, j: int, perturbation: object = None) -> bool:
    """Whether branch ``k``'s perturbation acts on the rows of branch ``j``.

    A perturbation's optional ``scope``: ``"rows"`` (the default) its own branch's rows;
    ``"prompt"`` every branch's rows with its branch's prompt (NAG on the conditional branch also
    acts on PAG's, SEG's, ... rows); ``"all"`` every row (PLADIS, a model-wide change). The
    engine lays the unconditional rows first, so the rows in scope are contiguous. ``perturbation``:
    one part of branch ``k``'s stacked perturbation instead of the branch's own."""
    scope = getattr(perturbation if perturbation is not None else branches[k].perturbation, "scope", "rows")
    if scope == "all":
        return True
    if scope == "prompt":
        return bool(branches[j].prompt == branches[k].prompt)
    return j == k


def first_perturbed_module(perturbation: object, model: nn.Module) -> str | None:
    """``perturbation.first_module(model)``, or None (no prefix sharing) when it has no such method.

    A perturbation that acts before the model's first unit (on the text tokens, the latents,
    the time embedding) must return None or a module outside every unit
    (:func:`~diffguide.models.layers.forward_units`); both mean "share nothing".
    """
    method = getattr(perturbation, "first_module", None)
    return method(model) if callable(method) else None  # type: ignore[no-any-return]


def select_targets(
    model: nn.Module, layers: str | None, method: Method, is_target: Callable[[str, nn.Module], bool]
) -> list[str]:
    """The modules a perturbation acts on: ``layers`` (a layer spec) or the method's preset."""
    return select(model, default_layers(model, method) if layers is None else layers, is_target)


def first_target(model: nn.Module, targets: list[str]) -> str | None:
    """The first of a perturbation's ``targets`` in the model's forward order (its ``first_module``)."""
    return first_in_forward_order(model, targets)


def _bounds(rows: slice, n: int) -> tuple[int, int]:
    return rows.start or 0, rows.stop if rows.stop is not None else n


def _relabel(sel: BranchRows, rows: slice, n: int, inside: bool) -> BranchRows | None:
    """``sel`` in the coordinates of the rows inside ``rows`` (or of the others), None if it has none there."""
    a, b = _bounds(rows, n)
    s, e = _bounds(sel.rows, n)
    if inside:
        lo, hi = max(s, a), min(e, b)
        return BranchRows(slice(lo - a, hi - a), sel.images[lo - s : hi - s]) if lo < hi else None
    parts = [(lo, hi) for lo, hi in ((s, min(e, a)), (max(s, b), e)) if lo < hi]
    if not parts:
        return None
    images = tuple(i for lo, hi in parts for i in sel.images[lo - s : hi - s])
    start = parts[0][0] if parts[0][0] < a else parts[0][0] - (b - a)
    return BranchRows(slice(start, start + len(images)), images)


def branch_seed(seed: int, branch: str) -> int:
    """A 63-bit seed for a branch's own random draws (e.g. TPG permutations) of one image.

    Derived from the image seed and the branch name with SHA-256, so it never collides with
    the noise generator and two perturbed branches draw independent values.
    """
    digest = hashlib.sha256(f"diffguide/{branch}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def take_rows(x: torch.Tensor, rows: slice, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a per-row tensor (first dim ``n``) into (rows outside ``rows``, rows inside)."""
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else n
    inside = x[start:stop]
    if start == 0:
        return x[stop:], inside
    if stop == n:
        return x[:start], inside
    return torch.cat([x[:start], x[stop:]]), inside


def put_rows(outside: torch.Tensor, inside: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """Inverse of :func:`take_rows`: reassemble the full (n, ...) tensor in row order."""
    start = rows.start or 0
    return torch.cat([outside[:start], inside, outside[start:]])
