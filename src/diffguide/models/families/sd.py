"""SD1.5 and SDXL (``UNet2DConditionModel``): epsilon or v prediction, DDPM-family schedulers.

Conditioning names: ``embeds`` (B, 77, D); SDXL adds ``pooled`` (B, P) and ``time_ids`` (B, 6)
(original size, crop, target size: ``(h, w, 0, 0, h, w)``, as diffusers' SDXL pipeline builds
them). Latents (B, 4, H/8, W/8); decode divides by the VAE's scaling factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...sampling.comfy import ComfyModelSampling
from ...sampling.schedulers import SCHEDULERS, make_scheduler, set_timesteps, step_kwargs
from ...sampling.steppers import DiscreteStepper
from ..denoiser import Conditioning
from .base import Family


def needs_text_time(unet: nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def unet_forward(unet: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """One ``UNet2DConditionModel`` call (SDXL: + pooled text embeds and time ids)."""
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if needs_text_time(unet) else None
    return unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]  # type: ignore[no-any-return]


def check_unet_conditioning(unet: nn.Module, cond: Conditioning) -> None:
    """Missing SDXL conditioning is an error, never a silent default."""
    if needs_text_time(unet) and (cond.pooled is None or cond.time_ids is None):
        missing = [n for n, v in (("pooled", cond.pooled), ("time_ids", cond.time_ids)) if v is None]
        raise ConfigError(
            f"this UNet (SDXL-style, addition_embed_type='text_time') needs {' and '.join(missing)} "
            "conditioning; encode the prompt with the SDXL pipeline or load them from the conditioning file"
        )


def sdxl_time_ids(height: int, width: int, dtype: torch.dtype, unet: nn.Module, pooled_dim: int) -> Tensor:
    """SDXL micro-conditioning ``(h, w, 0, 0, h, w)`` (original size, crop top-left, target size),
    checked against the UNet's embedding size as diffusers' ``_get_add_time_ids`` does."""
    ids = [height, width, 0, 0, height, width]
    cfg: Any = unet.config
    expected = cfg.projection_class_embeddings_input_dim
    got = cfg.addition_time_embed_dim * len(ids) + pooled_dim
    if expected != got:
        raise ConfigError(
            f"SDXL time ids do not fit this UNet: it expects an added embedding of {expected}, "
            f"time ids and pooled embeds give {got}"
        )
    return torch.tensor([ids], dtype=dtype)


class SDFamily(Family):
    name = "sd"
    model_attr = "unet"
    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    schedulers = tuple(SCHEDULERS)
    comfy = True

    def matches(self, pipe: Any) -> bool:
        return getattr(pipe, "unet", None) is not None

    @staticmethod
    def is_xl(pipe: Any) -> bool:
        return getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "tokenizer_2")

    def architecture(self, pipe: Any) -> str:
        return "sdxl" if self.is_xl(pipe) else "sd15"

    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negatives: Sequence[str],
        need_uncond: bool,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        device = pipe.device
        with torch.inference_mode():
            if not self.is_xl(pipe):
                pe, ne = pipe.encode_prompt(
                    list(prompts), device, 1, need_uncond, negative_prompt=list(negatives)
                )
                return Conditioning(pe), (Conditioning(ne) if need_uncond else None)
            # As diffusers does: an empty negative prompt on SDXL means zero embeddings
            # (force_zeros_for_empty_prompt); pass None so encode_prompt applies that rule.
            empty = not any(negatives)
            pe, ne, pp, npool = pipe.encode_prompt(
                prompt=list(prompts),
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=need_uncond,
                negative_prompt=None if empty else list(negatives),
            )
            te2 = pipe.text_encoder_2
            proj = int(pp.shape[-1]) if te2 is None else te2.config.projection_dim
            ids = sdxl_time_ids(height, width, pe.dtype, pipe.unet, proj)
            ids = ids.to(device).repeat(pe.shape[0], 1)
            cond = Conditioning(pe, pp, ids)
            return cond, (Conditioning(ne, npool, ids) if need_uncond else None)

    def check(self, model: nn.Module, cond: Conditioning) -> None:
        check_unet_conditioning(model, cond)

    def prediction(self, pipe: Any) -> str:
        return str(pipe.scheduler.config.get("prediction_type", "epsilon"))

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return unet_forward(model, x, t, cond)

    def latent_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (batch, pipe.unet.config.in_channels, height // f, width // f)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def comfy_model_sampling(self, pipe: Any, height: int, width: int) -> ComfyModelSampling:
        """ComfyUI's ``ModelSamplingDiscrete`` with its SD defaults (the checkpoint's betas are
        ignored, as ComfyUI does)."""
        return ComfyModelSampling(prediction_type=self.prediction(pipe))

    def stepper(
        self,
        pipe: Any,
        scheduler: str,
        steps: int,
        *,
        shift: float,
        height: int,
        width: int,
        generators: list[torch.Generator],
        eta: float,
    ) -> tuple[Any, Any]:
        sched = make_scheduler(scheduler, pipe.scheduler.config)
        set_timesteps(sched, scheduler, steps, pipe.device, shift=shift)
        extra = step_kwargs(sched, generators, eta)
        return DiscreteStepper(sched, self.prediction(pipe), extra), sched
