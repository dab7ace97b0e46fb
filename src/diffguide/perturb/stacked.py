"""Two in-place perturbations of the conditional rows at once (NAG + PLADIS).

The engine has one conditional branch. When two terms both change it in place (PLADIS: every
row's cross-attention maps; NAG: the prompt rows' cross-attention outputs), the branch carries a
:class:`Stacked` perturbation: each part is installed under its own row key (``cond/0``,
``cond/1``) and gets the rows its own ``scope`` selects, per step only while its term is active.
The part acting on every row (PLADIS) is installed first, so it is the inner processor; NAG's
processor wraps it and computes its own attentions with PLADIS's maps while PLADIS is active (NAG
on the PLADIS model; see :mod:`.nag_attention`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import ForwardContext


def stackable(perturbation: object) -> bool:
    return bool(getattr(perturbation, "stacks_in_place", False))


@dataclass(frozen=True)
class Stacked:
    """In-place perturbations of one branch; ``active``: the parts listed at this step (indices)."""

    parts: tuple[Any, ...]
    active: tuple[int, ...] = ()

    @staticmethod
    def of(a: object, b: object) -> Stacked:
        """``a`` and ``b`` stacked (model-wide parts first), or a one-line error when they cannot be."""
        if not (stackable(a) and stackable(b)) or type(a) is type(b):  # only NAG + PLADIS stack
            raise ConfigError("two guidance terms perturb the conditional rows; keep one of them")
        parts = sorted((a, b), key=lambda p: getattr(p, "scope", "rows") != "all")
        return Stacked(tuple(parts), tuple(range(len(parts))))

    def only(self, perturbations: list[object]) -> Stacked:
        """The parts among ``perturbations`` (the active terms' ones), keeping each part's index."""
        return Stacked(self.parts, tuple(i for i, p in enumerate(self.parts) if p in perturbations))

    def row_parts(self, name: str) -> list[tuple[str, object]]:
        """``(row key, part)`` of each active part: the engine gives each its own rows."""
        return [(f"{name}/{i}", self.parts[i]) for i in self.active]

    @property
    def layers(self) -> str | None:
        return None

    def targets(self, model: nn.Module) -> list[str]:
        names: list[str] = []
        for part in self.parts:
            names += [n for n in part.targets(model) if n not in names]
        return names

    def allows_prefix_sharing(self, model: nn.Module) -> bool:
        return all(getattr(p, "allows_prefix_sharing", lambda m: True)(model) for p in self.parts)

    @contextmanager
    def install(self, model: nn.Module, branch: str, ctx: ForwardContext) -> Iterator[None]:
        with ExitStack() as stack:
            for i, part in enumerate(self.parts):
                stack.enter_context(part.install(model, f"{branch}/{i}", ctx))
            yield
