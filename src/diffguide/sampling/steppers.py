"""Scheduler adapters: every sampler seen as steps between noise levels (sigma space).

The one sampling loop (:func:`diffguide.sampling.loop.run`) talks only to a :class:`Stepper`:

* ``start(noise)`` -> the initial x;
* ``model_input(x, i)`` and ``model_time(i, batch)`` -> what the guided model gets at step i;
* ``step(guided, x, i)`` -> x at the next noise level;
* ``sigmas`` / ``timesteps``: per model evaluation, plain floats computed once per run (no
  per-step device sync); ``prediction``: the model's output space.

Adapters:

* :class:`DiscreteStepper`: a DDPM-family diffusers scheduler (Euler, DPM++, DDIM, UniPC,
  Heun, ...): ``init_noise_sigma``, ``scale_model_input`` and ``alphas_cumprod`` live here only.
* :class:`FlowStepper`: diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, Qwen-Image,
  AuraFlow): no input scaling, sigma = the scheduler's flow sigma.
* :class:`ComfyStepper`: the ``comfy`` noise policy (ComfyUI's KSampler samplers and model sampling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .comfy import AnyModelSampling, StepFn, make_comfy_step
from .comfy_churn import ComfyChurn
from .schedulers import sigmas_at


class Stepper(Protocol):
    """What the sampling loop needs from a sampler (see the module docstring)."""

    prediction: str

    @property
    def sigmas(self) -> list[float]: ...

    @property
    def timesteps(self) -> list[float]: ...

    def start(self, noise: Tensor) -> Tensor: ...

    def model_input(self, x: Tensor, i: int) -> Tensor: ...

    def model_time(self, i: int, batch: int) -> Tensor: ...

    def step(self, guided: Tensor, x: Tensor, i: int) -> Tensor: ...

    def finish(self, x: Tensor) -> Tensor: ...


@dataclass
class DiscreteStepper:
    """A DDPM-family diffusers scheduler whose ``set_timesteps`` has been called.

    ``extra``: the keyword arguments its ``step`` takes (per-image generators, DDIM's eta).
    """

    scheduler: Any
    prediction: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ts = list(self.scheduler.timesteps)  # 0-dim tensors, as diffusers' loops pass them
        self._levels = [float(t) for t in self.scheduler.timesteps.tolist()]
        self._sigmas = sigmas_at(self.scheduler, self.scheduler.timesteps)

    @property
    def sigmas(self) -> list[float]:
        return self._sigmas

    @property
    def timesteps(self) -> list[float]:
        return self._levels

    def start(self, noise: Tensor) -> Tensor:
        return noise * self.scheduler.init_noise_sigma

    def model_input(self, x: Tensor, i: int) -> Tensor:
        return self.scheduler.scale_model_input(x, self._ts[i])  # type: ignore[no-any-return]

    def model_time(self, i: int, batch: int) -> Tensor:
        return self._ts[i]  # type: ignore[no-any-return]

    def step(self, guided: Tensor, x: Tensor, i: int) -> Tensor:
        return self.scheduler.step(guided, self._ts[i], x, **self.extra, return_dict=False)[0]  # type: ignore[no-any-return]

    def finish(self, x: Tensor) -> Tensor:
        return x


@dataclass
class FlowStepper:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (after ``set_timesteps``): x = (1 - s) x0 + s noise.

    The model gets the scheduler's timestep (``1000 sigma``) expanded to the batch, as
    diffusers' SD3 pipeline passes it; a family converts it further if its model wants t/1000.
    """

    scheduler: Any
    prediction: str = "flow"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ts = list(self.scheduler.timesteps)
        self._levels = [float(t) for t in self.scheduler.timesteps.tolist()]
        self._sigmas = [float(s) for s in self.scheduler.sigmas[: len(self._ts)].tolist()]

    @property
    def sigmas(self) -> list[float]:
        return self._sigmas

    @property
    def timesteps(self) -> list[float]:
        return self._levels

    def start(self, noise: Tensor) -> Tensor:
        return noise

    def model_input(self, x: Tensor, i: int) -> Tensor:
        return x

    def model_time(self, i: int, batch: int) -> Tensor:
        return self._ts[i].expand(batch)  # type: ignore[no-any-return]

    def step(self, guided: Tensor, x: Tensor, i: int) -> Tensor:
        return self.scheduler.step(guided, self._ts[i], x, **self.extra, return_dict=False)[0]  # type: ignore[no-any-return]

    def finish(self, x: Tensor) -> Tensor:
        return x


def flow_set_timesteps(
    scheduler: Any,
    steps: int,
    device: Any,
    seq_len: int,
    sigmas: list[float] | None = None,
    max_shift_default: float = 1.15,
) -> float | None:
    """``set_timesteps`` as diffusers' flow pipelines call it; returns mu (None: static shift).

    Static shift (SD3): the scheduler's own ``shift`` from its config. Dynamic shift
    (``use_dynamic_shifting``: Flux, Qwen-Image): ``mu = calculate_shift(seq_len, ...)`` with the
    config's base/max sequence lengths and shifts. ``sigmas``: custom sigmas before the shift
    (Flux and Qwen-Image pass ``linspace(1, 1/N, N)``). ``max_shift_default``: used when the
    config has no ``max_shift`` (diffusers' SD3 pipeline assumes 1.16, Flux's 1.15).
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    mu = None
    if cfg.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", max_shift_default),
        )
    kwargs: dict[str, Any] = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
    return mu


def flow_stepper(
    family: str,
    pipe: Any,
    steps: int,
    *,
    shift: float,
    seq_len: int,
    generators: list[torch.Generator],
    eta: float,
    sigmas: list[float] | None = None,
    max_shift_default: float = 1.15,
) -> tuple[FlowStepper, Any]:
    """A fresh ``FlowMatchEulerDiscreteScheduler`` from the pipeline's config (``shift`` != 1
    overrides a static shift), timesteps set as the family's diffusers pipeline sets them
    (:func:`flow_set_timesteps`), wrapped in a :class:`FlowStepper`. Every flow family's
    ``stepper`` is this call with its own ``seq_len`` / ``sigmas``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..errors import ConfigError
    from .schedulers import step_kwargs

    config = pipe.scheduler.config
    if shift != 1.0 and config.get("use_dynamic_shifting", False):
        raise ConfigError(
            f"--shift does not apply to this {family} model: its shift is dynamic (mu from the image size)"
        )
    sched = FlowMatchEulerDiscreteScheduler.from_config(config, **({} if shift == 1.0 else {"shift": shift}))
    flow_set_timesteps(sched, steps, pipe.device, seq_len, sigmas=sigmas, max_shift_default=max_shift_default)
    sched.set_begin_index(0)
    return FlowStepper(sched, "flow", step_kwargs(sched, generators, eta)), sched


@dataclass
class ComfyStepper:
    """ComfyUI's KSampler path (``euler``, ``euler_ancestral``, ``dpmpp_2m``, ``heun``).

    ``model_sampling`` is a :class:`~diffguide.sampling.comfy.ComfyModelSampling` (SD family: input
    scaling ``x / sqrt(sigma^2 + 1)``) or :class:`~diffguide.sampling.comfy.ComfyFlowSampling`
    (flow models: input x, timestep ``sigma * multiplier``); x0 from the guided prediction; the update then
    moves x from sigmas[i] to sigmas[i + 1] (see :func:`~diffguide.sampling.comfy.make_comfy_step`).
    ``sigmas_t`` (CPU) has steps + 1 values ending in 0; ``timesteps_t`` (CPU) the model's
    timestep at each of the first ``steps`` sigmas (an integer on SD models). ``seed`` is the KSampler seed (ancestral
    per-step noise). As in ComfyUI, x is float32 throughout; the model input is cast to
    ``model_dtype``, as ComfyUI casts it to the model's dtype. ``pack``: the family's sampling
    layout (Flux, Qwen-Image): ``start`` gets the unpacked noise (as ComfyUI draws it) and packs the
    initial x; ancestral noise is drawn unpacked and packed (the updates are elementwise).
    """

    model_sampling: AnyModelSampling
    sigmas_t: Tensor
    timesteps_t: Tensor
    sampler: str = "euler"
    seed: int | None = None
    model_dtype: torch.dtype | None = None
    pack: Callable[[Tensor], Tensor] | None = None
    eta: float = 1.0  # euler_ancestral's eta and s_noise (KSampler's defaults: 1, 1)
    s_noise: float = 1.0  # also the churn noise's scale
    churn: ComfyChurn | None = None  # sample_euler's s_churn, s_tmin, s_tmax (None: off)

    def __post_init__(self) -> None:
        self.prediction = self.model_sampling.prediction_type
        levels, steps_t = self.sigmas_t.tolist(), self.timesteps_t.tolist()
        # The model evaluations: (sigma index, heun stage). Heun (ComfyUI's sample_heun) evaluates
        # twice per step, at sigma_i and at its Euler guess's sigma_{i+1}, except for a last step
        # that ends at sigma 0 (an Euler step there); every other sampler once per step.
        self._plan: list[tuple[int, int]] = []
        for i in range(len(levels) - 1):
            self._plan.append((i, 0))
            if self.sampler == "heun" and levels[i + 1] != 0:
                self._plan.append((i + 1, 1))
        self._all_levels = levels  # every sigma as a Python float: no device sync in step()
        # churn: a step's first evaluation is at sigma_hat (x moved there by churn noise)
        self.sigma_hats: Tensor | None = None
        hat_t: list[float] = []
        if self.churn is not None:
            self.sigma_hats = self.churn.sigma_hats(self.sigmas_t, self.sampler)
            hat_t = self.model_sampling.model_timestep(self.sigma_hats).tolist()
        churned = [self.sigma_hats is not None and stage == 0 for _, stage in self._plan]
        hats = self.sigma_hats.tolist() if self.sigma_hats is not None else []
        # Python floats for StepInfo: no per-step sync
        self._levels = [hats[j] if c else levels[j] for (j, _), c in zip(self._plan, churned, strict=True)]
        self._steps_t = [hat_t[j] if c else steps_t[j] for (j, _), c in zip(self._plan, churned, strict=True)]
        self._churned = churned
        self._update: StepFn | None = None
        self._heun: tuple[Tensor, Tensor, Tensor] | None = None  # x, d and sigma at the start of a heun step

    @property
    def sigmas(self) -> list[float]:
        return self._levels

    @property
    def timesteps(self) -> list[float]:
        return self._steps_t

    def start(self, noise: Tensor) -> Tensor:
        self.model_dtype = self.model_dtype or noise.dtype
        noise = noise.float()
        self._sig = self.sigmas_t.to(noise.device)
        tim = self.timesteps_t.to(noise.device, torch.float32)
        # each model evaluation's sigma and timestep (sigma_hat's under churn)
        self._eval_sig = [self._sig[j] for j, _ in self._plan]
        self._eval_tim = [tim[j] for j, _ in self._plan]
        if self.churn is not None and self.sigma_hats is not None:
            hats = self.sigma_hats.to(noise.device)
            hat_t = torch.tensor(self._steps_t, dtype=torch.float32, device=noise.device)
            for k, ((j, _), c) in enumerate(zip(self._plan, self._churned, strict=True)):
                if c:
                    self._eval_sig[k], self._eval_tim[k] = hats[j], hat_t[k]
            self.churn.start(noise, self.seed, self.pack, self.s_noise)
        ms = self.model_sampling
        x = ms.noise_scaling(self._sig[0], noise, torch.zeros_like(noise), ms.is_max_denoise(self._sig))
        flow = self.prediction == "flow"
        if self.sampler != "heun" and self.churn is None:
            self._update = make_comfy_step(
                self.sampler, x, self.seed, flow=flow, pack=self.pack, eta=self.eta, s_noise=self.s_noise
            )
        return x if self.pack is None else self.pack(x)

    def model_input(self, x: Tensor, k: int) -> Tensor:
        sigma = self._eval_sig[k]
        if self._churned[k]:  # x moved to sigma_hat by churn noise (kept for step())
            assert self.churn is not None
            x = self.churn.perturb(x, self._plan[k][0], self._sig[self._plan[k][0]], sigma)
        return self.model_sampling.calculate_input(sigma.expand(x.shape[0]), x).to(self.model_dtype)

    def model_time(self, k: int, batch: int) -> Tensor:
        return self._eval_tim[k].expand(batch)

    def step(self, guided: Tensor, x: Tensor, k: int) -> Tensor:
        """Model evaluation ``k`` done: the next x (for heun's first stage, its Euler guess)."""
        j, stage = self._plan[k]
        if self._churned[k]:
            assert self.churn is not None
            x = self.churn.x_hat()
        sigma = self._eval_sig[k]
        denoised = self.model_sampling.calculate_denoised(sigma.expand(x.shape[0]), guided.float(), x)
        if self._update is not None:
            return self._update(x, denoised, self._sig, j)
        d = (x - denoised) / sigma  # k-diffusion's to_d
        if stage == 0:  # euler with churn, or heun's first stage: to sigma_{i+1} from sigma (hat)
            dt = self._sig[j + 1] - sigma
            if self.sampler == "heun" and self._all_levels[j + 1] != 0:
                self._heun = (x, d, sigma)
            return x + d * dt
        assert self._heun is not None
        x0, d0, sigma0 = self._heun
        return x0 + (d0 + d) / 2 * (sigma - sigma0)

    def finish(self, x: Tensor) -> Tensor:
        """x is float32 (as in ComfyUI); returned in the model's dtype."""
        return x.to(self.model_dtype)
