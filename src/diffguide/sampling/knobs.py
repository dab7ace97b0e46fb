"""Sampler knobs: dynamic thresholding (Imagen) and k-diffusion's churn / ancestral options.

Formulas (k-diffusion's ``sampling.py``, as ComfyUI's KSampler runs it; Karras et al. 2022, alg. 2):

* churn (``euler``, ``heun``): at step i of N, ``gamma = min(s_churn / N, sqrt(2) - 1)`` when
  ``s_tmin <= sigma_i <= s_tmax`` (else 0); ``sigma_hat = sigma_i (1 + gamma)``; when gamma > 0,
  ``x += s_noise * eps * sqrt(sigma_hat^2 - sigma_i^2)``; the model is evaluated at sigma_hat and
  the Euler step goes from sigma_hat to sigma_{i+1}.
* ancestral (``euler_ancestral``): ``sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 -
  sigma_to^2) / sigma_from^2))``, ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``; Euler to
  sigma_down, then ``x += s_noise * sigma_up * eps`` (eta 0: plain Euler; ``sigma_down == 0``: x0).
* dynamic thresholding (Saharia et al. 2022, sec. 2.3; diffusers' ``_threshold_sample``): per
  image ``s = clamp(quantile(|x0|, percentile), 1, max_value)``, ``x0 = clamp(x0, -s, s) / s``.
  For epsilon and v-prediction models (x0 from the prediction first, :func:`thresholded_x0`); flow
  models have no [-1, 1] data range to threshold to.

:func:`sample_euler` runs these over a k-diffusion style denoiser ``denoise(x, sigma) -> x0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checks import check_number
from ..errors import ConfigError
from ..models.denoiser import prediction_to_x0


@dataclass(frozen=True)
class DynamicThreshold:
    percentile: float = 0.995  # Imagen's p; diffusers' dynamic_thresholding_ratio
    max_value: float = 1.0  # diffusers' sample_max_value

    def __post_init__(self) -> None:
        check_number(self.percentile, "dynamic threshold percentile", finite=False)
        check_number(self.max_value, "dynamic threshold max value", finite=False)
        if not 0.0 < self.percentile <= 1.0:
            raise ConfigError(f"dynamic threshold percentile must be in (0, 1], got {self.percentile}")
        if not (math.isfinite(self.max_value) and self.max_value >= 1.0):
            raise ConfigError(f"dynamic threshold max value must be >= 1, got {self.max_value}")


def dynamic_threshold(x0: Tensor, opts: DynamicThreshold = DynamicThreshold()) -> Tensor:
    """Imagen's dynamic thresholding of predicted x0 (B, ...), per image; computed in float32."""
    dtype, b = x0.dtype, x0.shape[0]
    flat = x0.reshape(b, -1).float()
    s = torch.quantile(flat.abs(), opts.percentile, dim=1).clamp(min=1, max=opts.max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def thresholded_x0(prediction: str, x: Tensor, sigma: float, pred: Tensor, opts: DynamicThreshold) -> Tensor:
    """x0 of an epsilon / v-prediction model output (model input ``x`` at noise level sigma), thresholded."""
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(f"dynamic thresholding is for epsilon and v-prediction models, not '{prediction}'")
    return dynamic_threshold(prediction_to_x0(prediction, x, sigma, pred), opts)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion's ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def churn_gamma(
    sigma: float, steps: int, s_churn: float, s_tmin: float = 0.0, s_tmax: float = math.inf
) -> float:
    """Karras' gamma at noise level sigma for a run of ``steps`` steps."""
    if s_churn <= 0 or not s_tmin <= sigma <= s_tmax:
        return 0.0
    return min(s_churn / steps, 2**0.5 - 1)


@dataclass(frozen=True)
class Knobs:
    eta: float = 0.0  # ancestral noise (0: deterministic)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        for name in ("eta", "s_churn", "s_tmin", "s_noise"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.s_tmax < self.s_tmin:
            raise ConfigError(f"s_tmax ({self.s_tmax}) must be >= s_tmin ({self.s_tmin})")
        if self.eta and self.s_churn:
            raise ConfigError("eta (ancestral) and s_churn (Karras churn) are separate samplers: set one")


def sample_euler(
    denoise: Callable[[Tensor, float], Tensor],
    x: Tensor,
    sigmas: list[float],
    knobs: Knobs,
    noise: Callable[[Tensor], Tensor],
    threshold: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """k-diffusion's ``sample_euler`` (churn) or ``sample_euler_ancestral`` (eta > 0).

    ``denoise(x, sigma)``: x0 at noise level sigma (k-diffusion's scaled x); ``noise(x)``: standard
    normal noise like x (per-image generators, or ComfyUI's); ``threshold``: applied to x0 (e.g.
    :func:`dynamic_threshold`)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(sigma, steps, knobs.s_churn, knobs.s_tmin, knobs.s_tmax)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + noise(x) * knobs.s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        x0 = denoise(x, sigma_hat)
        if threshold is not None:
            x0 = threshold(x0)
        down, up = ancestral_step(sigma_hat, nxt, knobs.eta)
        if down == 0 and knobs.eta:  # sample_euler_ancestral's last step (sample_euler steps to 0)
            x = x0
            continue
        x = x + (x - x0) / sigma_hat * (down - sigma_hat)
        if up:
            x = x + noise(x) * knobs.s_noise * up
    return x


# --- GenerateConfig's sampler knobs (s_churn, s_tmin, s_tmax, s_noise, ancestral_eta) ---------

#: The config fields, their defaults (off) and what runs them.
KNOB_DEFAULTS: dict[str, float | None] = {
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": None,
    "s_noise": 1.0,
    "ancestral_eta": 1.0,
}


def _knob(cfg: Any, name: str) -> float | None:
    value = getattr(cfg, name)
    if value is None and name == "s_tmax":
        return None
    v = check_number(value, name, finite=False)
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


#: diffguide schedulers whose diffusers class thresholds x0 (its ``thresholding`` config).
THRESHOLDING_SCHEDULERS = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddpm")


def _check_thresholding(cfg: Any) -> None:
    dt = cfg.dynamic_thresholding
    if dt is None:
        return
    if not isinstance(dt, DynamicThreshold):
        raise ConfigError(f"dynamic_thresholding must be a DynamicThreshold or None, got {dt!r}")
    if cfg.noise != "diffusers" or cfg.scheduler not in THRESHOLDING_SCHEDULERS:
        raise ConfigError(
            f"dynamic thresholding needs the diffusers noise policy and a scheduler that thresholds "
            f"({', '.join(THRESHOLDING_SCHEDULERS)}), not '{cfg.scheduler}' ({cfg.noise} noise policy)"
        )


def parse_dynamic_threshold(value: Any, what: str = "--dynamic-thresholding") -> DynamicThreshold:
    """``"P"`` / ``"P:MAX"`` (the CLI), a number, ``[P, MAX]`` or ``{percentile, max_value}`` (prompt files)."""
    if isinstance(value, str):
        parts = value.split(":")
        try:
            nums = [float(v) for v in parts]
        except ValueError:
            raise ConfigError(f"{what} must be PERCENTILE or PERCENTILE:MAX, got {value!r}") from None
        value = nums if len(nums) <= 2 else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return DynamicThreshold(float(value))
    if isinstance(value, list) and len(value) == 2:
        return DynamicThreshold(*value)
    if isinstance(value, list) and len(value) == 1:
        return DynamicThreshold(value[0])
    if isinstance(value, dict) and set(value) <= {"percentile", "max_value"}:
        return DynamicThreshold(**value)
    raise ConfigError(f"{what} must be PERCENTILE or PERCENTILE:MAX, got {value!r}")


def apply_thresholding(cfg: Any, scheduler: Any) -> None:
    """Turn on the scheduler's own dynamic thresholding (diffusers' ``thresholding`` config:
    ``_threshold_sample`` of x0 each step) when the config asks for it."""
    dt = cfg.dynamic_thresholding
    if dt is None:
        return
    if not hasattr(scheduler, "_threshold_sample") or "thresholding" not in scheduler.config:
        raise ConfigError(f"dynamic thresholding is not supported by {type(scheduler).__name__}")
    scheduler.register_to_config(
        thresholding=True, dynamic_thresholding_ratio=dt.percentile, sample_max_value=dt.max_value
    )


def check_config_knobs(cfg: Any) -> None:
    """Types, ranges and applicability of a GenerateConfig's sampler knobs (one-line ConfigErrors).

    diffusers policy: churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) on ``euler``
    (diffusers' EulerDiscreteScheduler). comfy policy: ``ancestral_eta`` and ``s_noise`` on
    ``euler_a`` (KSampler's ``sample_euler_ancestral``); churn on ``euler`` / ``heun``
    (``sample_euler`` / ``sample_heun``)."""
    _check_thresholding(cfg)
    v = {name: _knob(cfg, name) for name in KNOB_DEFAULTS}
    tmax = v["s_tmax"]
    if tmax is not None and tmax < (v["s_tmin"] or 0.0):
        raise ConfigError(f"s_tmax ({tmax}) must be >= s_tmin ({v['s_tmin']})")
    churn = [n for n in ("s_churn", "s_tmin", "s_tmax") if v[n] != KNOB_DEFAULTS[n]]
    changed = churn + [n for n in ("s_noise", "ancestral_eta") if v[n] != KNOB_DEFAULTS[n]]
    if not changed:
        return
    where = f"'{cfg.scheduler}' ({cfg.noise} noise policy)"
    if cfg.noise == "comfy":
        if churn or (cfg.scheduler in ("euler", "heun") and "s_noise" in changed):
            _check_comfy_churn(cfg, v, changed, churn, where)
            return
        if cfg.scheduler != "euler_a":
            raise ConfigError(f"{', '.join(changed)} apply to the comfy policy's euler_a only, not {where}")
        return
    if "ancestral_eta" in changed:
        raise ConfigError(f"ancestral_eta applies to the comfy policy's euler_a only, not {where}")
    if cfg.scheduler != "euler":
        verb = "applies" if len(changed) == 1 else "apply"
        raise ConfigError(f"{', '.join(changed)} {verb} to the diffusers policy's euler only, not {where}")
    if v["s_churn"] == 0:
        raise ConfigError(f"{', '.join(changed)} only take effect with s_churn > 0")


def _check_comfy_churn(cfg: Any, v: dict[str, Any], changed: list[str], churn: list[str], where: str) -> None:
    """Churn in the comfy policy: ComfyUI's ``sample_euler`` / ``sample_heun`` (``euler``, ``heun``)."""
    if cfg.scheduler not in ("euler", "heun"):
        raise ConfigError(
            f"{', '.join(churn)}: churn in the comfy noise policy is for euler and heun only, not {where}"
        )
    if "ancestral_eta" in changed:
        raise ConfigError(f"ancestral_eta applies to the comfy policy's euler_a only, not {where}")
    if v["s_churn"] == 0:
        raise ConfigError(f"{', '.join(changed)} only take effect with s_churn > 0")


def churn_step_kwargs(cfg: Any, scheduler: Any) -> dict[str, float]:
    """The churn arguments of diffusers' ``EulerDiscreteScheduler.step`` ({} when churn is off)."""
    if not cfg.s_churn:
        return {}
    if type(scheduler).__name__ != "EulerDiscreteScheduler":
        raise ConfigError(f"s_churn needs diffusers' EulerDiscreteScheduler, not {type(scheduler).__name__}")
    tmax = math.inf if cfg.s_tmax is None else cfg.s_tmax
    return {"s_churn": cfg.s_churn, "s_tmin": cfg.s_tmin, "s_tmax": tmax, "s_noise": cfg.s_noise}
