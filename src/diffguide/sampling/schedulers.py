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
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A new scheduler ``name`` configured like the model's own scheduler (betas, spacing...)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


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
