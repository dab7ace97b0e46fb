"""Moving guidance between the model's prediction space, x0 and ComfyUI's spaces.

A step's prediction is affine in x0 at a fixed sigma (:func:`~diffguide.models.denoiser.prediction_to_x0`)::

    epsilon:       x0 = x sqrt(1 + s^2) - s eps
    v_prediction:  x0 = (x - s v) / sqrt(1 + s^2)
    flow:          x0 = x - s v

so a change ``d0`` of x0 is the change ``d0 * dpred/dx0`` of the prediction, with ``dpred/dx0``
= -1/s (epsilon, flow) or -sqrt(1 + s^2)/s (v). At s = 0 the prediction does not move x0 at all;
a guidance made in x0 space then has no effect and its prediction-space delta is zero.

ComfyUI's model input is the unscaled latent: ``x_comfy = x sqrt(1 + s^2)`` for the SD family
(x is diffusers' scaled model input) and ``x`` itself for flow models; its ``denoised`` is x0.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..errors import ConfigError
from .base import StepInfo


def _sigma(step: StepInfo) -> float:
    if step.x is None:
        raise ConfigError("this step carries no model input x; guidance in x0 space cannot be computed")
    return float(step.sigma)


def x0_to_pred(step: StepInfo, d0: Tensor) -> Tensor:
    """The prediction-space change that moves x0 by ``d0`` at this step (zero at sigma 0)."""
    s = _sigma(step)
    if s == 0.0:
        return d0 * 0.0
    if step.prediction in ("epsilon", "flow"):
        return d0 * (-1.0 / s)
    if step.prediction == "v_prediction":
        return d0 * (-math.sqrt(1.0 + s * s) / s)
    raise ConfigError(f"unknown prediction type '{step.prediction}'")


def comfy_input(step: StepInfo) -> Tensor:
    """ComfyUI's model input ``x`` at this step (the unscaled latent for the SD family)."""
    s = _sigma(step)
    assert step.x is not None
    return step.x if step.prediction == "flow" else step.x * math.sqrt(1.0 + s * s)


def dims(t: Tensor) -> list[int]:
    """All non-batch dims of a (B, ...) tensor: norms and projections are per image."""
    return list(range(1, t.ndim))
