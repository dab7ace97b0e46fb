"""Qwen-Image (``QwenImagePipeline``, ``QwenImageTransformer2DModel``).

Rectified flow on packed latents, as diffusers' ``pipeline_qwenimage.py``:

* Noise is drawn ``(B, 1, C, h, w)`` (C = ``in_channels / 4`` = 16, h = 2 * (H // (2 f)), f the
  VAE's factor), packed to ``(B, hw/4, 4C)`` tokens (2x2 patches) for sampling, and unpacked to
  ``(B, C, 1, h, w)`` for the VAE; decode de-normalises with the VAE's ``latents_mean`` /
  ``latents_std`` and takes frame 0.
* Schedule: ``sigmas = linspace(1, 1/N, N)`` with the dynamic shift mu from the packed image
  sequence length (the scheduler config's base/max shift and sequence lengths).
* The transformer gets ``timestep / 1000``.
* Conditioning names: ``embeds`` (B, L, D) the Qwen2.5-VL hidden states, ``mask`` (B, L) their
  attention mask (1 = token), and the shared ``img_shapes`` ``(1, h/2, w/2)``. Prompts are
  encoded with the pipeline's own ``encode_prompt`` when it has a text encoder; otherwise
  embeddings come from a conditioning file (``prompt_embeds``, ``prompt_embeds_mask`` and their
  ``negative_`` forms) or ``generate(conditioning=...)``.
* Branches share one forward: the prompt's and the negative's text are padded to one length
  (zero embeddings, mask 0; padding at the end moves no token's rotary position and masked keys
  get no attention weight); when every mask of the run is all ones the mask is dropped, as
  diffusers' ``encode_prompt`` drops it.

True CFG as diffusers runs it is ``CFG(scale, renorm=True)`` (``--cfg S --cfg-renorm``): the
combined prediction rescaled to the per-token norm of the conditional one (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ...errors import ConfigError
from ...guidance.base import GuidanceTerm
from ...sampling.comfy import ComfyFlowSampling, ComfyFluxSampling
from ...sampling.steppers import flow_stepper
from ..denoiser import Conditioning
from .base import Family

#: Largest text length encoded (diffusers' ``QwenImagePipeline.__call__`` default).
MAX_SEQUENCE_LENGTH = 512


class QwenImageFamily(Family):
    name = "qwen-image"
    text_limits: ClassVar[dict[str, int]] = {"tokenizer": MAX_SEQUENCE_LENGTH}
    model_attr = "transformer"
    components = ("transformer", "vae", "text_encoder")
    schedulers = ("euler",)
    comfy = True

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "QwenImageTransformer2DModel"

    def comfy_model_sampling(self, pipe: Any, height: int, width: int) -> ComfyFlowSampling:
        """ComfyUI's Qwen-Image model sampling: ``ModelSamplingFlux`` (model type FLUX) with its
        ``sampling_settings`` shift 1.15 and multiplier 1, whatever the image size."""
        return ComfyFluxSampling(1.15)

    # -- conditioning -----------------------------------------------------------------------
    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negatives: Sequence[str],
        need_uncond: bool,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        if getattr(pipe, "text_encoder", None) is None:
            raise ConfigError(
                "this Qwen-Image pipeline has no text encoder: pass precomputed embeddings "
                "(--conditioning FILE with prompt_embeds and prompt_embeds_mask, or generate(conditioning=...))"
            )
        cond = self._encode(pipe, prompts)
        return cond, (self._encode(pipe, negatives) if need_uncond else None)

    @staticmethod
    def _encode(pipe: Any, prompts: Sequence[str]) -> Conditioning:
        with torch.inference_mode():
            embeds, mask = pipe.encode_prompt(
                prompt=list(prompts),
                device=pipe.device,
                num_images_per_prompt=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        return Conditioning(tensors={"embeds": embeds} | ({} if mask is None else {"mask": mask}))

    def model_inputs(
        self,
        pipe: Any,
        terms: tuple[GuidanceTerm, ...],
        cond: Conditioning,
        uncond: Conditioning | None,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        for c in (cond, uncond):
            if c is not None:
                _check_text(c)
        parts = [c for c in (cond, uncond) if c is not None]
        length = max(int(c.embeds.shape[1]) for c in parts)
        padded = [_padded(c, length) for c in parts]
        if all(bool(p["mask"].all()) for p in padded):  # once per run: diffusers passes no mask then
            padded = [Conditioning(tensors={"embeds": p.embeds}) for p in padded]
        f = pipe.vae_scale_factor
        shared = {"img_shapes": (1, height // f // 2, width // f // 2)}
        done = [Conditioning(tensors=p.tensors, shared=shared) for p in padded]
        return done[0], (done[1] if uncond is not None else None)

    def check(self, model: nn.Module, cond: Conditioning) -> None:
        cfg: Any = model.config
        if getattr(cfg, "guidance_embeds", False):
            raise ConfigError("guidance-distilled Qwen-Image models (guidance_embeds) are not supported")
        if getattr(cfg, "zero_cond_t", False):
            raise ConfigError(
                "Qwen-Image edit models (zero_cond_t) are not supported; use a text-to-image model"
            )
        _check_text(cond)
        if "img_shapes" not in cond.shared:
            raise ConfigError(
                "Qwen-Image conditioning lacks img_shapes (run it through QwenImageFamily.complete)"
            )

    # -- the denoiser -----------------------------------------------------------------------
    def prediction(self, pipe: Any) -> str:
        return "flow"

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        timestep = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)
        out = model(
            hidden_states=x,
            timestep=timestep / 1000,
            guidance=None,
            encoder_hidden_states_mask=cond.get("mask"),
            encoder_hidden_states=cond.embeds,
            img_shapes=[[cond.shared["img_shapes"]]] * x.shape[0],
            return_dict=False,
        )
        return out[0]  # type: ignore[no-any-return]

    # -- latents and sizes ------------------------------------------------------------------
    @staticmethod
    def _latent_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
        f = pipe.vae_scale_factor
        return 2 * (height // (f * 2)), 2 * (width // (f * 2))

    def latent_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_size(pipe, height, width)
        return (batch, 1, pipe.transformer.config.in_channels // 4, h, w)

    def pack(self, latents: Tensor) -> Tensor:
        """(B, 1, C, h, w) noise -> (B, hw/4, 4C) tokens of 2x2 patches (diffusers' ``_pack_latents``)."""
        b, _, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, x: Tensor, height: int, width: int) -> Tensor:
        """(B, hw/4, 4C) tokens -> (B, C, 1, h, w) VAE latents (diffusers' ``_unpack_latents``).

        ``height``/``width`` in pixels; the VAE factor is implied by the token count."""
        b, n, ch = x.shape
        f = _vae_factor(n, height, width)
        h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))
        x = x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, ch // 4, 1, h, w)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def size_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * pipe.transformer.config.patch_size)

    # -- sampling -----------------------------------------------------------------------------
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
        h, w = self._latent_size(pipe, height, width)
        sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
        return flow_stepper(
            self.name, pipe, steps, shift=shift, seq_len=(h // 2) * (w // 2), generators=generators,
            eta=eta, sigmas=sigmas,
        )  # fmt: skip

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, pipe: Any, latents: Tensor) -> list[Image.Image]:
        """``latents * std + mean`` per channel (the VAE's latent statistics), frame 0 of the video VAE."""
        vae = pipe.vae
        with torch.inference_mode():
            z = latents.to(vae.dtype)
            shape = (1, vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
            image = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return list(pipe.image_processor.postprocess(image, output_type="pil"))


def _vae_factor(tokens: int, height: int, width: int) -> int:
    """The VAE factor f (a power of 2) for which an H x W image has ``tokens`` packed tokens,
    (H // 2f) * (W // 2f); ``unpack`` gets no pipeline, and the token count fixes f."""
    for f in (2**k for k in range(7)):
        if (height // (f * 2)) * (width // (f * 2)) == tokens:
            return f
    raise ConfigError(f"{tokens} latent tokens do not fit a {width}x{height} Qwen-Image")


def _check_text(c: Conditioning) -> None:
    embeds, mask = c.embeds, c.get("mask")
    if embeds.ndim != 3:
        raise ConfigError(
            f"Qwen-Image prompt embeddings must be (batch, tokens, dim), got {tuple(embeds.shape)}"
        )
    if mask is not None and mask.shape != embeds.shape[:2]:
        raise ConfigError(
            f"Qwen-Image text mask has shape {tuple(mask.shape)}; expected {tuple(embeds.shape[:2])} "
            "(batch, tokens of the embeddings)"
        )


def _padded(c: Conditioning, length: int) -> Conditioning:
    """``embeds`` and ``mask`` (all ones when absent; long) padded with zeros to ``length`` tokens."""
    embeds = c.embeds
    mask = c.get("mask")
    mask = (
        torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask.long()
    )
    extra = length - int(embeds.shape[1])
    if extra:
        embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return Conditioning(tensors={"embeds": embeds, "mask": mask})
