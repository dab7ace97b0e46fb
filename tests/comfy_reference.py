"""Reference KSampler paths for the ComfyUI parity tests (moved out of the package: nothing in
diffguide runs them). Built from diffguide's own ComfyUI-compatible pieces
(:mod:`diffguide.sampling.comfy`); the tests compare them with the real ComfyUI code and use them
as a second, independent path to diffguide's comfy noise policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffguide.sampling.comfy import (
    SD_SCALE_FACTOR,
    ComfyModelSampling,
    Denoiser,
    ModelOutputFn,
    comfy_noise,
    comfy_sigmas,
    make_comfy_step,
)


def make_comfy_denoiser(
    model_output_fn: ModelOutputFn,
    alphas_cumprod: torch.Tensor | ComfyModelSampling | None = None,
    prediction_type: str = "epsilon",
) -> Denoiser:
    """Wrap a guided model into ComfyUI's denoiser: ``denoise(x, sigma) -> x0``.

    As ``comfy.model_base.BaseModel._apply_model``: ``x_in = x / sqrt(sigma^2 + 1)``,
    ``t = sigma_to_timestep(sigma).float()``, ``out = model_output_fn(x_in, t).float()``, then
    ``x0 = x - sigma * out`` (epsilon) or the v-prediction formula.

    ``model_output_fn`` returns the *guided* prediction (e.g. ``u + w (c - u)`` in eps space). ComfyUI
    combines CFG on x0 instead, but ``x0 = x - sigma * eps`` is affine with the same coefficients for
    every branch, so combining in eps and converting equals converting each branch and combining in x0
    (up to float rounding). The same holds for v-prediction.

    ``alphas_cumprod``: None for ComfyUI's SD defaults (exact parity), a ComfyModelSampling, or a
    scheduler's ``alphas_cumprod`` tensor (see :meth:`ComfyModelSampling.from_alphas_cumprod`).
    """
    if isinstance(alphas_cumprod, ComfyModelSampling):
        ms = alphas_cumprod
    elif alphas_cumprod is None:
        ms = ComfyModelSampling(prediction_type=prediction_type)
    else:
        ms = ComfyModelSampling.from_alphas_cumprod(alphas_cumprod, prediction_type=prediction_type)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_in = ms.calculate_input(sigma, x)
        t = ms.sigma_to_timestep(sigma).float()
        out = model_output_fn(x_in, t)
        return ms.calculate_denoised(sigma, out.float(), x)

    denoise.model_sampling = ms  # type: ignore[attr-defined]
    return denoise


def comfy_sample(
    denoise_x0: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler_name: str = "euler",
    seed: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """k-diffusion's ``sample_<sampler_name>`` (see :data:`COMFY_SAMPLERS`) from the noise-scaled ``x``.

    ``seed`` is the KSampler seed (``extra_args["seed"]``), used by ancestral samplers only.
    ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` each step, as in k-diffusion.
    """
    step = make_comfy_step(sampler_name, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise_x0(x, sigmas[i] * s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = step(x, denoised, sigmas, i)
    return x


def comfy_euler(
    denoise_x0: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """k-diffusion Euler (``comfy.k_diffusion.sampling.sample_euler`` without churn).

    ``x`` is the already noise-scaled initial latent (see :meth:`ComfyModelSampling.noise_scaling`).
    ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` each step, as in k-diffusion.
    """
    return comfy_sample(denoise_x0, x, sigmas, "euler", callback=callback)


def comfy_ksampler(
    model_output_fn: ModelOutputFn,
    seed: int,
    latent_image: torch.Tensor,
    steps: int,
    scheduler: str = "normal",
    denoise: float = 1.0,
    model_sampling: ComfyModelSampling | None = None,
    scale_factor: float = SD_SCALE_FACTOR,
    batch_index: Sequence[int] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    sampler_name: str = "euler",
) -> torch.Tensor:
    """ComfyUI's KSampler node (``sampler_name`` one of :data:`COMFY_SAMPLERS`), returning a ComfyUI
    LATENT tensor.

    ``latent_image`` is in ComfyUI's LATENT convention (VAE space: an "Empty Latent Image" is zeros);
    a non-zero latent is multiplied by ``scale_factor`` on the way in, and the result is divided by it on
    the way out (``process_latent_in``/``process_latent_out``). Multiply the result by ``scale_factor``
    to get the model-space latent diffusers works with.
    """
    ms = model_sampling or ComfyModelSampling()
    latent_image = latent_image.to(torch.float32)
    noise = comfy_noise(seed, latent_image.shape, batch_index=batch_index)
    sigmas = comfy_sigmas(scheduler, steps, denoise=denoise, model_sampling=ms)
    if sigmas.shape[-1] == 0:
        return latent_image
    if torch.count_nonzero(latent_image) > 0:
        latent_image = latent_image * scale_factor
    x = ms.noise_scaling(sigmas[0], noise, latent_image, ms.is_max_denoise(sigmas))
    denoiser = make_comfy_denoiser(model_output_fn, ms)
    samples = comfy_sample(denoiser, x, sigmas, sampler_name, seed=seed, callback=callback)
    return samples.to(torch.float32) / scale_factor
