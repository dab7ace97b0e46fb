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
from .comfy import make_comfy_step
from .schedulers import sigmas_at, step_kwargs


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
    sigmas = sigmas_at(scheduler, timesteps)
    levels = [float(t) for t in timesteps.tolist()]  # once per run: no per-step device sync
    with guided.installed(), torch.inference_mode():
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
            x_in = scheduler.scale_model_input(latents, t)
            step = StepInfo(i, len(timesteps), sigmas[i], levels[i])
            result = guided(x_in, t, step)
            new = scheduler.step(result.guided, t, latents, **extra, return_dict=False)[0]
            if callback is not None:
                callback(StepState(step, latents, result.preds, result.guided, new))
            latents = new
    return latents


def sample_comfy(
    guided: GuidedModel,
    model_sampling: Any,
    noise: Tensor,
    sigmas: Tensor,
    timesteps: Tensor,
    *,
    sampler: str = "euler",
    seed: int | None = None,
    model_dtype: torch.dtype | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """ComfyUI's KSampler path for ``sampler`` (``euler``, ``euler_ancestral`` or ``dpmpp_2m``).

    ``model_sampling`` is a :class:`~diffguide.sampling.comfy.ComfyModelSampling`: input
    scaling ``x / sqrt(sigma^2 + 1)``, x0 from the guided prediction; the sampler's update then
    moves x from sigmas[i] to sigmas[i + 1] (see :func:`~diffguide.sampling.comfy.make_comfy_step`).
    ``sigmas`` (CPU) has steps + 1 values ending in 0; ``timesteps`` (CPU) the model's integer
    timestep at each of the first ``steps`` sigmas (``model_sampling.sigma_to_timestep``),
    computed once per run by the caller. ``seed`` is the KSampler seed: ancestral samplers draw
    their per-step noise from it. As in ComfyUI, x is float32 throughout; the model input is
    cast to ``model_dtype`` (default: noise's dtype), as ComfyUI casts it to the model's dtype.
    """
    ms = model_sampling
    model_dtype = model_dtype or noise.dtype
    noise = noise.float()
    levels, steps_t = sigmas.tolist(), timesteps.tolist()  # Python floats for StepInfo: no per-step sync
    sigmas, timesteps = sigmas.to(noise.device), timesteps.to(noise.device, torch.float32)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), ms.is_max_denoise(sigmas))
    update = make_comfy_step(sampler, x, seed)
    count, batch = len(levels) - 1, x.shape[0]
    with guided.installed(), torch.inference_mode():
        for i in tqdm(range(count), disable=not progress, desc="sampling", leave=False):
            sigma, t = sigmas[i].expand(batch), timesteps[i].expand(batch)
            step = StepInfo(i, count, levels[i], steps_t[i])
            result = guided(ms.calculate_input(sigma, x).to(model_dtype), t, step)
            denoised = ms.calculate_denoised(sigma, result.guided.float(), x)
            new = update(x, denoised, sigmas, i)
            if callback is not None:
                callback(StepState(step, x, result.preds, result.guided, new))
            x = new
    return x
