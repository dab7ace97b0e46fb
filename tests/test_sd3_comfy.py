"""The comfy noise policy on SD3 (flow) vs ComfyUI's own code: ModelSamplingDiscreteFlow + CONST,
calculate_sigmas, prepare_noise and the k-diffusion samplers (euler, euler_ancestral -> its RF
variant, dpmpp_2m), with the same tiny SD3 transformer as the model and CFG combined in x0 as
ComfyUI does. Final latents (model space) must agree to 1e-4."""

from __future__ import annotations

from types import SimpleNamespace

import comfy_support
import pytest
import torch
from families_support import tiny_sd3

from diffguide import CFG, GuidedPipeline
from diffguide.models.denoiser import Conditioning
from diffguide.pipeline import GenerateConfig
from diffguide.sampling.comfy import ComfyFlowSampling, comfy_sigmas

TOL = 1e-4
SEED, STEPS, W = 11, 6, 4.0


@pytest.fixture(scope="module")
def comfy():
    reason = comfy_support.comfy_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    import comfy.model_sampling as cms

    class FlowSD3(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    ms = FlowSD3()
    ms.set_parameters(shift=3.0, multiplier=1000)
    return SimpleNamespace(ms=ms, c=comfy_support.load_comfy())


@pytest.fixture(scope="module")
def gp():
    return GuidedPipeline(tiny_sd3(seed=0))


@pytest.mark.parametrize("schedule", ["normal", "simple", "karras", "sgm_uniform"])
def test_flow_sigmas_match_comfyui(comfy, schedule):
    ours = comfy_sigmas(schedule, STEPS, model_sampling=ComfyFlowSampling(3.0, 1000.0))
    theirs = comfy.c.samplers.calculate_sigmas(comfy.ms, schedule, STEPS).float()
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def _comfy_run(comfy, gp, cond, uncond, sampler, schedule):
    ms = comfy.ms
    fam, model = gp.family, gp.model
    both = Conditioning.cat([uncond, cond])

    def denoise(x, sigma, **_):
        xin, t = ms.calculate_input(sigma, x), ms.timestep(sigma)
        out = fam.forward(model, torch.cat([xin, xin]), torch.cat([t, t]), both).float()
        x0u, x0c = (ms.calculate_denoised(sigma, o, x) for o in out.chunk(2))
        return x0u + W * (x0c - x0u)  # ComfyUI's CFG, in x0 space

    latent = torch.zeros(2, 16, 16, 16)
    return comfy_support.k_sample(
        ms, denoise, latent, sampler=sampler, schedule=schedule, steps=STEPS, seed=SEED
    )


@pytest.mark.parametrize(
    ("scheduler", "sampler", "schedule"),
    [
        ("euler", "euler", "simple"),
        ("euler_a", "euler_ancestral", "normal"),
        ("dpmpp_2m", "dpmpp_2m", "karras"),
    ],
)
def test_sd3_comfy_policy_matches_comfyui(comfy, gp, scheduler, sampler, schedule):
    cfg = GenerateConfig.create(
        ["a cat", "a dog"], ["", "ugly"], guidance=[CFG(W)], steps=STEPS, seed=SEED, scheduler=scheduler,
        noise="comfy", schedule=schedule,
    )  # fmt: skip
    cond, uncond = gp.encode(cfg, 32, 32)
    ours = gp.generate(cfg, decode=False)
    assert ours.forward_calls == STEPS
    assert ours.manifests[0]["scheduler"]["class"] == "ComfyFlowSampling"
    theirs = _comfy_run(comfy, gp, cond, uncond, sampler, schedule)
    print(f"sd3 comfy {sampler}/{schedule}: max abs diff {(ours.latents - theirs).abs().max().item():.3g}")
    assert (ours.latents - theirs).abs().max().item() <= TOL
    assert (ours.latents - _comfy_run(comfy, gp, cond, uncond, "euler", "ddim_uniform")).abs().max() > 1e-2
