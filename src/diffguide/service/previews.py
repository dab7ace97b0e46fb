"""Small preview images of latents for the event stream: a fixed linear latent -> RGB map."""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from torch import Tensor

# SD1.5's latent -> RGB approximation (the factors ComfyUI's and A1111's previewers use)
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
PREVIEW_SIDE = 64
VAE_PREVIEW_MAX_SIDE = 256


def latent_rgb(latent: Tensor) -> Tensor:
    """(C, h, w) latents -> (3, h, w) in [0, 1]: SD's factors for 4 channels, else the first three
    channels (or one repeated), each stretched to its range."""
    x = latent.detach().float().cpu()
    if x.shape[0] == 4:
        rgb = torch.einsum("chw,cr->rhw", x, torch.tensor(SD_LATENT_RGB))
        return ((rgb + 1) / 2).clamp(0, 1)
    rgb = x[:3] if x.shape[0] >= 3 else x[:1].repeat(3, 1, 1)
    lo = rgb.amin(dim=(1, 2), keepdim=True)
    hi = rgb.amax(dim=(1, 2), keepdim=True)
    return (rgb - lo) / (hi - lo).clamp_min(1e-6)


def preview_png(latent: Tensor) -> str:
    """A data URL of a PNG preview (nearest-neighbour upscaled to about 64 pixels a side)."""
    from PIL import Image

    rgb = latent_rgb(latent)
    arr = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(arr, "RGB")
    scale = max(1, PREVIEW_SIDE // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def vae_preview_png(pipe: Any, latents: Tensor, tiny: Any | None = None) -> str:
    """A data URL of a PNG of (1, C, h, w) ``latents`` decoded by ``tiny`` (a tiny autoencoder,
    e.g. TAESD) when given, else by the model's own VAE exactly as its final images are; images
    larger than 256 pixels a side are shrunk to fit."""
    from PIL import Image

    if tiny is None:
        image = pipe.decode(latents)[0]
    else:
        with torch.inference_mode():
            z = latents.to(tiny.device, tiny.dtype) / tiny.config.scaling_factor
            x = tiny.decode(z, return_dict=False)[0][0]
        arr = ((x.float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        image = Image.fromarray(arr.numpy(), "RGB")
    if max(image.size) > VAE_PREVIEW_MAX_SIDE:
        image = image.copy()
        image.thumbnail((VAE_PREVIEW_MAX_SIDE, VAE_PREVIEW_MAX_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
