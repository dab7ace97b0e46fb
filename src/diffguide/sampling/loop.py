"""The one sampling loop, in sigma space, over a :class:`~diffguide.sampling.steppers.Stepper`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..engine import GuidedModel
from ..guidance.base import StepInfo
from .schedulers import step_kwargs
from .steppers import DiscreteStepper, Stepper


@dataclass(frozen=True)
class StepState:
    """What a callback sees after each model evaluation (for traces and previews)."""

    step: StepInfo
    latents_in: Tensor  # (B, ...) latents before the sampler step
    preds: dict[str, Tensor]  # each branch's prediction
    guided: Tensor  # the guided prediction
    latents_out: Tensor  # latents after the sampler step


Callback = Callable[[StepState], None]


def run(
    guided: GuidedModel,
    stepper: Stepper,
    noise: Tensor,
    *,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample from ``noise`` with ``stepper``'s schedule; returns the final latents.

    Each step: the guided model evaluates every active branch in one batched forward at the
    stepper's model input and timestep; the stepper moves x to the next noise level.
    Perturbations are installed for the whole loop and removed afterwards, also when a step
    raises.
    """
    x = stepper.start(noise)
    sigmas, levels = stepper.sigmas, stepper.timesteps
    count = len(sigmas)
    with guided.installed(), torch.inference_mode():
        for i in tqdm(range(count), disable=not progress, desc="sampling", leave=False):
            x_in = stepper.model_input(x, i)
            step = StepInfo(i, count, sigmas[i], levels[i], x_in, stepper.prediction)
            result = guided(x_in, stepper.model_time(i, x.shape[0]), step)
            new = stepper.step(result.guided, x, i)
            if callback is not None:
                callback(StepState(step, x, result.preds, result.guided, new))
            x = new
    return stepper.finish(x)


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
    """:func:`run` over a DDPM-family diffusers scheduler (``set_timesteps`` already called);
    the comfy policy is :func:`run` with a :class:`~diffguide.sampling.steppers.ComfyStepper`."""
    prediction = getattr(guided.denoiser, "prediction_type", "epsilon")
    stepper = DiscreteStepper(scheduler, prediction, step_kwargs(scheduler, generators, eta))
    return run(guided, stepper, noise, callback=callback, progress=progress)
