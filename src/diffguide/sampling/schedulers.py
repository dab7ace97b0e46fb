"""Scheduler names -> diffusers schedulers (reused, not rewritten).

Each run gets a fresh scheduler instance built from the model's scheduler config, so
concurrent runs over shared weights never share scheduler state.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ..errors import ConfigError

SCHEDULERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddpm": (DDPMScheduler, {}),  # ancestral DDPM (Ho et al. 2020), noise from the per-image generators
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A new scheduler ``name`` configured like the model's own scheduler (betas, spacing...)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


# Schedulers whose ``set_timesteps`` takes custom timesteps, so a time shift can be applied;
# value: whether they keep fractional timesteps (dpmpp_2m casts custom timesteps to integers,
# so diffguide rounds them to the nearest integer first rather than let them be truncated).
SHIFTABLE: dict[str, bool] = {"euler": True, "heun": True, "dpmpp_2m": False}


def time_shift(u: np.ndarray, shift: float) -> np.ndarray:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): u' = s u / (1 + (s - 1) u).

    u in [0, 1] is the normalized timestep (1 = pure noise); the end points stay, s > 1 spends
    more steps at high noise. For flow models this is their sigma shift (sigma = u); diffguide
    applies it to the timesteps of the discrete UNet schedules.
    """
    return shift * u / (1.0 + (shift - 1.0) * u)


def set_timesteps(scheduler: Any, name: str, steps: int, device: Any, shift: float = 1.0) -> None:
    """``scheduler.set_timesteps(steps)``, then, if ``shift != 1``, the same timesteps time-shifted.

    t' = (T - 1) * time_shift(t / (T - 1), shift) for the scheduler's own timesteps t, T the
    number of training timesteps; the sigmas follow from t' as for any custom timesteps.
    """
    scheduler.set_timesteps(steps, device=device)
    if shift == 1.0:
        return
    if name not in SHIFTABLE:
        raise ConfigError(
            f"a sampling shift needs a scheduler that takes custom timesteps ({', '.join(SHIFTABLE)}), not '{name}'"
        )
    last = scheduler.config.num_train_timesteps - 1
    base = torch.unique_consecutive(scheduler.timesteps.cpu()).double().numpy()  # heun repeats its timesteps
    shifted = last * time_shift(base / last, shift)
    if not SHIFTABLE[name]:
        shifted = np.round(shifted)
    scheduler.set_timesteps(timesteps=shifted.tolist(), device=device)


def step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float = 0.0) -> dict[str, Any]:
    """The extra arguments ``scheduler.step`` accepts (per-image generators, DDIM's eta)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "eta" in params:
        kwargs["eta"] = eta
    return kwargs


def sigmas_at(scheduler: Any, timesteps: Any) -> list[float]:
    """Noise levels sigma = sqrt((1 - abar_t) / abar_t) at model timesteps t (interpolated).

    Computed once per run, before the sampling loop, not per step."""
    abar = scheduler.alphas_cumprod.double().numpy()
    table = np.sqrt((1 - abar) / abar)
    ts = np.asarray([float(t) for t in timesteps])
    return [float(s) for s in np.interp(ts, np.arange(len(table)), table)]
