"""Tiny Qwen-Image workflows for diffguide.comfy_workflow, and ComfyUI's own node code running them.

:func:`make_models_dir` writes, in ComfyUI's models layout: a tiny random Qwen-Image transformer
(diffusers key names, its config in the safetensors metadata for the rotary axes), a LoRA for it
built with peft (``transformer.``-prefixed peft keys, which both diffusers and ComfyUI read), and
ComfyUI-form conditioning files. :func:`qwen_workflow` is the service problem's workflow in the API
format. :func:`comfy_execute` runs such a workflow with ComfyUI's node classes (``nodes.py``,
``comfy_extras``), except ``UNETLoader``, which cannot build a tiny Qwen-Image (its detection reads
only in_channels and num_layers and builds the full size): the model comes from
``model_detection.model_config_from_unet_config`` with the explicit tiny config, ``get_model``,
the diffusers state dict loaded as is, and a ModelPatcher; and ``DiffguideLoadConditioning``
(diffguide's own node), read with diffguide's loader.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import comfy_support
import torch
from dit_support import _liven
from safetensors.torch import save_file

from diffguide.comfy_workflow import load_comfy_conditioning, save_comfy_conditioning
from diffguide.testing_dit import tiny_auraflow, tiny_qwen_image

QWEN_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": [8, 12, 12],
}
SIZE = 64  # pixels: a 8x8 latent, 16 tokens
TOKENS = 7


def tiny_qwen_transformer(seed: int = 0) -> Any:
    return _liven(tiny_qwen_image(seed=seed).transformer, seed + 3).requires_grad_(False)


def lora_state_dict(transformer: Any, seed: int = 5, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA (peft, rank 4 on the attention projections), ``transformer.``-prefixed keys."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    model.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    sd = get_peft_model_state_dict(model)
    return {f"transformer.{k}": (v * 0.5).contiguous() for k, v in sd.items()}


def conditioning(seed: int, mask_tail: int = 0) -> list[list[Any]]:
    """ComfyUI-form conditioning: [[embeds (1, 7, 64), {"pooled_output": None, "attention_mask": ...}]]."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, TOKENS, 64, generator=g)
    mask = torch.ones(1, TOKENS, dtype=torch.long)
    if mask_tail:
        mask[:, -mask_tail:] = 0
    return [[embeds, {"pooled_output": None, "attention_mask": mask}]]


def make_models_dir(root: Path, mask_tail: int = 0) -> Path:
    transformer = tiny_qwen_transformer()
    (root / "diffusion_models").mkdir(parents=True)
    (root / "loras").mkdir()
    sd = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    save_file(
        sd,
        str(root / "diffusion_models" / "tiny_qwen.safetensors"),
        metadata={"config": json.dumps(QWEN_CONFIG)},
    )
    save_file(lora_state_dict(transformer), str(root / "loras" / "tiny_lora.safetensors"))
    save_comfy_conditioning(root / "positive.safetensors", conditioning(1, mask_tail), {"prompt": "a cat"})
    save_comfy_conditioning(root / "negative.safetensors", conditioning(2, mask_tail), {"prompt": ""})
    return root


def qwen_workflow(
    models: Path,
    *,
    sampler: str = "euler",
    scheduler: str = "simple",
    cfg: float = 4.0,
    steps: int = 8,
    seed: int = 12345,
    lora: float = 0.8,
    shift: float = 3.1,
    cfgnorm: float | None = 1.0,
    pre_cfg: bool = False,
    rescale: float | None = None,
) -> dict[str, Any]:
    """UNETLoader -> LoraLoaderModelOnly -> ModelSamplingAuraFlow -> CFGNorm -> KSampler (API format);
    ``rescale``: a RescaleCFG node (that multiplier) between ModelSamplingAuraFlow and CFGNorm."""
    wf: dict[str, Any] = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "tiny_qwen.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "tiny_lora.safetensors", "strength_model": lora},
        },
        "3": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["2", 0], "shift": shift}},
        "4": {
            "class_type": "CFGNorm",
            "inputs": {"model": ["3", 0], "strength": cfgnorm, "pre_cfg": pre_cfg},
        },
        "5": {
            "class_type": "DiffguideLoadConditioning",
            "inputs": {"file": str(models / "positive.safetensors")},
        },
        "6": {
            "class_type": "DiffguideLoadConditioning",
            "inputs": {"file": str(models / "negative.safetensors")},
        },
        "7": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": SIZE, "height": SIZE, "length": 1, "batch_size": 1},
        },
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "positive": ["5", 0],
                "negative": ["6", 0],
                "latent_image": ["7", 0],
                "denoise": 1.0,
            },
        },
    }
    if rescale is not None:
        wf["9"] = {"class_type": "RescaleCFG", "inputs": {"model": ["3", 0], "multiplier": rescale}}
        wf["4"]["inputs"]["model"] = ["9", 0]
    if cfgnorm is None:
        del wf["4"]
        wf["8"]["inputs"]["model"] = ["9" if rescale is not None else "3", 0]
    return wf


AURA_CONFIG = {"num_attention_heads": 4, "sample_size": 16}
AURA_SIZE = 128  # pixels: a 16x16 latent, the 8x8 patch grid of the tiny model's positional table


def make_aura_models_dir(root: Path) -> Path:
    """A tiny AuraFlow transformer (diffusers keys, head count in the metadata) and conditioning."""
    transformer = _liven(tiny_auraflow(seed=0).transformer, 3).requires_grad_(False)
    (root / "diffusion_models").mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    save_file(
        sd,
        str(root / "diffusion_models" / "tiny_aura.safetensors"),
        metadata={"config": json.dumps(AURA_CONFIG)},
    )
    for name, seed in (("positive", 1), ("negative", 2)):
        g = torch.Generator().manual_seed(seed)
        save_comfy_conditioning(root / f"{name}.safetensors", [[torch.randn(1, TOKENS, 32, generator=g), {}]])
    return root


def aura_workflow(
    models: Path,
    *,
    sampler: str = "euler",
    scheduler: str = "simple",
    pre_cfg: bool = False,
    rescale: float | None = None,
) -> dict[str, Any]:
    """UNETLoader -> ModelSamplingAuraFlow(3.1) -> (RescaleCFG) -> CFGNorm -> KSampler on
    EmptyLatentImage (API format)."""
    wf = qwen_workflow(models, sampler=sampler, scheduler=scheduler, pre_cfg=pre_cfg, rescale=rescale)
    wf["1"]["inputs"]["unet_name"] = "tiny_aura.safetensors"
    del wf["2"]
    wf["3"]["inputs"]["model"] = ["1", 0]
    wf["7"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": AURA_SIZE, "height": AURA_SIZE, "batch_size": 1},
    }
    return wf


SD3_SIZE = 128  # pixels: a 16x16 latent, the 8x8 patch grid of the tiny model's positional table


def tiny_sd3_transformer(seed: int = 0) -> Any:
    """A tiny diffusers SD3 transformer ComfyUI's MMDiT can hold: 2 blocks, width 64 x depth, 2 heads of 64."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
        pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8,
    )  # fmt: skip
    return _liven(model, seed + 3).eval().requires_grad_(False)


def make_sd3_models_dir(root: Path) -> Path:
    """A tiny SD3 transformer (diffusers keys; its sizes all in the weights) and SD3-form conditioning."""
    (root / "diffusion_models").mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in tiny_sd3_transformer().state_dict().items()}
    save_file(sd, str(root / "diffusion_models" / "tiny_sd3.safetensors"))
    for name, seed in (("positive", 1), ("negative", 2)):
        g = torch.Generator().manual_seed(seed)
        embeds, pooled = torch.randn(1, TOKENS, 32, generator=g), torch.randn(1, 32, generator=g)
        save_comfy_conditioning(root / f"{name}.safetensors", [[embeds, {"pooled_output": pooled}]])
    return root


def sd3_workflow(
    models: Path,
    *,
    layers: str = "1",
    scale: float = 3.0,
    start: float = 0.01,
    end: float = 0.5,
    sampler: str = "euler",
    shift: float | None = 3.0,
    steps: int = 8,
    slg: bool = True,
) -> dict[str, Any]:
    """UNETLoader (tiny SD3) -> ModelSamplingSD3 -> SkipLayerGuidanceSD3 -> KSampler on EmptySD3LatentImage."""
    wf = qwen_workflow(models, sampler=sampler, steps=steps, cfg=4.0, cfgnorm=None)
    wf["1"]["inputs"]["unet_name"] = "tiny_sd3.safetensors"
    del wf["2"]
    wf["3"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}}
    wf["7"] = {
        "class_type": "EmptySD3LatentImage",
        "inputs": {"width": SD3_SIZE, "height": SD3_SIZE, "batch_size": 1},
    }
    upstream = ["3", 0]
    if shift is None:
        del wf["3"]
        upstream = ["1", 0]
    if slg:
        wf["4"] = {
            "class_type": "SkipLayerGuidanceSD3",
            "inputs": {"model": upstream, "layers": layers, "scale": scale, "start_percent": start,
                       "end_percent": end},
        }  # fmt: skip
        upstream = ["4", 0]
    wf["8"]["inputs"]["model"] = upstream
    return wf


def as_dit_node(wf: dict[str, Any], rescaling: float) -> dict[str, Any]:
    """``sd3_workflow``'s SkipLayerGuidanceSD3 as the SkipLayerGuidanceDiT node, with rescaling."""
    i = wf["4"]["inputs"]
    wf["4"] = {
        "class_type": "SkipLayerGuidanceDiT",
        "inputs": {"model": i["model"], "double_layers": i["layers"], "single_layers": "", "scale": i["scale"],
                   "start_percent": i["start_percent"], "end_percent": i["end_percent"],
                   "rescaling_scale": rescaling},
    }  # fmt: skip
    return wf


def make_sdxl_models_dir(root: Path, gp: Any) -> Path:
    """ComfyUI-form SDXL conditioning of the tiny SDXL pipeline ``gp`` (with CLIPTextEncodeSDXL's
    width/height keys) and a placeholder checkpoint file (the test passes the pipeline itself)."""
    from diffguide import CFG, GenerateConfig

    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "tiny_sdxl.safetensors").write_bytes(b"the test passes its pipeline")
    cfg = GenerateConfig.create(["a cat"], [""], guidance=[CFG(4.0)], steps=1, noise="comfy")
    cond, uncond = gp.encode(cfg, SD3_SIZE, SD3_SIZE)
    for name, c in (("positive", cond), ("negative", uncond)):
        meta = {"pooled_output": c.tensors["pooled"], "width": SD3_SIZE, "height": SD3_SIZE}
        save_comfy_conditioning(root / f"{name}.safetensors", [[c.embeds, meta]])
    return root


def sdxl_pag_workflow(models: Path, *, scale: float | None = 2.0, sampler: str = "euler") -> dict[str, Any]:
    """CheckpointLoaderSimple (tiny SDXL) -> PerturbedAttentionGuidance -> KSampler cfg 4, euler/normal."""
    wf = qwen_workflow(models, cfgnorm=None, scheduler="normal", sampler=sampler)
    wf["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sdxl.safetensors"}}
    del wf["2"], wf["3"]
    wf["7"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": SD3_SIZE, "height": SD3_SIZE, "batch_size": 1},
    }
    wf["8"]["inputs"]["model"] = ["1", 0]
    if scale is not None:
        wf["4"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["1", 0], "scale": scale}}
        wf["8"]["inputs"]["model"] = ["4", 0]
    return wf


FLUX_SIZE = 64  # pixels: an 8x8 latent of 16 channels, 16 packed tokens
FLUX_CONFIG = {"axes_dims_rope": [4, 4, 8]}  # the rotary axes of head size 16 (not in the weights)


def tiny_flux_transformer(seed: int = 0, guidance: bool = True) -> Any:
    """A tiny diffusers FLUX.1 transformer with real Flux's channel layout (16 latent channels,
    packed 2x2 into 64), 2 double and 2 single blocks of width 32 (2 heads of 16)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    return _liven(model, seed + 3).eval().requires_grad_(False)


def diffusers_flux_to_bfl(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The BFL/ComfyUI key layout of a diffusers Flux state dict (``.scale`` norm names, q/k/v and
    the single blocks' MLP input stacked, the final modulation as (shift, scale)); the inverse of
    diffguide's reader, checked by ComfyUI loading the result strictly in the parity test."""
    from diffguide.comfy_workflow import flux_file as ff

    sd, out = dict(sd), {}
    for a, b in ff._BASIC.items():
        for end in ("weight", "bias"):
            if f"{b}.{end}" in sd:
                out[f"{a}.{end}"] = sd.pop(f"{b}.{end}")
    for end in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{end}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{end}"] = torch.cat([shift, scale], dim=0)
    for stack, src, table, norms in (
        ("transformer_blocks", "double_blocks", ff._DOUBLE, ff._DOUBLE_NORMS),
        ("single_transformer_blocks", "single_blocks", ff._SINGLE, ff._SINGLE_NORMS),
    ):
        for i in range(ff._blocks(sd, stack)):
            d, c = f"{stack}.{i}.", f"{src}.{i}."
            for a, b in table.items():
                for end in ("weight", "bias"):
                    out[f"{c}{a}.{end}"] = sd.pop(f"{d}{b}.{end}")
            for a, b in norms.items():
                out[f"{c}{a}.scale"] = sd.pop(f"{d}{b}.weight")
            for end in ("weight", "bias"):
                if src == "double_blocks":
                    for stream, names in (
                        ("img", ("to_q", "to_k", "to_v")),
                        ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
                    ):
                        out[f"{c}{stream}_attn.qkv.{end}"] = torch.cat(
                            [sd.pop(f"{d}attn.{n}.{end}") for n in names]
                        )
                else:
                    parts = [sd.pop(f"{d}attn.to_{n}.{end}") for n in "qkv"] + [sd.pop(f"{d}proj_mlp.{end}")]
                    out[f"{c}linear1.{end}"] = torch.cat(parts)
    assert not sd, sorted(sd)[:3]
    return {f"{prefix}{k}": v.contiguous() for k, v in out.items()}


def make_flux_models_dir(root: Path, guidance: bool = True) -> Path:
    """A tiny FLUX.1 transformer in ComfyUI's key layout (``model.diffusion_model.`` prefix, its
    rotary axes in the metadata), placeholder text-encoder files for DualCLIPLoader, and Flux-form
    conditioning ([[T5 states (1, 7, 32), {"pooled_output": CLIP pooled (1, 32)}]])."""
    (root / "diffusion_models").mkdir(parents=True)
    (root / "text_encoders").mkdir()
    sd = diffusers_flux_to_bfl(
        tiny_flux_transformer(guidance=guidance).state_dict(), "model.diffusion_model."
    )
    save_file(
        sd,
        str(root / "diffusion_models" / "tiny_flux.safetensors"),
        metadata={"config": json.dumps(FLUX_CONFIG)},
    )
    for name in ("clip_l.safetensors", "t5xxl.safetensors"):
        (root / "text_encoders" / name).write_bytes(b"not loaded: the prompts come as conditioning files")
    for name, seed in (("positive", 1), ("negative", 2)):
        g = torch.Generator().manual_seed(seed)
        embeds, pooled = torch.randn(1, TOKENS, 32, generator=g), torch.randn(1, 32, generator=g)
        save_comfy_conditioning(root / f"{name}.safetensors", [[embeds, {"pooled_output": pooled}]])
    return root


def flux_workflow(
    models: Path,
    *,
    cfg: float = 1.0,
    guidance: float | None = 3.5,
    sampler: str = "euler",
    scheduler: str = "simple",
    node_shift: bool = True,
    steps: int = 8,
) -> dict[str, Any]:
    """A FLUX.1 dev workflow as ComfyUI's template: UNETLoader -> ModelSamplingFlux(1.15, 0.5, size)
    -> KSampler(cfg 1); DualCLIPLoader -> CLIPTextEncode x2 (their outputs given as conditioning
    files: node 5 positive, 6 negative) -> FluxGuidance on the positive (both when cfg > 1)."""
    wf = qwen_workflow(models, sampler=sampler, scheduler=scheduler, cfg=cfg, steps=steps, cfgnorm=None)
    wf["1"]["inputs"]["unet_name"] = "tiny_flux.safetensors"
    del wf["2"]
    wf["3"] = {
        "class_type": "ModelSamplingFlux",
        "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": FLUX_SIZE, "height": FLUX_SIZE},
    }  # fmt: skip
    wf["9"] = {
        "class_type": "DualCLIPLoader",
        "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl.safetensors", "type": "flux"},
    }
    for nid, text in (("5", "a cat"), ("6", "")):
        wf[nid] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["9", 0]}}
    wf["7"] = {
        "class_type": "EmptySD3LatentImage",
        "inputs": {"width": FLUX_SIZE, "height": FLUX_SIZE, "batch_size": 1},
    }
    wf["8"]["inputs"]["model"] = ["3", 0] if node_shift else ["1", 0]
    if not node_shift:
        del wf["3"]
    if guidance is not None:
        for nid, src in (("10", "5"), ("11", "6")) if cfg != 1.0 else (("10", "5"),):
            wf[nid] = {
                "class_type": "FluxGuidance",
                "inputs": {"conditioning": [src, 0], "guidance": guidance},
            }
            wf["8"]["inputs"]["positive" if src == "5" else "negative"] = [nid, 0]
    return wf


def flux_conditioning_files(models: Path) -> dict[str, Path]:
    """The conditioning files standing for the workflow's CLIPTextEncode nodes (5, 6)."""
    return {"5": models / "positive.safetensors", "6": models / "negative.safetensors"}


def tiny_sdxl_file_pipeline(seed: int = 0) -> Any:
    """A tiny SDXL that round-trips through an A1111/ComfyUI single file: text encoders of different
    widths (32, 48; diffusers tells them apart by width) and a 4-level VAE (factor 8, as SDXL's), so
    a 128 px workflow samples the same 16x16 latent as ComfyUI's EmptyLatentImage."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from diffguide import testing

    base = testing.tiny_sdxl(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=0.13025,
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=base.text_encoder,
        text_encoder_2=testing._text(seed + 3, 48, projection=True), tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=testing.sdxl_unet(seed, cross_dim=32 + 48, pooled_dim=48),
        scheduler=base.scheduler,
    )  # fmt: skip


def make_sdxl_checkpoint_dir(root: Path, pipe: Any) -> tuple[Path, Path]:
    """(models folder with ``checkpoints/tiny_sdxl_file.safetensors``, the LDM/A1111-layout single
    file of ``pipe``; the diffusers folder of the same pipeline for ``--config``)."""
    import ldm_export

    (root / "checkpoints").mkdir(parents=True)
    save_file(ldm_export.sdxl_to_ldm(pipe), str(root / "checkpoints" / "tiny_sdxl_file.safetensors"))
    pipe.save_pretrained(root / "tiny_sdxl_config")
    return root, root / "tiny_sdxl_config"


def sdxl_checkpoint_workflow(*, sampler: str = "euler", cfg: float = 4.0) -> dict[str, Any]:
    """CheckpointLoaderSimple (the tiny SDXL file) -> CLIPTextEncode x2 (its own text encoders) ->
    KSampler on a 128 px EmptyLatentImage."""
    models = Path(".")
    wf = sdxl_pag_workflow(models, scale=None, sampler=sampler)
    wf["1"]["inputs"]["ckpt_name"] = "tiny_sdxl_file.safetensors"
    wf["8"]["inputs"]["cfg"] = cfg
    for nid, text in (("5", "a red cat"), ("6", "blurry")):
        wf[nid] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    return wf


# --------------------------------------------------------------------------------------------------
# ComfyUI's side
# --------------------------------------------------------------------------------------------------

_NODE_STANDINS = ("torchvision", "torchaudio", "av")


def load_comfy_nodes() -> Any:
    """ComfyUI's ``nodes`` and ``comfy_extras`` node modules (import-only stand-ins for torchvision,
    torchaudio and av, which they import but these nodes never use; removed again afterwards).

    Raises ComfyUnavailable when ComfyUI core is missing (the test skips, or fails with
    DIFFGUIDE_REQUIRE_COMFY=1); a node module that does not import is a RuntimeError (a failure)."""
    comfy_support.load_comfy()
    missing = [n for n in _NODE_STANDINS if importlib.util.find_spec(n) is None]
    standin_dir = Path(tempfile.mkdtemp(prefix="diffguide-comfy-node-standins-"))
    for name in missing:
        (standin_dir / name).mkdir()
        (standin_dir / name / "__init__.py").write_text(comfy_support._LENIENT_STANDIN)
    sys.path.insert(0, str(standin_dir))
    try:
        import comfy_extras.nodes_cfg as nodes_cfg
        import comfy_extras.nodes_flux as nodes_flux
        import comfy_extras.nodes_hunyuan as nodes_hunyuan
        import comfy_extras.nodes_model_advanced as nodes_model_advanced
        import comfy_extras.nodes_pag as nodes_pag
        import comfy_extras.nodes_sd3 as nodes_sd3
        import comfy_extras.nodes_slg as nodes_slg
        import folder_paths
        import nodes
    except Exception as exc:
        raise RuntimeError(f"ComfyUI's node modules do not import: {type(exc).__name__}: {exc}") from exc
    finally:
        for mod in list(sys.modules):
            if mod.split(".")[0] in missing:
                del sys.modules[mod]
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ not in missing]
        sys.path.remove(str(standin_dir))
        shutil.rmtree(standin_dir, ignore_errors=True)
    return type("ComfyNodes", (), {
        "nodes": nodes, "cfg": nodes_cfg, "advanced": nodes_model_advanced, "hunyuan": nodes_hunyuan,
        "folder_paths": folder_paths, "sd3": nodes_sd3,
        "slg": nodes_slg, "pag": nodes_pag, "flux": nodes_flux,
    })  # fmt: skip


def comfy_qwen_patcher(path: Path) -> Any:
    """ComfyUI's QwenImage model for the tiny diffusers state dict in ``path`` (the issue's recipe)."""
    from safetensors.torch import load_file

    c = comfy_support.load_comfy()
    import comfy.model_detection as md

    sd = load_file(str(path))
    unet_config = {
        "image_model": "qwen_image",
        **QWEN_CONFIG,
        "axes_dims_rope": tuple(QWEN_CONFIG["axes_dims_rope"]),
    }
    model_config = md.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI QwenImage state dict mismatch: {missing[:3]} {unexpected[:3]}")
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_aura_patcher(path: Path) -> Any:
    """ComfyUI's AuraFlow model for a tiny diffusers AuraFlow state dict: ``supported_models.AuraFlow``
    with the sizes given, the state dict converted by ``convert_diffusers_mmdit`` (on a copy: the
    conversion swaps the final modulation's halves in place)."""
    from safetensors.torch import load_file

    c = comfy_support.load_comfy()
    import comfy.model_detection as md
    import comfy.supported_models as sm

    sd = md.convert_diffusers_mmdit({k: v.clone() for k, v in load_file(str(path)).items()}, "")
    unet_config = md.detect_unet_config(sd, "")
    unet_config.update(dim=32, n_heads=4, global_conddim=32, patch_size=2, in_channels=4, out_channels=4)
    model_config = sm.AuraFlow(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI AuraFlow state dict mismatch: {missing[:3]} {unexpected[:3]}")
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_sd3_patcher(path: Path) -> Any:
    """ComfyUI's SD3 (MMDiT: width 64 x depth, depth heads) for a tiny diffusers SD3 state dict,
    converted by ``convert_diffusers_mmdit`` (on a copy) and detected as ComfyUI detects SD3 files."""
    from safetensors.torch import load_file

    c = comfy_support.load_comfy()
    import comfy.model_detection as md
    import comfy.supported_models as sm

    sd = md.convert_diffusers_mmdit({k: v.clone() for k, v in load_file(str(path)).items()}, "")
    model_config = sm.SD3(md.detect_unet_config(sd, ""))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI SD3 state dict mismatch: {missing[:3]} {unexpected[:3]}")
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


FLUX_UNET = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
    "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [4, 4, 8], "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": [],
}  # fmt: skip


def comfy_flux_patcher(path: Path) -> Any:
    """ComfyUI's Flux (``supported_models.Flux``, or ``FluxSchnell`` without ``guidance_in``) with the
    tiny sizes given (its detection fixes the rotary axes at 16/56/56 and the heads at width / 128),
    the file's state dict through the model config's own ``process_unet_state_dict`` (``.scale`` ->
    ``.weight``), loaded strictly."""
    from safetensors.torch import load_file

    c = comfy_support.load_comfy()
    import comfy.supported_models as sm

    sd = load_file(str(path))
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    guidance = "guidance_in.in_layer.weight" in sd
    model_config = (sm.Flux if guidance else sm.FluxSchnell)({**FLUX_UNET, "guidance_embed": guidance})
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(
        model_config.process_unet_state_dict(sd), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI Flux state dict mismatch: {missing[:3]} {unexpected[:3]}")
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_sdxl_from_checkpoint(path: Path, unet: Any) -> Any:
    """ComfyUI's SDXL UNet holding the ``model.diffusion_model.`` weights of the single file
    ``path`` (ComfyUI's own key layout, loaded strictly, no conversion); sizes from the diffusers
    config of the same UNet (ComfyUI's detection only matches full-size SDXL); the size embedder at
    the tiny UNet's width, as ``comfy_nodes_support.sdxl_twin``."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep
    from safetensors.torch import load_file

    c = comfy_support.load_comfy()
    unet_config = comfy_support.comfy_unet_config(unet)
    model_config = c.supported_models.SDXL(unet_config)
    model_config.unet_config.update({k: unet_config[k] for k in ("num_heads", "num_head_channels")})
    model_config.set_inference_dtype(torch.float32, None)
    prefix = "model.diffusion_model."
    sd = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    model = model_config.get_model(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI SDXL UNet state dict mismatch: {missing[:3]} {unexpected[:3]}")
    model.embedder = Timestep(unet.config.addition_time_embed_dim)
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _patcher(path: Path) -> Any:
    if "flux" in path.name:
        return comfy_flux_patcher(path)
    if "sd3" in path.name:
        return comfy_sd3_patcher(path)
    return comfy_aura_patcher(path) if "aura" in path.name else comfy_qwen_patcher(path)


def _io_node(cls: Any, **kwargs: Any) -> Any:
    """An io-style (V3) node executed as ComfyUI's executor does."""
    clone = cls.PREPARE_CLASS_CLONE(None)
    return getattr(clone, clone.FUNCTION)(**kwargs).result


#: node class -> ComfyUI-side stand-in (inputs dict -> outputs tuple) added by a test, e.g. a
#: CheckpointLoaderSimple returning the ComfyUI twin of a tiny diffusers SDXL.
EXTRA_NODES: dict[str, Any] = {}
#: ckpt_name -> ComfyUI-side (MODEL, CLIP, VAE) for CheckpointLoaderSimple, registered by a test;
#: a CLIP is a callable text -> CONDITIONING (ComfyUI cannot build tiny text encoders).
CHECKPOINTS: dict[str, Any] = {}


def comfy_execute(
    workflow: dict[str, Any], models: Path, trace: dict[str, Any] | None = None
) -> torch.Tensor:
    """Run ``workflow`` (API format) with ComfyUI's node code; returns KSampler's LATENT samples.
    ``trace``, when given, receives ComfyUI's model sampling (``model_sampling``) and sigmas."""
    cn = load_comfy_nodes()
    comfy_support.load_comfy().utils.PROGRESS_BAR_ENABLED = False
    cn.folder_paths.add_model_folder_path("loras", str(models / "loras"), is_default=True)
    nodes = cn.nodes
    classes: dict[str, Any] = {
        "LoraLoaderModelOnly": lambda i: nodes.LoraLoaderModelOnly().load_lora_model_only(**i),
        "ModelSamplingAuraFlow": lambda i: cn.advanced.ModelSamplingAuraFlow().patch_aura(**i),
        "ModelSamplingSD3": lambda i: cn.advanced.ModelSamplingSD3().patch(**i),
        "ModelSamplingFlux": lambda i: cn.advanced.ModelSamplingFlux().patch(**i),
        "FluxGuidance": lambda i: _io_node(cn.flux.FluxGuidance, **i),
        "CLIPTextEncode": lambda i: (i["clip"](i["text"]),),
        "CheckpointLoaderSimple": lambda i: CHECKPOINTS[i["ckpt_name"]],
        "CFGNorm": lambda i: _io_node(cn.cfg.CFGNorm, **i),
        "RescaleCFG": lambda i: cn.advanced.RescaleCFG().patch(**i),
        "EmptyHunyuanLatentVideo": lambda i: _io_node(cn.hunyuan.EmptyHunyuanLatentVideo, **i),
        "KSampler": lambda i: nodes.KSampler().sample(**i),
        "UNETLoader": lambda i: (_patcher(models / "diffusion_models" / i["unet_name"]),),
        "EmptyLatentImage": lambda i: nodes.EmptyLatentImage().generate(**i),
        "LoadLatent": lambda i: nodes.LoadLatent().load(**i),  # a name in ComfyUI's input directory
        "EmptySD3LatentImage": lambda i: _io_node(cn.sd3.EmptySD3LatentImage, **i),
        "SkipLayerGuidanceSD3": lambda i: _io_node(cn.sd3.SkipLayerGuidanceSD3, **i),
        "SkipLayerGuidanceDiT": lambda i: _io_node(cn.slg.SkipLayerGuidanceDiT, **i),
        "PerturbedAttentionGuidance": lambda i: _io_node(cn.pag.PerturbedAttentionGuidance, **i),
        "DiffguideLoadConditioning": lambda i: (load_comfy_conditioning(i["file"])[0],),
    }
    classes.update(EXTRA_NODES)
    values: dict[str, tuple[Any, ...]] = {}

    def out(nid: str) -> tuple[Any, ...]:
        if nid not in values:
            node = workflow[nid]
            inputs = {k: (out(v[0])[v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
            values[nid] = classes[node["class_type"]](inputs)
        return values[nid]

    sampler = next(k for k, v in workflow.items() if v["class_type"] == "KSampler")
    with torch.inference_mode():
        latent = out(sampler)[0]
    if trace is not None:
        model = out(workflow[sampler]["inputs"]["model"][0])[0]
        trace["model_sampling"] = model.get_model_object("model_sampling")
    return latent["samples"]
