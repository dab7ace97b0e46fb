"""diffguide's ``comfy`` noise policy through the whole pipeline vs ComfyUI's own KSampler."""

from __future__ import annotations

import comfy_support
import pytest
import torch

from diffguide import CFG
from diffguide.pipeline import GenerateConfig
from diffguide.sampling.comfy import SD_SCALE_FACTOR


@pytest.fixture(scope="module")
def setup():
    return comfy_support.guided_pipeline_and_patcher()


@pytest.mark.parametrize("schedule", ["normal", "karras"])
def test_comfy_policy_matches_ksampler(setup, schedule):
    gp, patcher = setup
    cfg = GenerateConfig.create(
        ["a cat", "a dog"],
        ["", "ugly"],
        guidance=[CFG(5.0)],
        steps=8,
        seed=42,
        noise="comfy",
        schedule=schedule,
    )
    cond, uncond = gp.encode(cfg, 32, 32)
    assert uncond is not None
    ours = gp.generate(cfg, decode=False)
    theirs = comfy_support.comfy_ksampler(
        patcher,
        seed=42,
        steps=8,
        cfg=5.0,
        positive=cond.embeds,
        negative=uncond.embeds,
        latent=torch.zeros(2, 4, 16, 16),
        scheduler=schedule,
    )
    # ComfyUI's LATENT is the model-space latent divided by the latent format's scale factor.
    assert (ours.latents - theirs * SD_SCALE_FACTOR).abs().max().item() <= 1e-4
    assert ours.manifests[0]["noise"]["policy"] == "comfy"
    assert len(ours.manifests[0]["scheduler"]["sigmas"]) == 9


def test_comfy_policy_rejects_other_samplers():
    from diffguide import ConfigError

    with pytest.raises(ConfigError, match="euler"):
        GenerateConfig.create("x", noise="comfy", scheduler="ddim")
    with pytest.raises(ConfigError, match="comfy noise policy only"):
        GenerateConfig.create("x", schedule="karras")
