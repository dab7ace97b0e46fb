"""Fooocus's sharpness filter: a joint bilateral blur of the cond prediction, guided by its x0.

Fooocus (``modules/anisotropic.py``, ``adaptive_anisotropic_filter``) filters the conditional
"noise" ``n = x - x0`` (ComfyUI's input minus the cond's x0) with a 13 x 13 joint bilateral
filter whose range term is computed on the standardised cond x0 ``(x0 - mean) / (std + 1e-5)``
(per image, unbiased std over C, H, W)::

    F(n)_p = sum_q k_s(p - q) k_r(p, q) n_q / sum_q k_s(p - q) k_r(p, q)
    k_s: Gaussian, sigma 3 (normalised 1-d kernels, outer product)
    k_r = exp(-0.5 (sum_channels |g_q - g_p|)^2 / 3^2)       (L1 colour distance, sigma 3)

with reflect padding (kornia's ``joint_bilateral_blur`` with these settings). Fooocus then uses
``c' = n + alpha (F(n) - n)``, ``alpha = 0.001 * sharpness * t`` (t the diffusion progress) as the
cond of its CFG: see :class:`~diffguide.guidance.adaptive_cfg.AdaptiveCFG` (``sharpness``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DiffguideError

KERNEL = 13
SIGMA_SPACE = 3.0
SIGMA_COLOR = 3.0


def _space_kernel(dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(KERNEL, dtype=dtype, device=device) - KERNEL // 2
    g = torch.exp(-(x * x) / (2.0 * SIGMA_SPACE**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).reshape(-1)  # (K*K,), row-major like unfold's windows


def _windows(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W, K*K): each pixel's reflect-padded K x K neighbourhood."""
    r = KERNEL // 2
    return F.pad(t, (r, r, r, r), mode="reflect").unfold(2, KERNEL, 1).unfold(3, KERNEL, 1).flatten(-2)


def joint_bilateral(x: Tensor, guide: Tensor) -> Tensor:
    """x filtered with spatial sigma 3 and L1 range sigma 3 on ``guide`` (both (B, C, H, W))."""
    if x.ndim != 4 or min(x.shape[2:]) <= KERNEL // 2:
        raise DiffguideError(
            f"Fooocus sharpness needs (B, C, H, W) predictions with sides above {KERNEL // 2}, "
            f"got shape {tuple(x.shape)}"
        )
    distance = (_windows(guide) - guide.unsqueeze(-1)).abs().sum(1, keepdim=True)  # (B, 1, H, W, K*K)
    kernel = _space_kernel(x.dtype, x.device) * torch.exp(-0.5 / SIGMA_COLOR**2 * distance.square())
    return (_windows(x) * kernel).sum(-1) / kernel.sum(-1)


def anisotropic(n: Tensor, x0: Tensor) -> Tensor:
    """Fooocus's adaptive anisotropic filter of ``n``, guided by the standardised ``x0``."""
    std, mean = torch.std_mean(x0, dim=(1, 2, 3), keepdim=True)
    return joint_bilateral(n, (x0 - mean) / (std + 1e-5))
