"""FLUX.1 transformer files: ComfyUI's (BFL's) key layout -> diffusers' ``FluxTransformer2DModel``.

A ComfyUI Flux file (``UNETLoader``; ``flux1-dev.safetensors`` and friends) holds BFL's names:
``double_blocks.N.img_attn.qkv`` (q, k, v stacked), ``single_blocks.N.linear1`` (q, k, v and the
MLP input stacked), ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev-like
only), ``final_layer`` (its modulation as (shift, scale), diffusers' as (scale, shift)); the
RMS norms as ``*_norm.scale`` (BFL) or ``*_norm.weight`` (ComfyUI's re-saved files). Optionally
behind ``model.diffusion_model.``. :func:`comfy_flux_to_diffusers` renames and splits them;
:func:`flux_config` reads the sizes from the shapes. Files already in diffusers' names are
read as they are.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from ..errors import DiffguideError

#: FLUX.1's rotary axes for its head size 128; other head sizes need a config in the file.
_FLUX_ROPE = {128: (16, 56, 56)}

_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
_BASIC = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def is_comfy_flux(sd: dict[str, Tensor]) -> bool:
    return "double_blocks.0.img_attn.qkv.weight" in sd and "img_in.weight" in sd


def is_diffusers_flux(sd: dict[str, Tensor]) -> bool:
    return "x_embedder.weight" in sd and "single_transformer_blocks.0.proj_mlp.weight" in sd


def _blocks(sd: dict[str, Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})


def _norm(sd: dict[str, Tensor], key: str) -> Tensor:
    """An RMS norm's gain under BFL's ``.scale`` or ComfyUI's ``.weight`` name."""
    for name in (f"{key}.scale", f"{key}.weight"):
        if name in sd:
            return sd.pop(name)
    raise KeyError(f"{key}.scale")


def comfy_flux_to_diffusers(sd: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """diffusers' state dict for a BFL/ComfyUI-layout Flux state dict (prefix already stripped).
    Every key must be used: a leftover (e.g. a Flux Fill's extra inputs) is a one-line error."""
    sd = dict(sd)
    hidden = int(sd["img_in.weight"].shape[0])
    out: dict[str, Tensor] = {}
    try:
        for src, dst in _BASIC.items():
            for end in ("weight", "bias"):
                if f"{src}.{end}" in sd:
                    out[f"{dst}.{end}"] = sd.pop(f"{src}.{end}")
        for end in ("weight", "bias"):
            shift, scale = sd.pop(f"final_layer.adaLN_modulation.1.{end}").chunk(2, dim=0)
            out[f"norm_out.linear.{end}"] = torch.cat([scale, shift], dim=0)
        for i in range(_blocks(sd, "double_blocks")):
            src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            for a, b in _DOUBLE.items():
                for end in ("weight", "bias"):
                    out[f"{dst}{b}.{end}"] = sd.pop(f"{src}{a}.{end}")
            for a, b in _DOUBLE_NORMS.items():
                out[f"{dst}{b}.weight"] = _norm(sd, f"{src}{a}")
            for stream, names in (
                ("img", ("to_q", "to_k", "to_v")),
                ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
            ):
                for end in ("weight", "bias"):
                    parts = sd.pop(f"{src}{stream}_attn.qkv.{end}").split(hidden, dim=0)
                    out.update({f"{dst}attn.{n}.{end}": p for n, p in zip(names, parts, strict=True)})
        for i in range(_blocks(sd, "single_blocks")):
            src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            for a, b in _SINGLE.items():
                for end in ("weight", "bias"):
                    out[f"{dst}{b}.{end}"] = sd.pop(f"{src}{a}.{end}")
            for a, b in _SINGLE_NORMS.items():
                out[f"{dst}{b}.weight"] = _norm(sd, f"{src}{a}")
            for end in ("weight", "bias"):
                w = sd.pop(f"{src}linear1.{end}")
                q, k, v, mlp = w.split([hidden, hidden, hidden, w.shape[0] - 3 * hidden], dim=0)
                out.update(
                    {f"{dst}attn.to_q.{end}": q, f"{dst}attn.to_k.{end}": k, f"{dst}attn.to_v.{end}": v}
                )
                out[f"{dst}proj_mlp.{end}"] = mlp
    except KeyError as err:
        raise DiffguideError(f"'{name}': not a FLUX.1 transformer: it lacks {err.args[0]}") from None
    if sd:
        raise DiffguideError(f"'{name}': keys a FLUX.1 transformer does not have: {sorted(sd)[:3]}")
    return out


def flux_config(sd: dict[str, Tensor], metadata: dict[str, str], name: str) -> dict[str, Any]:
    """``FluxTransformer2DModel`` kwargs from a diffusers-named state dict's shapes (patch size 1,
    latents packed 2x2 outside the model, as diffusers runs Flux)."""
    inner, in_channels = sd["x_embedder.weight"].shape
    head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    if int(sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]) != 4 * int(inner):
        raise DiffguideError(
            f"'{name}': an MLP ratio other than 4 is not a FLUX.1 transformer diffusers can build"
        )
    cfg: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(sd["proj_out.weight"].shape[0]),
        "num_layers": _blocks(sd, "transformer_blocks"),
        "num_single_layers": _blocks(sd, "single_transformer_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": int(inner) // head_dim,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
    }
    given = json.loads(metadata["config"]) if "config" in metadata else {}
    for key, value in cfg.items():
        if key in given and given[key] != value:
            raise DiffguideError(f"'{name}': its config says {key}={given[key]}, its weights {value}")
    rope = given.get("axes_dims_rope", _FLUX_ROPE.get(head_dim))
    if rope is None or sum(rope) != head_dim:
        raise DiffguideError(
            f"'{name}': attention head size {head_dim} has no known rotary axes; store the diffusers config "
            "(with axes_dims_rope summing to the head size) as the file's 'config' metadata"
        )
    cfg["axes_dims_rope"] = tuple(int(a) for a in rope)
    return cfg
