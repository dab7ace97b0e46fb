"""Export diffusers SD1.5 / SDXL pipelines to one original-format (LDM, "CompVis", A1111-style)
state dict: the inverse of the converters in ``diffusers.loaders.single_file_utils``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``).

The layout follows the models' configs (block counts, layers per block, transformer depth,
encoder layers), so it works for the tiny test models as for full-size ones. Every parameter
is mapped by an explicit rule; a key no rule covers raises ``KeyError`` instead of being dropped.

Key facts of the LDM layout (from the diffusers converters):

* UNet (``model.diffusion_model.``): ``input_blocks.0.0`` is ``conv_in``; down block ``b``
  layer ``l`` is ``input_blocks.{1 + b*(lpb+1) + l}`` with the resnet at ``.0`` and the
  transformer at ``.1``; its downsampler is ``input_blocks.{1 + b*(lpb+1) + lpb}.0.op``;
  ``middle_block.0/1/2`` are resnet, transformer, resnet; up block ``b`` layer ``l``
  (``lpb + 1`` layers) is ``output_blocks.{b*(lpb+1) + l}`` with the upsampler after the last
  layer's resnet (``.1.conv``) or transformer (``.2.conv``). Resnets use ``in_layers.0/2``,
  ``out_layers.0/3``, ``emb_layers.1``, ``skip_connection``; transformers keep diffusers'
  inner names. ``time_embed.0/2``, ``label_emb.0.0/2`` (SDXL ``add_embedding``), ``out.0/2``.
* VAE (``first_stage_model.``): ``encoder.down.{i}.block.{j}``, ``.downsample.conv``,
  ``mid.block_1/2``, ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs, ``[C, C, 1, 1]``),
  ``norm_out``, ``nin_shortcut``; the decoder's ``up`` blocks are numbered in reverse
  (diffusers ``up_blocks.i`` is ``up.{n-1-i}``).
* CLIP-L (``cond_stage_model.transformer.`` / ``conditioner.embedders.0.transformer.``): the
  transformers state dict with its ``text_model.`` prefix (which transformers >= 5.6 drops
  from ``CLIPTextModel``).
* OpenCLIP bigG (``conditioner.embedders.1.model.``): ``token_embedding.weight``,
  ``positional_embedding``, ``ln_final``, ``text_projection`` (transposed:
  ``[hidden, projection_dim]``), ``transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_weight,
  attn.in_proj_bias, attn.out_proj, mlp.c_fc, mlp.c_proj}`` with q, k, v fused in that order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the module part of ``rest`` ("norm1.weight" -> "in_layers.0.weight")."""
    module, _, param = rest.rpartition(".")
    if module not in table:
        raise KeyError(f"no LDM name for '{module}'")
    return f"{table[module]}.{param}"


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous, unshared copies (safetensors refuses shared storage)."""
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _map_keys(
    state: dict[str, Tensor], rules: list[tuple[str, Callable[[re.Match[str]], str]]], prefix: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, make in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = prefix + make(m)
                if new in out:
                    raise KeyError(f"two parameters map to '{new}'")
                out[new] = value
                break
        else:
            raise KeyError(f"no LDM mapping for parameter '{key}'")
    return out


# -- UNet --------------------------------------------------------------------------------------


def unet_to_ldm(unet: Any) -> dict[str, Tensor]:
    cfg = unet.config
    lpb = cfg.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("the LDM layout needs one layers_per_block for all blocks")
    if cfg.class_embed_type is not None or cfg.addition_embed_type not in (None, "text_time"):
        raise ValueError("only SD1.5 (no class embedding) and SDXL (text_time) UNets are supported")
    state = unet.state_dict()
    up_has_attn = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}

    def down(m: re.Match[str]) -> str:
        b, kind, l_, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (lpb + 1)
        if kind == "resnets":
            return f"input_blocks.{idx + l_}.0.{_rename_head(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"input_blocks.{idx + l_}.1.{rest}"
        return f"input_blocks.{idx + lpb}.0.op.{rest.removeprefix('conv.')}"  # downsamplers.0

    def up(m: re.Match[str]) -> str:
        b, kind, l_, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * (lpb + 1)
        if kind == "resnets":
            return f"output_blocks.{idx + l_}.0.{_rename_head(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{idx + l_}.1.{rest}"
        return f"output_blocks.{idx + lpb}.{2 if b in up_has_attn else 1}.{rest}"  # upsamplers.0

    def mid(m: re.Match[str]) -> str:
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            if i != 0:
                raise KeyError("the LDM middle block has one transformer")
            return f"middle_block.1.{rest}"
        if i > 1:
            raise KeyError("the LDM middle block has two resnets")
        return f"middle_block.{2 * i}.{_rename_head(rest, _UNET_RESNET)}"

    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"(time_embedding\.linear_[12]|add_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(\w+)",
         lambda m: f"{fixed[m[1]]}.{m[2]}"),
        (r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", down),
        (r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", up),
        (r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", mid),
    ]  # fmt: skip
    return _map_keys(_plain(state), rules, UNET_PREFIX)


# -- VAE ---------------------------------------------------------------------------------------


def vae_to_ldm(vae: Any) -> dict[str, Tensor]:
    n_up = len(vae.config.up_block_types)

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut.", "nin_shortcut.")

    def down(m: re.Match[str]) -> str:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"encoder.down.{i}.block.{j}.{resnet(rest)}"
        return f"encoder.down.{i}.downsample.{rest}"  # downsamplers.0.conv.*

    def up(m: re.Match[str]) -> str:
        k, kind, j, rest = n_up - 1 - int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"decoder.up.{k}.block.{j}.{resnet(rest)}"
        return f"decoder.up.{k}.upsample.{rest}"  # upsamplers.0.conv.*

    def mid(m: re.Match[str]) -> str:
        part, kind, i, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"{part}.mid.block_{i + 1}.{resnet(rest)}"
        return f"{part}.mid.attn_1.{_rename_head(rest, _VAE_ATTN)}"

    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(\w+)", lambda m: m[0]),
        (r"(encoder|decoder)\.conv_norm_out\.(\w+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"(post_quant_conv|quant_conv)\.(\w+)", lambda m: m[0]),
        (r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", down),
        (r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", up),
        (r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", mid),
    ]
    out = _map_keys(_plain(vae.state_dict()), rules, VAE_PREFIX)
    for key, value in out.items():  # LDM's mid-block attention projections are 1x1 convs
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            out[key] = value[:, :, None, None].contiguous()
    return out


# -- text encoders -----------------------------------------------------------------------------


def clip_to_ldm(text_encoder: Any, prefix: str) -> dict[str, Tensor]:
    """CLIP-L as in SD1.5 / SDXL checkpoints: the transformers keys under ``text_model.``."""
    state = _plain(text_encoder.state_dict())
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def open_clip_to_ldm(text_encoder: Any, prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, Tensor]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP's layout (SDXL's second text encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in _plain(text_encoder.state_dict()).items()}
    out: dict[str, Tensor] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":  # nn.Linear [proj, hidden] -> OpenCLIP matrix [hidden, proj]
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in layer:
                raise KeyError(f"no OpenCLIP mapping for parameter '{key}'")
            out[f"{prefix}transformer.resblocks.{m[1]}.{layer[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"no OpenCLIP mapping for parameter '{key}'")
    for (n, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        ).contiguous()
    return out


# -- whole checkpoints -------------------------------------------------------------------------


def sd15_to_ldm(pipe: Any) -> dict[str, Tensor]:
    """One SD1.5 checkpoint: UNet, VAE and CLIP-L with the standard LDM prefixes."""
    return {
        **unet_to_ldm(pipe.unet),
        **vae_to_ldm(pipe.vae),
        **clip_to_ldm(pipe.text_encoder, SD15_CLIP_PREFIX),
    }


def sdxl_to_ldm(pipe: Any) -> dict[str, Tensor]:
    """One SDXL checkpoint: UNet, VAE, CLIP-L (embedders.0) and OpenCLIP bigG (embedders.1)."""
    return {
        **unet_to_ldm(pipe.unet),
        **vae_to_ldm(pipe.vae),
        **clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX),
        **open_clip_to_ldm(pipe.text_encoder_2),
    }
