"""One denoiser interface over every model family, and the conditioning it takes.

``denoiser(x, t, cond)`` evaluates the model on rows ``x`` (R, ...) at timestep ``t``
(scalar or (R,), 0..1000 scale) with per-row conditioning ``cond`` and returns the raw model
output (epsilon, v or flow velocity, as ``prediction_type`` says), the space diffusers'
schedulers step in. A family adapter (``models/families``) supplies the call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import ConfigError

#: Names of the SD-family tensors, in the order the manifest hashes them (others follow, sorted).
SD_NAMES = ("embeds", "pooled", "time_ids")


@dataclass(frozen=True, init=False, eq=False)
class Conditioning:
    """Per-image conditioning as named tensors, plus values shared by every row.

    ``tensors``: batch-first tensors, concatenated and sliced per branch by the engine.
    Common names: ``embeds`` (B, L, D) text-encoder hidden states; ``pooled`` (B, P) the pooled
    text embedding (SDXL, SD3, Flux); ``time_ids`` (B, 6) SDXL's size and crop
    micro-conditioning; ``mask`` (B, L) a text attention mask; ``guidance`` (B,) an embedded
    guidance scale. ``shared``: values that are the same for every row and are never
    concatenated (e.g. Flux's ``txt_ids``/``img_ids``, Qwen-Image's ``img_shapes``); every part
    of a :meth:`cat` must carry equal shared values.

    ``Conditioning(embeds, pooled, time_ids)`` (SD's positional form) still works.
    """

    tensors: Mapping[str, Tensor]
    shared: Mapping[str, Any]

    def __init__(
        self,
        embeds: Tensor | None = None,
        pooled: Tensor | None = None,
        time_ids: Tensor | None = None,
        *,
        tensors: Mapping[str, Tensor] | None = None,
        shared: Mapping[str, Any] | None = None,
    ) -> None:
        named = dict(tensors or {})
        for key, value in zip(SD_NAMES, (embeds, pooled, time_ids), strict=True):
            if value is not None:
                if key in named:
                    raise ConfigError(f"conditioning tensor '{key}' given twice")
                named[key] = value
        if not named:
            raise ConfigError("conditioning needs at least one tensor (e.g. 'embeds')")
        batches = {k: int(v.shape[0]) for k, v in named.items()}
        if len(set(batches.values())) > 1:
            raise ConfigError(f"conditioning tensors disagree on the batch size: {batches}")
        object.__setattr__(self, "tensors", MappingProxyType(named))
        kept = shared if isinstance(shared, MappingProxyType) else MappingProxyType(dict(shared or {}))
        object.__setattr__(self, "shared", kept)  # shared values are never copied per branch

    # -- named access --------------------------------------------------------------------------
    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise ConfigError(f"conditioning has no '{name}' (it has {', '.join(self.tensors)})")
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    @property
    def embeds(self) -> Tensor:
        return self["embeds"]

    @property
    def pooled(self) -> Tensor | None:
        return self.tensors.get("pooled")

    @property
    def time_ids(self) -> Tensor | None:
        return self.tensors.get("time_ids")

    @property
    def batch(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def dtype(self) -> torch.dtype:
        first = self.tensors.get("embeds", next(iter(self.tensors.values())))
        return first.dtype

    def hash_order(self) -> list[Tensor | None]:
        """Every tensor in a fixed order for hashing: SD's three names (None when absent), then
        the others sorted by name."""
        rest = sorted(k for k in self.tensors if k not in SD_NAMES)
        return [self.tensors.get(k) for k in SD_NAMES] + [self.tensors[k] for k in rest]

    # -- rows ----------------------------------------------------------------------------------
    def _map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        return Conditioning(tensors={k: fn(v) for k, v in self.tensors.items()}, shared=self.shared)

    def rows(self, start: int, stop: int) -> Conditioning:
        return self._map(lambda t: t[start:stop])

    def repeat(self, times: int) -> Conditioning:
        """Every row ``times`` times (the whole batch repeated, not each row)."""
        return self._map(lambda t: t.repeat(times, *([1] * (t.ndim - 1))))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; with ``dtype``, floating tensors cast to it (masks and ids keep theirs)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return self._map(move)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Stack the rows of several conditionings (one per branch) in order."""
        names = list(parts[0].tensors)
        for p in parts[1:]:
            if set(p.tensors) != set(names):
                odd = sorted(set(p.tensors) ^ set(names))
                raise ConfigError(
                    f"conditioning field '{odd[0]}' is set for some branches and missing for others"
                )
            if not _same_shared(parts[0].shared, p.shared):
                raise ConfigError("branches carry different shared conditioning values (ids, shapes)")
        if len(parts) == 1:
            return parts[0]
        return Conditioning(
            tensors={k: torch.cat([p.tensors[k] for p in parts]) for k in names}, shared=parts[0].shared
        )


def _same_shared(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a is b:
        return True
    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, Tensor) or isinstance(other, Tensor):
            if not (isinstance(value, Tensor) and isinstance(other, Tensor) and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


class Denoiser(Protocol):
    model: nn.Module
    prediction_type: str

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


class FamilyDenoiser:
    """A family's network as a :class:`Denoiser`: ``family.forward(model, x, t, cond)``."""

    def __init__(self, family: Any, model: nn.Module, prediction_type: str) -> None:
        if prediction_type not in PREDICTIONS:
            raise ConfigError(f"unsupported prediction type '{prediction_type}' ({', '.join(PREDICTIONS)})")
        self.family, self.model, self.prediction_type = family, model, prediction_type

    def check(self, cond: Conditioning) -> None:
        """Missing conditioning the model needs is an error, never a silent default."""
        self.family.check(self.model, cond)

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.family.forward(self.model, x, t, cond)  # type: ignore[no-any-return]


class UNetDenoiser(FamilyDenoiser):
    """Adapter for ``UNet2DConditionModel`` (SD1.5: text embeds; SDXL: + pooled + time ids)."""

    def __init__(self, unet: nn.Module, prediction_type: str = "epsilon") -> None:
        from .families.sd import SDFamily

        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"unsupported prediction type '{prediction_type}' (epsilon or v_prediction)")
        super().__init__(SDFamily(), unet, prediction_type)


PREDICTIONS = ("epsilon", "v_prediction", "flow")


def prediction_to_x0(prediction: str, x: Tensor, sigma: float | Tensor, pred: Tensor) -> Tensor:
    """x0 from a model prediction at noise level sigma, given the model input ``x``.

    ``x`` is what the model saw: for the SD family the variance-preserving sample
    ``x = (x0 + sigma eps) / sqrt(1 + sigma^2)`` (diffusers' ``scale_model_input`` output; DDIM's
    latents are already in that form), for flow models ``x = (1 - sigma) x0 + sigma noise``::

        epsilon:       x0 = x sqrt(1 + sigma^2) - sigma eps
        v_prediction:  x0 = (x - sigma v) / sqrt(1 + sigma^2)
        flow:          x0 = x - sigma v          (v = noise - x0)
    """
    s = sigma if isinstance(sigma, float) else sigma.reshape(-1, *([1] * (x.ndim - 1)))
    if prediction == "epsilon":
        return x * (1 + s * s) ** 0.5 - s * pred
    if prediction == "v_prediction":
        return (x - s * pred) / (1 + s * s) ** 0.5
    if prediction == "flow":
        return x - s * pred
    raise ConfigError(f"unknown prediction type '{prediction}'; one of: {', '.join(PREDICTIONS)}")
