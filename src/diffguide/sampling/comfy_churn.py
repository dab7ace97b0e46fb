"""Karras churn in the ``comfy`` noise policy: ComfyUI's ``sample_euler`` / ``sample_heun`` with
``s_churn, s_tmin, s_tmax, s_noise``.

ComfyUI's ``sample_euler`` (and ``sample_heun``, the same code) draws its churn noise with ``torch.randn_like(x)``, from the *global*
generator. That stream is still fixed by the seed: ``comfy.sample.prepare_noise`` seeds the global
generator (``torch.manual_seed(seed)``) and draws the initial noise from it, and the sampler runs
right after, so on the CPU the churn noise is the continuation of the seed's stream past the
initial noise. (``torch.manual_seed`` also seeds the CUDA generators, from which the initial noise
is not drawn: on a CUDA device the churn noise is the start of the CUDA stream of ``seed``.)

Here the same values come from a private generator (the global one is never touched): a CPU
generator seeded with ``seed`` that first draws the initial noise's shape (``prepare_noise``'s
draw, float32), then one ``randn`` of the latent's shape per churned step; on another device a
generator there seeded with ``seed``. Families that pack latents (Flux, Qwen-Image) draw in
ComfyUI's unpacked shape, then pack. Per step i of N: ``gamma = min(s_churn / N, sqrt(2) - 1)`` if
``s_tmin <= sigma_i <= s_tmax`` else 0, ``sigma_hat = sigma_i (gamma + 1)``; when gamma > 0,
``x += randn * s_noise * sqrt(sigma_hat^2 - sigma_i^2)``; the model runs at sigma_hat and the step
(Euler, or Heun's two evaluations) goes from sigma_hat to sigma_{i+1}.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from .knobs import churn_gamma


@dataclass
class ComfyChurn:
    """One sampling run's churn (state: the noise generator and the current step's x_hat)."""

    s_churn: float
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    gammas: list[float] = field(default_factory=list, repr=False)
    _draw: Callable[[], Tensor] | None = field(default=None, repr=False)
    _x_hat: Tensor | None = field(default=None, repr=False)
    _s_noise: float = field(default=1.0, repr=False)

    def sigma_hats(self, sigmas: Tensor, sampler: str) -> Tensor:
        """(steps,) sigma_hat per step (sigma itself where gamma is 0), float32 as ComfyUI computes it."""
        if sampler not in ("euler", "heun"):
            raise ConfigError(f"churn in the comfy noise policy is for euler and heun, not {sampler}")
        levels = sigmas.tolist()
        steps = len(levels) - 1
        gammas = [churn_gamma(levels[i], steps, self.s_churn, self.s_tmin, self.s_tmax) for i in range(steps)]
        self.gammas = gammas
        return torch.stack([sigmas[i] * (g + 1) if g > 0 else sigmas[i] for i, g in enumerate(gammas)])

    def start(
        self, noise: Tensor, seed: int | None, pack: Callable[[Tensor], Tensor] | None, s_noise: float
    ) -> None:
        """Generator for a run whose initial noise (ComfyUI's unpacked shape) is ``noise``."""
        if seed is None:
            raise ConfigError("churn in the comfy noise policy needs a seed")
        shape, device = tuple(noise.shape), noise.device
        if device.type == "cpu":
            generator = torch.Generator("cpu").manual_seed(int(seed))
            torch.randn(shape, dtype=torch.float32, generator=generator)  # prepare_noise's draw
        else:
            generator = torch.Generator(device).manual_seed(int(seed))

        def draw() -> Tensor:
            eps = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
            return eps if pack is None else pack(eps)

        self._draw, self._s_noise, self._x_hat = draw, s_noise, None

    def perturb(self, x: Tensor, i: int, sigma: Tensor, sigma_hat: Tensor) -> Tensor:
        """x at step i's sigma_hat (``sample_euler``'s churn; x itself where gamma is 0)."""
        if self.gammas[i] > 0:
            assert self._draw is not None, "start() first"
            eps = self._draw() * self._s_noise
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        self._x_hat = x
        return x

    def x_hat(self) -> Tensor:
        assert self._x_hat is not None, "perturb() first"
        return self._x_hat


#: The manifest's description of the churn noise stream.
CHURN_NOISE = (
    "sample_euler's churn noise (torch.randn_like from the global generator in ComfyUI): the seed's "
    "stream after the initial noise on the CPU (a private generator here), the seed's stream on other devices"
)


def comfy_churn(cfg: object) -> ComfyChurn | None:
    """The churn of a GenerateConfig in the comfy policy (None when ``s_churn`` is 0)."""
    s_churn = float(getattr(cfg, "s_churn", 0.0) or 0.0)
    if s_churn == 0:
        return None
    tmax = getattr(cfg, "s_tmax", None)
    return ComfyChurn(s_churn, float(getattr(cfg, "s_tmin", 0.0)), math.inf if tmax is None else float(tmax))


def churn_description(cfg: object, sigma_hats: Tensor | None) -> dict[str, object]:
    """The manifest's sampler entry for churn (KSampler-style names, and each step's sigma_hat)."""
    keys = ("s_churn", "s_tmin", "s_tmax", "s_noise")
    out: dict[str, object] = {k: getattr(cfg, k) for k in keys}
    if sigma_hats is not None:
        out["sigma_hats"] = sigma_hats.tolist()
    return out
