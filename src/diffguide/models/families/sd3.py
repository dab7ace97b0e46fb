"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

Rectified flow: the transformer predicts the velocity ``noise - x0``; diffusers'
``FlowMatchEulerDiscreteScheduler`` with the static shift of the model's scheduler config
(3.0 for SD3/SD3.5); ``--shift`` other than 1 replaces that shift. Conditioning names:
``embeds`` (B, 77 + T5 tokens, D), the CLIP-L/G hidden states joined with T5's, and ``pooled``
(B, 2048), both CLIP pooled outputs, from the pipeline's own ``encode_prompt`` (three text
encoders; a missing T5 gives zeros, as in diffusers). The negative prompt is encoded as
given (``""`` included; SD3 has no zeroing rule). Latents (B, C, H/8, W/8), C = the
transformer's ``in_channels`` (16 in real SD3); decode uses the VAE's scaling and shift factors.
SD3.5's dual attention (``dual_attention_layers``) and qk norm need nothing extra here.
Repeated trailing text tokens (the zero "T5" tokens without T5) run as one token with a
``log(count)`` key bias, exactly (``compact_text``, :mod:`.sd3_compact`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...sampling.comfy import ComfyFlowSampling
from ...sampling.steppers import flow_stepper
from ..denoiser import Conditioning
from .base import Family
from .sd3_compact import TextCompaction


class SD3Family(Family):
    name = "sd3"
    text_limits: ClassVar[dict[str, int]] = {
        "tokenizer_3": 256
    }  # diffusers' encode_prompt max_sequence_length
    model_attr = "transformer"
    components = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    schedulers = ("euler",)
    comfy = True

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    def architecture(self, pipe: Any) -> str:
        dual = getattr(pipe.transformer.config, "dual_attention_layers", ()) or ()
        return "sd3.5" if dual or getattr(pipe.transformer.config, "qk_norm", None) else "sd3"

    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negatives: Sequence[str],
        need_uncond: bool,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        with torch.inference_mode():
            pe, ne, pp, npool = pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                device=pipe.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=need_uncond,
                negative_prompt=list(negatives),
            )
        cond = Conditioning(pe, pp)
        return cond, (Conditioning(ne, npool) if need_uncond else None)

    def check(self, model: nn.Module, cond: Conditioning) -> None:
        if cond.pooled is None:
            raise ConfigError(
                "SD3 needs pooled conditioning ('pooled_prompt_embeds'); encode the prompt with the SD3 "
                "pipeline or load it from the conditioning file"
            )

    def prediction(self, pipe: Any) -> str:
        return "flow"

    def text_compaction(self, tracing: bool) -> TextCompaction:
        """Without T5, the 256 zero "T5" tokens run as one token with a log(256) key bias (exact)."""
        return TextCompaction(tracing=tracing)

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = model(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )
        return out[0]  # type: ignore[no-any-return]

    def latent_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (batch, pipe.transformer.config.in_channels, height // f, width // f)

    def size_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * pipe.transformer.config.patch_size)

    def default_size(self, pipe: Any) -> int:
        return int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)

    def comfy_model_sampling(self, pipe: Any, height: int, width: int) -> ComfyFlowSampling:
        """ComfyUI's ``ModelSamplingSD3`` (discrete flow, multiplier 1000) with the shift of the
        model's scheduler config (3.0 for SD3/SD3.5, ComfyUI's default for them too)."""
        return ComfyFlowSampling(shift=float(pipe.scheduler.config.get("shift", 3.0)), multiplier=1000.0)

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
        seq_len = self.image_tokens(pipe, height, width)
        return flow_stepper(
            self.name, pipe, steps, shift=shift, seq_len=seq_len, generators=generators, eta=eta,
            max_shift_default=1.16,
        )  # fmt: skip
