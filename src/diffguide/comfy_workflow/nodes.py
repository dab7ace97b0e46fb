"""The ComfyUI nodes diffguide runs: their inputs (name -> type), outputs and widget order.

The types and widget orders are ComfyUI's (``nodes.py``, ``comfy_extras``); how each node maps
onto a diffguide run is :mod:`.translate` (and docs/comfyui.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_LINKED = ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE")


@dataclass(frozen=True)
class NodeType:
    inputs: dict[str, str]  # name -> MODEL, CLIP, ..., INT, FLOAT, STRING, BOOLEAN (in widget order)
    outputs: tuple[str, ...]
    optional: tuple[str, ...] = field(default_factory=tuple)

    @property
    def widgets(self) -> list[str]:
        return [n for n, k in self.inputs.items() if k not in _LINKED]

    def required_widgets(self, linked: Mapping[str, Any]) -> list[str]:
        return [n for n in self.widgets if n not in self.optional and n not in linked]


def _n(outputs: tuple[str, ...], optional: tuple[str, ...] = (), **inputs: str) -> NodeType:
    return NodeType(dict(inputs), outputs, optional)


def _typed(outputs: tuple[str, ...], inputs: dict[str, str]) -> NodeType:
    return NodeType(inputs, outputs)


_SAMPLER = {
    "seed": "INT",
    "steps": "INT",
    "cfg": "FLOAT",
    "sampler_name": "STRING",
    "scheduler": "STRING",
}

NODES: dict[str, NodeType] = {
    "CheckpointLoaderSimple": _n(("MODEL", "CLIP", "VAE"), ckpt_name="STRING"),
    "UNETLoader": _n(("MODEL",), unet_name="STRING", weight_dtype="STRING"),
    "CLIPLoader": _n(("CLIP",), ("device",), clip_name="STRING", type="STRING", device="STRING"),
    "DualCLIPLoader": _n(
        ("CLIP",), ("device",), clip_name1="STRING", clip_name2="STRING", type="STRING", device="STRING"
    ),
    "VAELoader": _n(("VAE",), vae_name="STRING"),
    "LoraLoader": _n(
        ("MODEL", "CLIP"),
        model="MODEL",
        clip="CLIP",
        lora_name="STRING",
        strength_model="FLOAT",
        strength_clip="FLOAT",
    ),
    "LoraLoaderModelOnly": _n(("MODEL",), model="MODEL", lora_name="STRING", strength_model="FLOAT"),
    "ModelSamplingAuraFlow": _n(("MODEL",), model="MODEL", shift="FLOAT"),
    "ModelSamplingSD3": _n(("MODEL",), model="MODEL", shift="FLOAT"),
    "ModelSamplingFlux": _n(
        ("MODEL",), model="MODEL", max_shift="FLOAT", base_shift="FLOAT", width="INT", height="INT"
    ),
    "CFGNorm": _n(("MODEL",), ("pre_cfg",), model="MODEL", strength="FLOAT", pre_cfg="BOOLEAN"),
    "RescaleCFG": _n(("MODEL",), model="MODEL", multiplier="FLOAT"),
    "PerturbedAttentionGuidance": _n(("MODEL",), model="MODEL", scale="FLOAT"),
    "SkipLayerGuidanceSD3": _n(
        ("MODEL",), model="MODEL", layers="STRING", scale="FLOAT", start_percent="FLOAT", end_percent="FLOAT"
    ),
    "SkipLayerGuidanceDiT": _n(
        ("MODEL",),
        ("rescaling_scale",),
        model="MODEL",
        double_layers="STRING",
        single_layers="STRING",
        scale="FLOAT",
        start_percent="FLOAT",
        end_percent="FLOAT",
        rescaling_scale="FLOAT",
    ),
    "CLIPTextEncode": _n(("CONDITIONING",), text="STRING", clip="CLIP"),
    "FluxGuidance": _n(("CONDITIONING",), conditioning="CONDITIONING", guidance="FLOAT"),
    "ConditioningZeroOut": _n(("CONDITIONING",), conditioning="CONDITIONING"),
    # diffguide's own: ComfyUI-form conditioning ([[tensor, {...}]]) saved by save_comfy_conditioning
    "DiffguideLoadConditioning": _n(("CONDITIONING",), file="STRING"),
    "EmptyLatentImage": _n(("LATENT",), width="INT", height="INT", batch_size="INT"),
    "EmptySD3LatentImage": _n(("LATENT",), width="INT", height="INT", batch_size="INT"),
    "LoadLatent": _n(("LATENT",), latent="STRING"),
    "EmptyHunyuanLatentVideo": _n(("LATENT",), width="INT", height="INT", length="INT", batch_size="INT"),
    "KSampler": _typed(
        ("LATENT",),
        {
            "model": "MODEL",
            **_SAMPLER,
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "latent_image": "LATENT",
            "denoise": "FLOAT",
        },
    ),
    "KSamplerAdvanced": _n(
        ("LATENT",),
        model="MODEL",
        add_noise="STRING",
        noise_seed="INT",
        steps="INT",
        cfg="FLOAT",
        sampler_name="STRING",
        scheduler="STRING",
        positive="CONDITIONING",
        negative="CONDITIONING",
        latent_image="LATENT",
        start_at_step="INT",
        end_at_step="INT",
        return_with_leftover_noise="STRING",
    ),
    "VAEDecode": _n(("IMAGE",), samples="LATENT", vae="VAE"),
    "SaveImage": _n((), images="IMAGE", filename_prefix="STRING"),
}
