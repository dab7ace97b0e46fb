"""Helpers for the diffguide ComfyUI node tests: tiny SDXL and SD3 models inside real ComfyUI,
sampling as ComfyUI's KSampler does, and a model-call counter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy_support
import torch


def sdxl_twin(unet):
    """A ComfyUI SDXL ModelPatcher with the weights of the tiny diffusers SDXL ``unet``.

    ComfyUI's SDXL embeds each size/crop value with a fixed 256-wide ``Timestep``; the tiny UNet
    uses ``addition_time_embed_dim`` (8): the model's ``embedder`` is set to that width (the same
    cos-then-sin sinusoidal embedding as diffusers' ``Timesteps(flip_sin_to_cos=True)``).
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    patcher = comfy_support.comfy_model_from_diffusers_unet(unet)
    patcher.model.embedder = Timestep(unet.config.addition_time_embed_dim)
    return patcher


def sdxl_cond(embeds: torch.Tensor, pooled: torch.Tensor, size: int) -> list[list[Any]]:
    return [[embeds, {"pooled_output": pooled, "width": size, "height": size}]]


def tiny_sd3_comfy(seed: int = 0, depth: int = 2):
    """A tiny ComfyUI SD3 (MMDiT, hidden 64 * depth, patch 2, 16 latent channels), random weights."""
    c = comfy_support.load_comfy()
    unet_config = {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": depth,
        "input_size": None,
        "adm_in_channels": 32,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 32, "out_features": 64 * depth},
        },
        "num_patches": 64,
        "pos_embed_max_size": 8,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }
    model_config = c.supported_models.SD3(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.diffusion_model.parameters(), *model.diffusion_model.buffers()]:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.05)  # ComfyUI leaves weights uninitialised
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def ksample(patcher, positive, negative, latent, *, seed: int, steps: int, cfg: float, sampler="euler",
            scheduler="normal") -> torch.Tensor:  # fmt: skip
    """``comfy.sample.sample`` as the KSampler node calls it (conditioning lists given)."""
    c = comfy_support.load_comfy()
    latent = c.sample.fix_empty_latent_channels(patcher, latent)
    noise = c.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        return c.sample.sample(
            patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
            seed=seed, disable_pbar=True,
        )  # fmt: skip


@contextmanager
def counting(patcher) -> Iterator[list[int]]:
    """Rows of every diffusion-model call while the block runs."""
    rows: list[int] = []
    handle = patcher.model.diffusion_model.register_forward_hook(lambda m, a, o: rows.append(o.shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


def run_node(node_cls, model, **overrides):
    """A node's ``apply`` with its widget defaults, as ComfyUI's executor calls a legacy node."""
    spec = node_cls.INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in spec.items() if k != "model" and len(v) > 1}
    values.update(overrides)
    return getattr(node_cls(), node_cls.FUNCTION)(model=model, **values)


_NODE_STANDINS = ("av", "torchvision")  # imported by comfy_api.latest (video) and model_advanced; unused here


def import_comfy_extra(name: str):
    """``comfy_extras.<name>``, with import-only stand-ins for missing _NODE_STANDINS (removed
    again afterwards)."""
    import importlib
    import importlib.util
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    comfy_support.load_comfy()
    missing = [n for n in _NODE_STANDINS if importlib.util.find_spec(n) is None]
    standin_dir = Path(tempfile.mkdtemp(prefix="diffguide-comfy-node-standins-"))
    for n in missing:
        (standin_dir / n).mkdir()
        (standin_dir / n / "__init__.py").write_text(comfy_support._LENIENT_STANDIN)
    sys.path.insert(0, str(standin_dir))
    try:
        return importlib.import_module(f"comfy_extras.{name}")
    except Exception as exc:  # ComfyUI core is there: a node that does not import is a failure
        raise RuntimeError(
            f"ComfyUI's comfy_extras/{name}.py does not import: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for mod in list(sys.modules):
            if mod.split(".")[0] in missing:
                del sys.modules[mod]
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ not in missing]
        sys.path.remove(str(standin_dir))
        shutil.rmtree(standin_dir, ignore_errors=True)


def run_io_node(node, **inputs):
    """An io-style ComfyUI node's first output, executed as ComfyUI's executor runs it."""
    cls = node.PREPARE_CLASS_CLONE(None)
    return getattr(cls, cls.FUNCTION)(**inputs).result[0]


def slg_models(patcher, *, end_percent: float, double_layers: str, single_layers: str, layers: str):
    """ComfyUI's SkipLayerGuidanceDiT (scale 3 from 1% to ``end_percent``) and diffguide's SLG node
    (scale 3 on ``layers``, the same window in sigmas) applied to ``patcher``: (theirs, ours, listing)."""
    from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS

    ms = patcher.get_model_object("model_sampling")
    top, bottom = ms.percent_to_sigma(0.01), ms.percent_to_sigma(end_percent)
    theirs = run_io_node(
        import_comfy_extra("nodes_slg").SkipLayerGuidanceDiT,
        model=patcher,
        scale=3.0,
        start_percent=0.01,
        end_percent=end_percent,
        double_layers=double_layers,
        single_layers=single_layers,
    )
    ours, listing = run_node(
        NODE_CLASS_MAPPINGS["DiffguideSLG"], patcher, scale=3.0, layers=layers, start=0.0, stop=1.0,
        window_sigma_min=bottom, window_sigma_max=top,
    )  # fmt: skip
    return theirs, ours, listing
