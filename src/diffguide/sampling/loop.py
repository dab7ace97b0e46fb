"""The sampling loop over a diffusers scheduler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..engine import GuidedModel
from ..guidance.base import StepInfo
from .schedulers import sigma_at, step_kwargs


@dataclass(frozen=True)
class StepState:
    """What a callback sees after each model evaluation (for traces and previews)."""

    step: StepInfo
    latents_in: Tensor  # (B, C, H, W) latents before the scheduler step
    preds: dict[str, Tensor]  # each branch's prediction
    guided: Tensor  # the guided prediction
    latents_out: Tensor  # latents after the scheduler step


Callback = Callable[[StepState], None]


def sample(
    guided: GuidedModel,
    scheduler: Any,
    noise: Tensor,
    generators: list[torch.Generator],
    *,
    eta: float = 0.0,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Run the scheduler's timesteps from ``noise`` (B, C, H, W); returns the final latents.

    ``scheduler.set_timesteps`` must have been called. Perturbations are installed for the
    whole loop and removed afterwards, also when a step raises.
    """
    latents = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    extra = step_kwargs(scheduler, generators, eta)
    with guided.installed(), torch.inference_mode():
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
            x_in = scheduler.scale_model_input(latents, t)
            step = StepInfo(i, len(timesteps), sigma_at(scheduler, float(t)), float(t))
            result = guided(x_in, t, step)
            new = scheduler.step(result.guided, t, latents, **extra, return_dict=False)[0]
            if callback is not None:
                callback(StepState(step, latents, result.preds, result.guided, new))
            latents = new
    return latents
