"""Helpers for the node pack's DiT tests: a tiny ComfyUI Flux built from an explicit config, and an
independent reference for PAG / TPG inside DiT blocks.

The reference is ComfyUI's PerturbedAttentionGuidance design carried over to a DiT: a post-CFG
function that makes one *extra* ``calc_cond_batch`` call on ``[cond]`` with the perturbation
installed on *every* row of that call, then ``denoised + s (cond_denoised - perturbed)``. Its
perturbations are written here, with other means than the pack's: identity attention through
ComfyUI's ``attn1_patch`` (an additive mask built here; ``"value"``: ``attn1_output_patch``
returning the stored V) and token shuffle through forward pre-hooks on the block modules.
"""

from __future__ import annotations

from typing import Any

import comfy_support
import torch

from diffguide.perturb.base import ForwardContext
from diffguide.sampling.noise import image_seeds

FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
    "txt_ids_dims": [],
}


def tiny_flux_comfy(seed: int = 0) -> Any:
    """A tiny ComfyUI Flux (2 double + 2 single blocks, width 64, 2 heads), random weights."""
    c = comfy_support.load_comfy()
    model_config = c.supported_models.Flux(dict(FLUX_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.diffusion_model.parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.05)  # ComfyUI leaves weights uninitialised
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def flux_conds(batch: int = 2, tokens: int = 8) -> tuple[list[Any], list[Any]]:
    g = torch.Generator().manual_seed(0)

    def one() -> list[Any]:
        meta = {"pooled_output": torch.randn(batch, 32, generator=g), "guidance": 3.5}
        return [[torch.randn(batch, tokens, 32, generator=g), meta]]

    return one(), one()


def _diagonal_patch(blocks: set[tuple[str, int]]) -> Any:
    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        if (extra_options["block_type"], extra_options["block_index"]) not in blocks:
            return {}
        start, stop = extra_options["img_slice"]
        length = q.shape[2]
        mask = torch.zeros(length, length, dtype=q.dtype)
        mask[start:stop, start:stop] = float("-inf")
        idx = torch.arange(start, stop)
        mask[idx, idx] = 0.0
        return {"attn_mask": mask[None, None] if attn_mask is None else attn_mask + mask}

    return attn1_patch


def _value_patches(blocks: set[tuple[str, int]]) -> tuple[Any, Any]:
    stored: list[torch.Tensor] = []

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        if (extra_options["block_type"], extra_options["block_index"]) in blocks:
            stored.append(v)
        return {}

    def output_patch(attn, extra_options):
        if not stored:
            return attn
        v = stored.pop()
        return v.transpose(1, 2).reshape(attn.shape)  # (B, heads, L, d) -> (B, L, heads * d)

    return attn1_patch, output_patch


def _shuffle_hooks(model: Any, blocks: set[tuple[str, int]], ctx: ForwardContext, branch: str) -> list[Any]:
    dm = model.diffusion_model
    handles = []
    for kind, index in sorted(blocks):
        module = (dm.double_blocks if kind == "double" else dm.single_blocks)[index]

        def hook(module, args, kwargs, kind=kind):
            img = kwargs["img"] if kind == "double" else args[0]
            start = 0 if kind == "double" else kwargs["transformer_options"]["img_slice"][0]
            n = img.shape[1] - start
            perms = torch.stack(
                [torch.randperm(n, generator=ctx.generator(branch, i)) for i in range(img.shape[0])]
            )
            img = img.clone()
            img[:, start:] = torch.gather(img[:, start:], 1, perms[..., None].expand(-1, -1, img.shape[-1]))
            return (args, {**kwargs, "img": img}) if kind == "double" else ((img, *args[1:]), kwargs)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def reference_model(
    patcher: Any, scale: float, blocks: set[tuple[str, int]], kind: str, *, semantics: str = "diagonal",
    seed: int = 0, batch: int = 2, branch: str = "tpg",
) -> Any:  # fmt: skip
    """``patcher`` with the reference post-CFG function (see the module docstring); ``kind``
    ``"identity"`` (PAG) or ``"shuffle"`` (TPG, permutations from diffguide's per-image generators
    of ``seed + i`` for ``batch`` images: sample once with the returned model)."""
    import comfy.samplers

    model = patcher.clone()
    ctx = ForwardContext(tuple(image_seeds(seed, batch)))

    def post_cfg(args: dict[str, Any]) -> torch.Tensor:
        options = dict(args["model_options"])
        to = dict(options.get("transformer_options", {}))
        patches = {k: list(v) for k, v in to.get("patches", {}).items()}
        handles = []
        if kind == "identity" and semantics == "diagonal":
            patches.setdefault("attn1_patch", []).append(_diagonal_patch(blocks))
        elif kind == "identity":
            patch, output_patch = _value_patches(blocks)
            patches.setdefault("attn1_patch", []).append(patch)
            patches.setdefault("attn1_output_patch", []).append(output_patch)
        else:
            handles = _shuffle_hooks(args["model"], blocks, ctx, branch)
        to["patches"] = patches
        options["transformer_options"] = to
        try:
            (perturbed,) = comfy.samplers.calc_cond_batch(
                args["model"], [args["cond"]], args["input"], args["sigma"], options
            )
        finally:
            for h in handles:
                h.remove()
        return args["denoised"] + scale * (args["cond_denoised"] - perturbed)  # type: ignore[no-any-return]

    model.set_model_sampler_post_cfg_function(post_cfg)
    return model
