"""One denoiser interface over diffusers UNets.

``denoiser(x, t, cond)`` evaluates the model on rows ``x`` (R, C, H, W) at model timestep
``t`` (scalar or (R,)) with per-row conditioning ``cond`` and returns the raw model output
(epsilon or v, as ``prediction_type`` says), the space diffusers' schedulers step in.
:meth:`UNetDenoiser.denoise` gives the k-diffusion view ``denoise(x, sigma, cond) -> x0``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Conditioning:
    """Per-image conditioning; every tensor has the batch as its first dim.

    ``embeds``: (B, L, D) text-encoder hidden states. SDXL also needs ``pooled`` (B, P), the
    pooled text embedding of the second encoder, and ``time_ids`` (B, 6), its size and crop
    micro-conditioning.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    def rows(self, start: int, stop: int) -> Conditioning:
        return Conditioning(
            self.embeds[start:stop], _slice(self.pooled, start, stop), _slice(self.time_ids, start, stop)
        )

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Stack the rows of several conditionings (one per branch) in order."""
        out: dict[str, Tensor | None] = {}
        for f in fields(Conditioning):
            values = [getattr(p, f.name) for p in parts]
            if any(v is None for v in values) and not all(v is None for v in values):
                raise ConfigError(
                    f"conditioning field '{f.name}' is set for some branches and missing for others"
                )
            out[f.name] = None if values[0] is None else torch.cat(values)
        embeds = out["embeds"]
        assert embeds is not None
        return Conditioning(embeds, out["pooled"], out["time_ids"])


def _slice(x: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if x is None else x[start:stop]


class Denoiser(Protocol):
    model: nn.Module
    prediction_type: str

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


class UNetDenoiser:
    """Adapter for ``UNet2DConditionModel`` (SD1.5: text embeds; SDXL: + pooled + time ids)."""

    def __init__(self, unet: nn.Module, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"unsupported prediction type '{prediction_type}' (epsilon or v_prediction)")
        self.model = unet
        self.prediction_type = prediction_type
        self.needs_text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def check(self, cond: Conditioning) -> None:
        """Missing SDXL conditioning is an error, never a silent default."""
        if self.needs_text_time and (cond.pooled is None or cond.time_ids is None):
            missing = [n for n, v in (("pooled", cond.pooled), ("time_ids", cond.time_ids)) if v is None]
            raise ConfigError(
                f"this UNet (SDXL-style, addition_embed_type='text_time') needs {' and '.join(missing)} "
                "conditioning; encode the prompt with the SDXL pipeline or load them from the conditioning file"
            )

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if self.needs_text_time else None
        out = self.model(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)
        return out[0]

    def denoise(self, x: Tensor, sigma: Tensor, output: Tensor) -> Tensor:
        """x0 from the noisy sample x (sigma-space, unscaled) and the model output at sigma."""
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        if self.prediction_type == "epsilon":
            return x - s * output
        return x / (s**2 + 1) - output * s / (s**2 + 1) ** 0.5
