"""AuraFlow (``AuraFlowPipeline``, ``AuraFlowTransformer2DModel``).

Rectified flow, as diffusers' ``pipeline_aura_flow.py``: the transformer predicts the velocity
``noise - x0`` and gets ``timestep / 1000``; diffusers' ``FlowMatchEulerDiscreteScheduler`` with
the static shift of the model's scheduler config (1.73 for AuraFlow); ``--shift`` other than 1
replaces it. Plain CFG ``u + w (c - u)`` on ``[uncond, cond]`` in one batched forward.
Conditioning name: ``embeds`` (B, 256, D), the UMT5 hidden states already multiplied by their
attention mask (the pipeline's ``encode_prompt`` does that; the transformer takes no mask); the
negative prompt defaults to ``""`` as in diffusers. Latents (B, C, H/f, W/f) unpacked (the
transformer patchifies inside); decode divides by the VAE's scaling factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...sampling.comfy import ComfyFlowSampling
from ...sampling.steppers import flow_stepper
from ..denoiser import Conditioning
from .base import Family

#: Text length of the UMT5 encoding (diffusers' ``AuraFlowPipeline.__call__`` default).
MAX_SEQUENCE_LENGTH = 256


class AuraFlowFamily(Family):
    name = "auraflow"
    text_limits: ClassVar[dict[str, int]] = {"tokenizer": MAX_SEQUENCE_LENGTH}
    model_attr = "transformer"
    components = ("transformer", "vae", "text_encoder")
    schedulers = ("euler",)
    comfy = True

    def matches(self, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "AuraFlowTransformer2DModel"

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
            pe, _, ne, _ = pipe.encode_prompt(
                prompt=list(prompts),
                negative_prompt=list(negatives),
                do_classifier_free_guidance=need_uncond,
                num_images_per_prompt=1,
                device=pipe.device,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        return Conditioning(pe), (Conditioning(ne) if need_uncond else None)

    def prediction(self, pipe: Any) -> str:
        return "flow"

    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        timestep = (t.expand(x.shape[0]) if t.ndim == 0 else t) / 1000
        out = model(x, encoder_hidden_states=cond.embeds, timestep=timestep.to(x.dtype), return_dict=False)
        return out[0]  # type: ignore[no-any-return]

    def latent_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (batch, pipe.transformer.config.in_channels, height // f, width // f)

    def size_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor * pipe.transformer.config.patch_size)

    def default_size(self, pipe: Any) -> int:
        """The largest side the positional embedding covers (1024 on AuraFlow, diffusers' default)."""
        cfg = pipe.transformer.config
        return int(math.isqrt(cfg.pos_embed_max_size) * cfg.patch_size * pipe.vae_scale_factor)

    def check_size(self, pipe: Any, height: int, width: int) -> None:
        super().check_size(pipe, height, width)
        most = self.default_size(pipe)
        for side, v in (("height", height), ("width", width)):
            if v > most:
                raise ConfigError(
                    f"{side} {v} is larger than this auraflow model's positional embedding covers (at most {most})"
                )

    def comfy_model_sampling(self, pipe: Any, height: int, width: int) -> ComfyFlowSampling:
        """ComfyUI's ``ModelSamplingAuraFlow``: discrete flow with multiplier 1 (ComfyUI's model gets
        sigma; diffguide's forward gets ``1000 sigma`` and passes ``sigma`` on) and the shift of the
        model's scheduler config (1.73, ComfyUI's default for AuraFlow too)."""
        return ComfyFlowSampling(shift=float(pipe.scheduler.config.get("shift", 1.73)), multiplier=1.0)

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
            self.name, pipe, steps, shift=shift, seq_len=seq_len, generators=generators, eta=eta
        )
