"""Guidance interval (Kynkaanniemi et al. 2024, arXiv:2404.07724): CFG only at middle noise levels.

The paper applies guidance only for sigma in (sigma_lo, sigma_hi] (EDM's sigma, the
variance-exploding noise level: diffguide's :attr:`StepInfo.sigma` on the SD family) and plain
conditional predictions elsewhere; no guidance at high noise keeps diversity, none at low noise
costs nothing in quality. A guidance interval is therefore not a new term but a :class:`Window`
on CFG (or on any term): :func:`guidance_interval` builds it from a documented preset.

Presets (the paper's settings): ``"sdxl"`` and ``"edm2-s"``: (0.28, 5.42]; ``"edm2-xxl"``: (0.28, 2.9].
The window is closed at both ends (sigma_lo <= sigma <= sigma_hi): a step exactly at sigma_lo is
guided here, not in the paper (no schedule of diffusers lands on it exactly). On flow models
(``flow=True``) the VE sigma s becomes the flow sigma s / (1 + s) (the same signal-to-noise ratio:
x / (1 - sigma) = x0 + s noise). Outside the interval CFG adds no unconditional rows.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Window
from .cfg import CFG

INTERVALS: dict[str, tuple[float, float]] = {
    "sdxl": (0.28, 5.42),
    "edm2-s": (0.28, 5.42),
    "edm2-xxl": (0.28, 2.9),
}


def interval_window(preset: str = "sdxl", *, flow: bool = False) -> Window:
    """The preset's sigma window (VE sigma; flow sigma when ``flow``)."""
    if preset not in INTERVALS:
        raise ConfigError(f"unknown guidance interval '{preset}'; known: {', '.join(INTERVALS)}")
    lo, hi = INTERVALS[preset]
    if flow:
        lo, hi = lo / (1.0 + lo), hi / (1.0 + hi)
    return Window(sigma_min=lo, sigma_max=hi)


def guidance_interval(scale: float, preset: str = "sdxl", *, flow: bool = False, rescale: float = 0.0) -> CFG:
    """CFG with scale ``scale`` applied only inside the preset's interval."""
    return CFG(scale, rescale=rescale, window=interval_window(preset, flow=flow))
