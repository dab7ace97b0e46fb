"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``): dev-like (guidance-distilled) and schnell-like.

Rectified flow, as diffusers' ``FluxPipeline`` runs it:

* Conditioning names: ``embeds`` (B, 512, D) T5 hidden states and ``pooled`` (B, 768) the CLIP
  pooled output, from the pipeline's own ``encode_prompt`` (negative prompts encoded the same
  way). Shared by every row (:meth:`FluxFamily.model_inputs`): ``txt_ids`` (L, 3) zeros,
  ``img_ids`` (h/2 * w/2, 3) the packed tokens' (0, row, column) positions, and ``guidance``,
  the embedded guidance scale (dev-like models only).
* Latents: noise is drawn (B, C, H/f, W/f) with one generator per image (f = the VAE's
  downsampling factor, C = in_channels / 4), then packed 2x2 into tokens (B, (H/2f)(W/2f), 4C);
  sides must be multiples of 2f. Unpacked before decoding, which undoes the VAE's scaling
  and shift factors.
* The model gets the timestep as ``t / 1000`` (it multiplies timestep and guidance by 1000).
* Schedule: ``sigmas = linspace(1, 1/N, N)`` and the dynamic shift
  ``mu = calculate_shift(packed sequence length, base/max image_seq_len, base/max shift)`` from
  the scheduler config (a scheduler without ``use_dynamic_shifting`` applies its static shift).
* Guidance: a dev-like model (``guidance_embeds``) takes the embedded guidance scale as an
  input (:class:`~diffguide.guidance.embedded.EmbeddedGuidance`, 3.5 when not given, as
  diffusers); a schnell-like model has none and rejects the term. CFG is diffusers' "true CFG"
  ``n + s (p - n)``, in the same batched forward as the conditional rows (diffusers makes two
  calls); on a dev-like model it needs a negative prompt, as diffusers runs it only with one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...guidance.base import GuidanceTerm
from ...guidance.cfg import CFG
from ...guidance.embedded import EmbeddedGuidance, embedded_scale
from ...sampling.comfy import ComfyFlowSampling, ComfyFluxSampling, flux_node_shift
from ...sampling.steppers import flow_stepper
from ..denoiser import Conditioning
from .base import Family


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): 2x2 patches as tokens, as diffusers' ``_pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w) for latent sides h, w (diffusers' ``_unpack_latents``)."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h/2 * w/2, 3) positions (0, row, column) of the packed tokens (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape((h // 2) * (w // 2), 3).to(device=device, dtype=dtype)


def embeds_guidance(model: nn.Module) -> bool:
    """Whether the transformer takes an embedded guidance scale (dev-like; schnell-like: no)."""
    return bool(getattr(model.config, "guidance_embeds", False))


class FluxFamily(Family):
    name = "flux"
    text_limits: ClassVar[dict[str, int]] = {
        "tokenizer_2": 512
    }  # diffusers' encode_prompt max_sequence_length
    model_attr = "transformer"
    components = ("transformer", "vae", "text_encoder", "text_encoder_2")
    schedulers = ("euler",)
    comfy = True

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    def architecture(self, pipe: Any) -> str:
        return "flux-dev" if embeds_guidance(pipe.transformer) else "flux-schnell"

    # -- guidance and conditioning ------------------------------------------------------------
    def default_cfg(
        self, pipe: Any, terms: tuple[GuidanceTerm, ...], has_negative: bool
    ) -> tuple[GuidanceTerm, ...]:
        """FluxPipeline's defaults: no true CFG (``true_cfg_scale`` 1), so the default CFG term goes;
        embedded guidance 3.5 on guidance-distilled models is added by :meth:`guidance_terms`."""
        return tuple(t for t in terms if not isinstance(t, CFG))

    def guidance_terms(
        self, pipe: Any, terms: tuple[GuidanceTerm, ...], has_negative: bool
    ) -> tuple[GuidanceTerm, ...]:
        scale = embedded_scale(terms)
        if not embeds_guidance(pipe.transformer):
            if scale is not None:
                raise ConfigError(
                    "this Flux model has no guidance embedding (guidance_embeds=False, schnell-like): "
                    "drop the embedded guidance"
                )
            return terms
        cfg = [t for t in terms if any(b.name == "uncond" for b in t.branches())]
        if cfg and not has_negative:
            raise ConfigError(
                f"{cfg[0].name} on this guidance-distilled Flux model is true CFG and needs a negative "
                "prompt (as diffusers' true_cfg_scale): give one, or set the CFG scale to 1 (--cfg 1) for "
                "embedded guidance alone"
            )
        return terms if scale is not None else (*terms, EmbeddedGuidance())

    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negatives: Sequence[str],
        need_uncond: bool,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        def one(texts: Sequence[str]) -> Conditioning:
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=list(texts), prompt_2=None, device=pipe.device, num_images_per_prompt=1
            )
            return Conditioning(embeds, pooled)

        with torch.inference_mode():
            return one(prompts), (one(negatives) if need_uncond else None)

    def model_inputs(
        self,
        pipe: Any,
        terms: tuple[GuidanceTerm, ...],
        cond: Conditioning,
        uncond: Conditioning | None,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        f = pipe.vae_scale_factor
        embeds = cond.embeds
        shared: dict[str, Any] = {
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype),
            "img_ids": image_ids(height // f, width // f, embeds.device, embeds.dtype),
        }
        scale = embedded_scale(terms)
        if scale is not None:
            shared["guidance"] = scale

        def add(c: Conditioning) -> Conditioning:
            return Conditioning(tensors=c.tensors, shared={**c.shared, **shared})

        return add(cond), (None if uncond is None else add(uncond))

    def check(self, model: nn.Module, cond: Conditioning) -> None:
        if cond.pooled is None:
            raise ConfigError(
                "Flux needs pooled conditioning ('pooled_prompt_embeds'); encode the prompt with the Flux "
                "pipeline or load it from the conditioning file"
            )
        missing = [k for k in ("txt_ids", "img_ids") if k not in cond.shared]
        if embeds_guidance(model) and "guidance" not in cond.shared:
            missing.append("guidance")
        if missing:
            raise ConfigError(f"Flux conditioning lacks {', '.join(missing)} (see FluxFamily.model_inputs)")

    # -- the denoiser -------------------------------------------------------------------------
    def prediction(self, pipe: Any) -> str:
        return "flow"

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        rows = x.shape[0]
        timestep = (t.expand(rows) if t.ndim == 0 else t).to(x.dtype)
        scale = cond.shared.get("guidance")
        guidance = None if scale is None else torch.full([rows], scale, device=x.device, dtype=torch.float32)
        out = model(
            hidden_states=x,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=cond.shared["txt_ids"],
            img_ids=cond.shared["img_ids"],
            return_dict=False,
        )
        return out[0]  # type: ignore[no-any-return]

    def comfy_model_sampling(self, pipe: Any, height: int, width: int) -> ComfyFlowSampling:
        """Dev-like: ComfyUI's ``ModelSamplingFlux`` with the shift its ``ModelSamplingFlux`` node
        sets for this image size (default max/base shift 1.15/0.5); schnell-like: ComfyUI's
        ``FluxSchnell`` default, discrete flow with shift 1 and multiplier 1."""
        if not embeds_guidance(pipe.transformer):
            return ComfyFlowSampling(shift=1.0, multiplier=1.0)
        return ComfyFluxSampling(flux_node_shift(width, height))

    # -- latents and sizes ------------------------------------------------------------------
    def latent_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (batch, pipe.transformer.config.in_channels // 4, height // f, width // f)

    def pack(self, latents: Tensor) -> Tensor:
        return pack(latents)

    def unpack(self, x: Tensor, height: int, width: int) -> Tensor:
        # latent sides from the token count and the pixel aspect ratio (tokens = h/2 * w/2)
        tokens = x.shape[1]
        rows = math.isqrt(tokens * height // width)
        if rows == 0 or tokens % rows or rows * width != (tokens // rows) * height:
            raise ConfigError(f"{tokens} packed tokens do not fit a {width}x{height} image")
        return unpack(x, 2 * rows, 2 * (tokens // rows))

    def size_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * 2 * pipe.transformer.config.patch_size)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    # -- sampling ---------------------------------------------------------------------------
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
        f = pipe.vae_scale_factor
        seq_len = (height // f // 2) * (width // f // 2)
        sigmas = None if pipe.scheduler.config.get("use_flow_sigmas", False) else flux_sigmas(steps)
        return flow_stepper(
            "Flux", pipe, steps, shift=shift, seq_len=seq_len, generators=generators, eta=eta, sigmas=sigmas
        )


def flux_sigmas(steps: int) -> list[float]:
    """FluxPipeline's sigmas before the shift: ``numpy.linspace(1, 1/N, N)``."""
    import numpy as np

    return [float(s) for s in np.linspace(1.0, 1 / steps, steps)]
