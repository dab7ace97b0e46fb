"""Model files named by a workflow: ComfyUI's models folder layout, and transformers whose sizes
are read from the state dict's shapes.

``--models DIR`` holds ``diffusion_models/`` (also ComfyUI's older ``unet/``), ``checkpoints/``,
``loras/``, ``vae/``, ``text_encoders/`` (also ``clip/``). A name may contain sub-folders, as in
ComfyUI.

A diffusion-model file (``UNETLoader``) is a transformer state dict in diffusers' key names, with
or without ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix. Its sizes come from
the tensors' shapes (so a tiny test model loads like the full-size one); a ``config`` entry
(a diffusers config as JSON) in the file's safetensors metadata is used when present and
checked against the shapes. Supported: Qwen-Image (``QwenImageTransformer2DModel``) and AuraFlow
(``AuraFlowTransformer2DModel``, diffusers' key names; its head count is not in the weights: the
real model's 3072 = 12 x 256, other sizes need the config), SD3, and FLUX.1 in ComfyUI's (BFL's)
key layout or diffusers' (:mod:`.flux_file`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import DiffguideError
from .flux_file import comfy_flux_to_diffusers, flux_config, is_comfy_flux, is_diffusers_flux
from .graph import WorkflowError

FOLDERS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: Qwen-Image's rotary axes for its head size 128; other head sizes need a config in the file.
_QWEN_ROPE = {128: (16, 56, 56)}


def resolve(models_dir: Path | None, folder: str, name: str, label: str) -> Path:
    """The file ``name`` of ComfyUI's ``folder`` under ``models_dir``, or a one-line error."""
    if models_dir is None:
        raise WorkflowError(f"{label}: '{name}' is a model name; give the models folder (--models DIR)")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise WorkflowError(f"{label}: model name '{name}' must be relative to the models folder")
    tried = []
    for sub in FOLDERS[folder]:
        path = models_dir / sub / name
        if path.is_file():
            return path
        tried.append(str(models_dir / sub))
    raise WorkflowError(f"{label}: model file '{name}' not found in {' or '.join(tried)}")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:
        raise DiffguideError(f"'{path}' is not a readable safetensors file: {err}") from err


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def qwen_image_config(sd: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> dict[str, Any]:
    """``QwenImageTransformer2DModel`` kwargs from the shapes (patch size 2, as every Qwen-Image)."""
    inner, in_channels = sd["img_in.weight"].shape
    head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    cfg: dict[str, Any] = {
        "patch_size": 2,
        "in_channels": int(in_channels),
        "out_channels": int(sd["proj_out.weight"].shape[0]) // 4,
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": int(inner) // head_dim,
        "joint_attention_dim": int(sd["txt_in.weight"].shape[1]),
    }
    given = json.loads(metadata["config"]) if "config" in metadata else {}
    for key, value in cfg.items():
        if key in given and given[key] != value:
            raise DiffguideError(f"'{name}': its config says {key}={given[key]}, its weights {value}")
    rope = given.get("axes_dims_rope", _QWEN_ROPE.get(head_dim))
    if rope is None:
        raise DiffguideError(
            f"'{name}': attention head size {head_dim} has no known rotary axes; store the diffusers config "
            "(with axes_dims_rope) as the file's 'config' metadata"
        )
    cfg["axes_dims_rope"] = tuple(rope)
    if "guidance_embeds" in given:
        cfg["guidance_embeds"] = bool(given["guidance_embeds"])
    return cfg


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})


def auraflow_config(sd: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> dict[str, Any]:
    """``AuraFlowTransformer2DModel`` kwargs from the shapes (4 latent channels, as AuraFlow)."""
    inner, patch_in = sd["pos_embed.proj.weight"].shape
    patch = round((int(patch_in) // 4) ** 0.5)
    cfg: dict[str, Any] = {
        "patch_size": patch,
        "in_channels": 4,
        "out_channels": int(sd["proj_out.weight"].shape[0]) // (patch * patch),
        "num_mmdit_layers": _count(sd, "joint_transformer_blocks"),
        "num_single_dit_layers": _count(sd, "single_transformer_blocks"),
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(inner),
        "pos_embed_max_size": int(sd["pos_embed.pos_embed"].shape[1]),
    }
    given = json.loads(metadata["config"]) if "config" in metadata else {}
    for key, value in cfg.items():
        if key in given and given[key] != value:
            raise DiffguideError(f"'{name}': its config says {key}={given[key]}, its weights {value}")
    heads = given.get("num_attention_heads", 12 if inner == 3072 else None)
    if heads is None or int(inner) % int(heads):
        raise DiffguideError(
            f"'{name}': the attention heads of a width-{inner} AuraFlow are not in its weights; store the "
            "diffusers config (num_attention_heads) as the file's 'config' metadata"
        )
    cfg.update(num_attention_heads=int(heads), attention_head_dim=int(inner) // int(heads))
    cfg["sample_size"] = int(given.get("sample_size", 64))
    return cfg


def sd3_config(sd: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs from the shapes (heads: the config, else width / 64 as SD3)."""
    inner, in_channels, patch, _ = sd["pos_embed.proj.weight"].shape
    layers = _count(sd, "transformer_blocks")
    cfg: dict[str, Any] = {
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(sd["proj_out.weight"].shape[0]) // int(patch * patch),
        "num_layers": layers,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(inner),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "pos_embed_max_size": round(int(sd["pos_embed.pos_embed"].shape[1]) ** 0.5),
        "dual_attention_layers": tuple(
            i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd
        ),
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in sd else None,
    }
    given = json.loads(metadata["config"]) if "config" in metadata else {}
    for key, value in cfg.items():
        if (
            key in given
            and given[key] != value
            and not (isinstance(value, tuple) and tuple(given[key]) == value)
        ):
            raise DiffguideError(f"'{name}': its config says {key}={given[key]}, its weights {value}")
    heads = int(given.get("num_attention_heads", int(inner) // 64))
    if heads <= 0 or int(inner) % heads:
        raise DiffguideError(f"'{name}': {heads} attention heads do not divide the width {inner}")
    cfg.update(num_attention_heads=heads, attention_head_dim=int(inner) // heads)
    cfg["sample_size"] = int(given.get("sample_size", 128))
    return cfg


def load_diffusion_model(path: Path, dtype: torch.dtype) -> Any:
    """A diffusers pipeline (no text encoder, no VAE) around the transformer in ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    sd, metadata = read_state_dict(path)
    sd = _strip(sd)
    if "img_in.weight" in sd and "txt_norm.weight" in sd:
        cfg = qwen_image_config(sd, metadata, path.name)
        model: Any = QwenImageTransformer2DModel(**cfg)
        _load(model, sd, path)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        )  # fmt: skip
        model = (model if dtype == torch.float32 else model.to(dtype)).eval().requires_grad_(False)
        return QwenImagePipeline(
            scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=model
        )
    if "joint_transformer_blocks.0.attn.add_k_proj.weight" in sd and "register_tokens" in sd:
        from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

        aura: Any = AuraFlowTransformer2DModel(**auraflow_config(sd, metadata, path.name))
        _load(aura, sd, path)
        aura = (aura if dtype == torch.float32 else aura.to(dtype)).eval().requires_grad_(False)
        return AuraFlowPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=aura,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
        )  # fmt: skip
    if is_comfy_flux(sd) or is_diffusers_flux(sd):
        return _flux_pipeline(sd, metadata, path, dtype)
    if (
        "transformer_blocks.0.attn.add_k_proj.weight" in sd
        and "time_text_embed.text_embedder.linear_1.weight" in sd
    ):
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        sd3: Any = SD3Transformer2DModel(**sd3_config(sd, metadata, path.name))
        _load(sd3, sd, path)
        sd3 = (sd3 if dtype == torch.float32 else sd3.to(dtype)).eval().requires_grad_(False)
        return StableDiffusion3Pipeline(
            transformer=sd3, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None,
        )  # fmt: skip
    raise DiffguideError(
        f"'{path}': not a diffusion model diffguide can read from its weights (supported: Qwen-Image, "
        "AuraFlow and SD3 transformers in diffusers' key names, FLUX.1 in ComfyUI's or diffusers')"
    )


def _flux_pipeline(
    sd: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, dtype: torch.dtype
) -> Any:
    """A FluxPipeline around the FLUX.1 transformer of ``sd`` (ComfyUI's or diffusers' key names);
    its scheduler is FluxPipeline's (dynamic shift on dev-like models, shift 1 on schnell-like)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if is_comfy_flux(sd):
        sd = comfy_flux_to_diffusers(sd, path.name)
    cfg = flux_config(sd, metadata, path.name)
    flux: Any = FluxTransformer2DModel(**cfg)
    _load(flux, sd, path)
    flux = (flux if dtype == torch.float32 else flux.to(dtype)).eval().requires_grad_(False)
    dev = cfg["guidance_embeds"]
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=flux,
    )  # fmt: skip


def _load(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise DiffguideError(
            f"'{path}': weights do not fit the inferred model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise DiffguideError(f"'{path}': {str(err).splitlines()[-1].strip()}") from err
