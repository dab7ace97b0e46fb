"""The model-family interface: everything diffguide needs to know about one kind of model.

The pipeline, engine and sampling loop are family-independent; a family adapter (one module
under ``models/families/``) says how to load the model, encode prompts into a
:class:`~diffguide.models.denoiser.Conditioning` of named tensors, shape and (un)pack latents,
call the denoiser once on any number of rows, schedule the sampler, decode, and what to hash.
Adding a family = one subclass of :class:`Family` registered in ``families/__init__.py`` + tests.

Conventions every family follows:

* ``forward(model, x, t, cond)`` returns the raw model output in the family's
  ``prediction`` space: ``"epsilon"``, ``"v_prediction"`` (VP models) or ``"flow"`` (velocity
  ``noise - x0``); ``t`` is the scheduler's timestep on the 0..1000 scale (a 0-dim tensor or
  one per row); a family whose model wants another scale (Flux: t / 1000) converts it here.
* Latents: ``latent_shape`` is the unpacked VAE-space shape the initial noise is drawn in;
  ``pack`` turns it into the sampling layout (identity for UNets and SD3; Flux packs 2x2 patches
  into tokens), ``unpack`` back before decoding.
* ``decode`` undoes the VAE's ``scaling_factor`` and ``shift_factor``.
* Per run, ``guidance_terms`` checks the guidance terms against the model (and adds the
  family's defaults, e.g. Flux dev's embedded guidance) before any work, and ``model_inputs``
  adds the inputs every row shares (Flux: text/image position ids, the embedded guidance
  scale) to the conditioning, whether it was encoded or loaded from a file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from ...errors import ConfigError
from ...guidance.base import GuidanceTerm
from ...guidance.embedded import embedded_scale
from ..denoiser import Conditioning


class Family(ABC):
    """One model family (SD1.5/SDXL UNets, SD3, ...). Stateless: one instance serves any pipeline."""

    #: Short name recorded in manifests ("sd", "sd3", ...).
    name: ClassVar[str]
    #: Pipeline attribute holding the denoising network.
    model_attr: ClassVar[str]
    #: Pipeline attributes whose weights are hashed into the manifest.
    components: ClassVar[tuple[str, ...]]
    #: Sampler names this family can run with the diffusers noise policy.
    schedulers: ClassVar[tuple[str, ...]]
    #: Whether the ``comfy`` noise policy (ComfyUI's KSampler samplers) supports this family.
    comfy: ClassVar[bool] = False

    # -- identity and loading ---------------------------------------------------------------
    @abstractmethod
    def matches(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a diffusers pipeline) belongs to this family."""

    def architecture(self, pipe: Any) -> str:
        """The architecture name recorded in the manifest (e.g. "sdxl")."""
        return self.name

    def model(self, pipe: Any) -> nn.Module:
        """The denoising network (UNet or transformer): perturbations and traces attach here."""
        return getattr(pipe, self.model_attr)  # type: ignore[no-any-return]

    # -- conditioning ---------------------------------------------------------------------------
    @abstractmethod
    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negatives: Sequence[str],
        need_uncond: bool,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        """Prompt conditioning and, when ``need_uncond``, the negative prompts' conditioning."""

    # tokens read per tokenizer where the pipeline's own limit is not the tokenizer's
    # model_max_length (T5's max_sequence_length); the others read model_max_length
    text_limits: ClassVar[dict[str, int]] = {}

    def text_windows(self, pipe: Any) -> list[tuple[str, Any, int]]:
        """(component name, tokenizer, tokens its encoder reads) per text encoder, for the
        long-prompt warning."""
        out = []
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tok = getattr(pipe, name, None)
            if tok is not None:
                limit = self.text_limits.get(name, int(getattr(tok, "model_max_length", 0) or 0))
                out.append((name, tok, limit))
        return out

    def check(self, model: nn.Module, cond: Conditioning) -> None:
        """Raise a one-line ConfigError when ``cond`` lacks what ``model`` needs (default: no check)."""
        return None

    # -- per-run guidance checks and shared model inputs ---------------------------------------
    def default_cfg(
        self, pipe: Any, terms: tuple[GuidanceTerm, ...], has_negative: bool
    ) -> tuple[GuidanceTerm, ...]:
        """``terms`` when CFG was not asked for explicitly (``GenerateConfig.default_cfg``): a
        family whose pipelines default to no CFG drops the default CFG term here. Default: unchanged."""
        return terms

    def guidance_terms(
        self, pipe: Any, terms: tuple[GuidanceTerm, ...], has_negative: bool
    ) -> tuple[GuidanceTerm, ...]:
        """The run's guidance terms, checked for this model (a one-line ConfigError for a term it
        cannot run) and completed with the family's defaults; the manifest records the result.
        ``has_negative``: a negative prompt (or negative conditioning) was given. Default: the
        terms unchanged; embedded guidance is an error (the model has no guidance embedding)."""
        if embedded_scale(terms) is not None:
            raise ConfigError(
                f"embedded guidance is an input of guidance-distilled models (Flux dev); "
                f"this {self.name} model has no guidance embedding"
            )
        return terms

    def model_inputs(
        self,
        pipe: Any,
        terms: tuple[GuidanceTerm, ...],
        cond: Conditioning,
        uncond: Conditioning | None,
        height: int,
        width: int,
    ) -> tuple[Conditioning, Conditioning | None]:
        """The run's conditioning as the model takes it, from encoded or file-loaded embeddings:
        add shared inputs (Flux's ``txt_ids``/``img_ids`` and embedded guidance scale, Qwen-Image's
        ``img_shapes``) and make ``cond`` and ``uncond`` concatenable per branch (e.g. pad text to
        one length). Called once per run, on B rows each, before any forward. Default: as given."""
        return cond, uncond

    def text_compaction(self, tracing: bool) -> Any | None:
        """An exact speed-up that runs repeated trailing text tokens as one (SD3 without T5:
        :mod:`~diffguide.models.families.sd3_compact`), for one run, or None where the family has
        none. ``tracing``: the run records module outputs. Default: None."""
        return None

    # -- the denoiser -------------------------------------------------------------------------
    @abstractmethod
    def prediction(self, pipe: Any) -> str:
        """``"epsilon"``, ``"v_prediction"`` or ``"flow"``."""

    @abstractmethod
    def forward(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """One model call on rows ``x`` at timestep ``t`` (0..1000 scale) with per-row ``cond``."""

    # -- latents and sizes ------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the initial noise for ``batch`` images of height x width pixels."""

    def pack(self, latents: Tensor) -> Tensor:
        return latents

    def unpack(self, x: Tensor, height: int, width: int) -> Tensor:
        return x

    @abstractmethod
    def default_size(self, pipe: Any) -> int:
        """The model's native image side in pixels."""

    def size_multiple(self, pipe: Any) -> int:
        """Image sides must be multiples of this (VAE downsampling x patch size)."""
        return int(pipe.vae_scale_factor)

    def image_tokens(self, pipe: Any, height: int, width: int) -> int:
        """Image tokens of a transformer that patchifies the latent itself (``patch_size``): the
        sequence length diffusers' dynamic shift (``calculate_shift``) reads."""
        f, patch = pipe.vae_scale_factor, pipe.transformer.config.patch_size
        return int((height // f // patch) * (width // f // patch))

    def check_size(self, pipe: Any, height: int, width: int) -> None:
        m = self.size_multiple(pipe)
        for side, v in (("height", height), ("width", width)):
            if v % m:
                raise ConfigError(f"{side} must be a multiple of {m} for this {self.name} model, got {v}")

    # -- sampling ---------------------------------------------------------------------------
    @abstractmethod
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
        """``(stepper, diffusers scheduler)`` for the diffusers noise policy: a fresh scheduler
        from the model's config with ``set_timesteps`` done, wrapped in a sampling adapter."""

    def comfy_model_sampling(self, pipe: Any, height: int, width: int) -> Any:
        """ComfyUI's model sampling for the ``comfy`` noise policy (only when :attr:`comfy`), for
        an image of height x width pixels (Flux's shift depends on it)."""
        raise ConfigError(f"the comfy noise policy does not support {self.name} models yet")

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, pipe: Any, latents: Tensor) -> list[Image.Image]:
        """Images from final latents: ``latents / scaling_factor + shift_factor`` through the VAE."""
        vae = pipe.vae
        with torch.inference_mode():
            z = latents.to(vae.dtype) / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                z = z + shift
            image = vae.decode(z, return_dict=False)[0]
        return list(pipe.image_processor.postprocess(image, output_type="pil"))
