"""Branches, windows and the guidance-term protocol.

A *branch* is one model evaluation per image: the conditional prediction ``c``, the
unconditional prediction ``u``, or a perturbed conditional prediction ``p`` (the cond
prompt evaluated with a model-side perturbation installed on that branch's rows).

A *guidance term* declares the branches it needs and returns a delta that is added to the
conditional prediction. The guided prediction of one step is::

    g = c + sum_i delta_i(c, u, p_i, step)      then   g = post_i(g, ...) for each term

All predictions live in the model's own output space (epsilon or v), exactly as diffusers'
pipelines combine them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from torch import Tensor

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..perturb.base import Perturbation

Prompt = Literal["cond", "uncond"]


def check_finite(what: str, value: float) -> None:
    """ConfigError unless ``value`` is a finite number (nan or inf would silently disable a term)."""
    try:
        ok = math.isfinite(value)
    except TypeError:
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not ok:
        raise ConfigError(f"{what} must be a finite number, got {value}")


@dataclass(frozen=True)
class Branch:
    """One model evaluation per image.

    ``name`` is unique within a run ("cond", "uncond", or the name of the term that owns a
    perturbed branch). ``prompt`` says which text conditioning the rows use.
    """

    name: str
    prompt: Prompt
    perturbation: Perturbation | None = None


COND = Branch("cond", "cond")
UNCOND = Branch("uncond", "uncond")


class RunState(dict[str, Any]):
    """Per-run memory of stateful terms (APG's momentum), one entry per term name.

    The engine owns it and makes a fresh one at the start of every run
    (:meth:`GuidedModel.installed`) and hands it to the terms in :attr:`StepInfo.state`, so a
    term's dataclass stays frozen and nothing leaks from one run into the next. Entries hold
    (B, ...) tensors: each image keeps its own history, so a batch equals single-image runs.
    """


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler is: evaluation ``index`` of ``count``, at noise level ``sigma``.

    ``sigma``: the noise level in the family's own parametrisation (SD family: the
    variance-exploding sigma ``sqrt((1 - abar) / abar)``; flow models: the flow sigma in
    [0, 1], ``x = (1 - sigma) x0 + sigma noise``), so a ``Window`` in sigma works for every family.
    ``timestep``: the scheduler's timestep on the 0..1000 scale (UNets: the training timestep
    999..0; flow models: ``1000 sigma``, what diffusers' SD3/Flux schedulers list); diffusers'
    adaptive PAG scale is defined on it. ``x``: the model input of the B images at this step
    (None when a caller does not give it); ``prediction``: the model's output space. With
    both, :meth:`to_x0` turns any branch's prediction into x0 (for terms working in x0 space).
    ``state``: the run's :class:`RunState` (set by the engine; None outside a run).
    """

    index: int
    count: int
    sigma: float
    timestep: float
    x: Tensor | None = field(default=None, compare=False, repr=False)
    prediction: str = "epsilon"
    state: RunState | None = field(default=None, compare=False, repr=False)

    @property
    def fraction(self) -> float:
        """Fraction of the run already done: 0 at the first evaluation."""
        return self.index / max(self.count, 1)

    def to_x0(self, pred: Tensor) -> Tensor:
        """The denoised estimate x0 implied by a branch's prediction (B, ...) at this step."""
        from ..models.denoiser import prediction_to_x0

        if self.x is None:
            raise ConfigError("this step carries no model input x; x0 cannot be computed")
        return prediction_to_x0(self.prediction, self.x, self.sigma, pred)


@dataclass(frozen=True)
class Window:
    """When a term is active: ``sigma_min <= sigma <= sigma_max`` and ``start <= fraction < end``.

    ``fraction`` is ``index / count`` (0 at the first model evaluation). The default window
    covers the whole run. A term outside its window adds no rows to the batch.
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        for what, value in (("sigma_min", self.sigma_min), ("start", self.start), ("end", self.end)):
            check_finite(f"window {what}", value)
        if self.sigma_max != math.inf:  # +inf is the documented "no upper bound"
            check_finite("window sigma_max (or inf for no bound)", self.sigma_max)
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ConfigError(f"window start/end must lie in [0, 1], got start={self.start}, end={self.end}")
        if self.start >= self.end:
            raise ConfigError(f"window start ({self.start}) must be below its end ({self.end})")
        if self.sigma_min < 0 or self.sigma_min > self.sigma_max:
            raise ConfigError(
                f"window needs 0 <= sigma_min <= sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )

    def describe(self) -> dict[str, float | None]:
        """JSON-safe form (an infinite sigma_max is written as None)."""
        sigma_max = None if math.isinf(self.sigma_max) else self.sigma_max
        return {"sigma_min": self.sigma_min, "sigma_max": sigma_max, "start": self.start, "end": self.end}

    @staticmethod
    def from_dict(d: Mapping[str, float | None]) -> Window:
        def get(key: str, default: float) -> float:
            value = d.get(key)
            return default if value is None else float(value)

        return Window(get("sigma_min", 0.0), get("sigma_max", math.inf), get("start", 0.0), get("end", 1.0))

    def contains(self, step: StepInfo) -> bool:
        return self.sigma_min <= step.sigma <= self.sigma_max and self.start <= step.fraction < self.end


Predictions = Mapping[str, Tensor]


@runtime_checkable
class GuidanceTerm(Protocol):
    """What the engine needs from a guidance method."""

    @property
    def name(self) -> str: ...

    @property
    def window(self) -> Window: ...

    def branches(self) -> tuple[Branch, ...]:
        """Branches this term needs besides ``cond`` (which every run evaluates)."""
        ...

    def active(self, step: StepInfo) -> bool:
        """Whether the term contributes at this step (window, and a non-zero strength)."""
        ...

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        """The term's contribution, added to ``c``. Shapes: every tensor is (B, C, H, W)."""
        ...

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        """A correction of the combined prediction (CFG's rescale); identity by default."""
        ...

    def describe(self) -> dict[str, object]:
        """Parameters for the manifest."""
        ...
