"""The node pack under ComfyUI's three sampler nodes: KSampler, KSamplerAdvanced (full range, noise
added) and SamplerCustomAdvanced (RandomNoise + CFGGuider + KSamplerSelect + BasicScheduler) give
the same LATENT for equal settings with a diffguide Guidance stack (PAG + TPG) applied, on a tiny
SDXL (UNet hooks) and a tiny Flux (DiT block replacements), batch 2, two sampler/scheduler pairs.
The stack acts (the result differs from the unpatched model's) and runs in one model call per step
under each sampler node.

Skipped only when ComfyUI cannot be imported (failed instead when DIFFGUIDE_REQUIRE_COMFY=1).
"""

from __future__ import annotations

import comfy_support
import comfy_workflow_support as cws
import pytest
import torch
from comfy_dit_nodes_support import flux_conds, tiny_flux_comfy
from comfy_nodes_support import counting, import_comfy_extra, run_io_node, run_node, sdxl_cond, sdxl_twin

from diffguide import CFG, GuidedPipeline
from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS
from diffguide.pipeline import GenerateConfig
from diffguide.testing import tiny_sdxl

TOL = 1e-4
STEPS, SEED, CFG_SCALE = 5, 7, 3.0
SETTINGS = [("euler", "normal"), ("dpmpp_2m", "karras")]


@pytest.fixture(scope="module")
def comfy():
    try:
        cn = cws.load_comfy_nodes()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    comfy_support.load_comfy().utils.PROGRESS_BAR_ENABLED = False
    return cn.nodes, import_comfy_extra("nodes_custom_sampler")


def _sdxl():
    gp = GuidedPipeline(tiny_sdxl())
    cfg = GenerateConfig.create(["a cat", "a dog"], ["", "ugly"], guidance=[CFG(3.0)], steps=1, noise="comfy")
    cond, uncond = gp.encode(cfg, 32, 32)
    pos = sdxl_cond(cond.embeds, cond.tensors["pooled"], 32)
    neg = sdxl_cond(uncond.embeds, uncond.tensors["pooled"], 32)
    return sdxl_twin(gp.unet), pos, neg, torch.zeros(2, 4, 4, 4), "pag:scale=2\ntpg:scale=1"


def _flux():
    pos, neg = flux_conds()
    return (
        tiny_flux_comfy(),
        pos,
        neg,
        torch.zeros(2, 16, 8, 8),
        "pag:scale=2,layers=b1\ntpg:scale=1,layers=b0,s1",
    )


MODELS = {"SDXL": _sdxl, "Flux": _flux}


def three_samplers(comfy, model, pos, neg, latent, sampler, scheduler):
    nodes, custom = comfy
    lat = {"samples": latent}
    common = dict(
        steps=STEPS, cfg=CFG_SCALE, sampler_name=sampler, scheduler=scheduler, positive=pos, negative=neg
    )
    with torch.inference_mode():
        ks = nodes.KSampler().sample(model, seed=SEED, latent_image=lat, denoise=1.0, **common)[0]["samples"]
        ksa = nodes.KSamplerAdvanced().sample(
            model, add_noise="enable", noise_seed=SEED, latent_image=lat, start_at_step=0, end_at_step=10000,
            return_with_leftover_noise="disable", **common,
        )[0]["samples"]  # fmt: skip
        noise = run_io_node(custom.RandomNoise, noise_seed=SEED)
        guider = run_io_node(custom.CFGGuider, model=model, positive=pos, negative=neg, cfg=CFG_SCALE)
        chosen = run_io_node(custom.KSamplerSelect, sampler_name=sampler)
        sigmas = run_io_node(
            custom.BasicScheduler, model=model, scheduler=scheduler, steps=STEPS, denoise=1.0
        )
        sca = run_io_node(
            custom.SamplerCustomAdvanced,
            noise=noise,
            guider=guider,
            sampler=chosen,
            sigmas=sigmas,
            latent_image=lat,
        )["samples"]
    return ks, ksa, sca


@pytest.mark.parametrize("sampler,scheduler", SETTINGS)
@pytest.mark.parametrize("family", list(MODELS))
def test_sampler_nodes_agree_with_a_diffguide_node(comfy, family, sampler, scheduler):
    patcher, pos, neg, latent, guides = MODELS[family]()
    model, _ = run_node(NODE_CLASS_MAPPINGS["DiffguideGuidanceStack"], patcher, guides=guides)
    with counting(patcher) as calls:
        ks, ksa, sca = three_samplers(comfy, model, pos, neg, latent, sampler, scheduler)
    d_adv, d_custom = (ks - ksa).abs().max().item(), (ks - sca).abs().max().item()
    print(f"{family} {sampler}/{scheduler}: KSamplerAdvanced {d_adv:.3g}, SamplerCustomAdvanced {d_custom:.3g} "
          f"vs KSampler; calls {len(calls)} of {sorted(set(calls))} rows")  # fmt: skip
    assert d_adv <= TOL and d_custom <= TOL
    assert calls == [8] * (3 * STEPS)  # cond, uncond, pag, tpg: one call per step, each sampler node
    plain = three_samplers(comfy, patcher, pos, neg, latent, sampler, scheduler)[0]
    assert (plain - ks).abs().max() > 1e-2
