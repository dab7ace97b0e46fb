"""The ``comfy`` noise policy's euler, euler_ancestral and dpmpp_2m samplers, through the whole
pipeline, vs ComfyUI's own KSampler.

``pytest -s tests/test_comfy_samplers.py tests/test_comfy_pag_parity.py`` prints the measured
differences quoted in docs/noise-policies.md and docs/methods.md."""

from __future__ import annotations

import comfy_support
import pytest
import torch
from comfy_reference import comfy_sample

from diffguide import CFG, ConfigError
from diffguide.pipeline import GenerateConfig
from diffguide.sampling.comfy import (
    SD_SCALE_FACTOR,
    ComfyModelSampling,
    comfy_noise,
    comfy_noise_sampler,
    comfy_sigmas,
    get_ancestral_step,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    return comfy_support.guided_pipeline_and_patcher()


def _run_both(setup, scheduler, comfy_sampler, schedule, seed=42):
    gp, patcher = setup
    cfg = GenerateConfig.create(
        ["a cat", "a dog"],
        ["", "ugly"],
        guidance=[CFG(5.0)],
        steps=8,
        seed=seed,
        scheduler=scheduler,
        noise="comfy",
        schedule=schedule,
    )
    cond, uncond = gp.encode(cfg, 32, 32)
    assert uncond is not None
    ours = gp.generate(cfg, decode=False)
    theirs = comfy_support.comfy_ksampler(
        patcher,
        seed=seed,
        steps=8,
        cfg=5.0,
        positive=cond.embeds,
        negative=uncond.embeds,
        latent=torch.zeros(2, 4, 16, 16),
        sampler_name=comfy_sampler,
        scheduler=schedule,
    )
    # ComfyUI's LATENT is the model-space latent divided by the latent format's scale factor.
    return ours, theirs * SD_SCALE_FACTOR


@pytest.mark.parametrize(
    ("scheduler", "comfy_sampler", "schedule"),
    [
        ("euler", "euler", "normal"),
        ("euler", "euler", "karras"),
        ("euler_a", "euler_ancestral", "normal"),
        ("dpmpp_2m", "dpmpp_2m", "normal"),
        ("dpmpp_2m", "dpmpp_2m", "karras"),
        ("heun", "heun", "karras"),
    ],
)
def test_sampler_matches_ksampler(setup, scheduler, comfy_sampler, schedule):
    ours, theirs = _run_both(setup, scheduler, comfy_sampler, schedule)
    diff = (ours.latents - theirs).abs().max().item()
    print(
        f"{comfy_sampler}/{schedule}: max |ours - ComfyUI| = {diff:.3g} (values up to {theirs.abs().max():.3g})"
    )
    assert diff <= TOL
    sched = ours.manifests[0]["scheduler"]
    assert sched["name"] == f"comfy {comfy_sampler}/{schedule}"
    assert sched["sampler"]["name"] == comfy_sampler
    # the schedule itself: ComfyUI's KSampler sigmas, bit for bit
    expected = comfy_support.comfy_calculate_sigmas(setup[1], schedule, 8)
    assert torch.equal(torch.tensor(sched["sigmas"], dtype=expected.dtype), expected)
    noise = ours.manifests[0]["noise"]
    assert noise["policy"] == "comfy"
    assert ("per_step" in noise) == (comfy_sampler == "euler_ancestral")


@pytest.mark.parametrize(
    ("sampler", "schedule"), [("euler_ancestral", "normal"), ("dpmpp_2m", "normal"), ("dpmpp_2m", "karras")]
)
def test_sampler_exact_when_cfg_combined_in_x0(setup, sampler, schedule):
    """The pipeline's remaining difference is float rounding of CFG in eps vs x0 space: with CFG
    combined in x0 space, the sampler updates (and the ancestral noise) are ComfyUI's bit for bit,
    batch of 2."""
    gp, patcher = setup
    g = torch.Generator().manual_seed(1234)
    cond, uncond = torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    latent = torch.zeros(2, 4, 16, 16)
    ref = comfy_support.comfy_ksampler(
        patcher,
        seed=7,
        steps=8,
        cfg=5.0,
        positive=cond,
        negative=uncond,
        latent=latent,
        sampler_name=sampler,
        scheduler=schedule,
    )
    ms = ComfyModelSampling()

    def x0_cfg(x, sigma):
        x_in = ms.calculate_input(sigma, x)
        t = ms.sigma_to_timestep(sigma).float()
        with torch.no_grad():
            eps = gp.unet(
                torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])
            ).sample
        x0_c, x0_u = ms.calculate_denoised(torch.cat([sigma, sigma]), eps.float(), torch.cat([x, x])).chunk(2)
        return x0_u + (x0_c - x0_u) * 5.0

    sigmas = comfy_sigmas(schedule, 8)
    x = ms.noise_scaling(sigmas[0], comfy_noise(7, latent.shape), latent, ms.is_max_denoise(sigmas))
    ours = comfy_sample(x0_cfg, x, sigmas, sampler, seed=7) / SD_SCALE_FACTOR
    diff = (ours - ref).abs().max().item()
    print(f"{sampler}/{schedule}, x0-space CFG: max diff {diff:.3g}")
    assert torch.equal(ours, ref)  # bit-identical, as docs/noise-policies.md says


def test_ancestral_uses_per_step_noise(setup):
    """euler_ancestral is not euler, and its per-step noise comes from the seed (seed + 1 on the CPU)."""
    gp, _ = setup
    common = dict(guidance=[CFG(5.0)], steps=8, seed=42, noise="comfy")
    euler = gp.generate(GenerateConfig.create("a cat", scheduler="euler", **common), decode=False)
    ancestral = gp.generate(GenerateConfig.create("a cat", scheduler="euler_a", **common), decode=False)
    assert (euler.latents - ancestral.latents).abs().max().item() > 0.1

    # Same initial x, per-step noise from another seed: a different result.
    def denoise(x, sigma):
        return 0.5 * x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    sigmas = comfy_sigmas("normal", 6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    a = comfy_sample(denoise, x, sigmas, "euler_ancestral", seed=42)
    b = comfy_sample(denoise, x, sigmas, "euler_ancestral", seed=43)
    assert (a - b).abs().max().item() > 1e-3
    # The noise: one CPU generator seeded seed + 1, the whole batch per draw.
    draw = comfy_noise_sampler(x, 42)
    g = torch.Generator().manual_seed(43)
    for _ in range(2):
        assert torch.equal(draw(), torch.randn(x.shape, generator=g))


def test_ancestral_step_matches_k_diffusion(setup):
    c = comfy_support.load_comfy()
    sigmas = comfy_sigmas("karras", 5)
    for i in range(len(sigmas) - 1):
        ours = get_ancestral_step(sigmas[i], sigmas[i + 1])
        theirs = c.samplers.k_diffusion_sampling.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=1.0)
        assert torch.equal(ours[0], torch.as_tensor(theirs[0]))
        assert torch.equal(ours[1], torch.as_tensor(theirs[1]))
    down, up = get_ancestral_step(sigmas[-2], sigmas[-1])
    assert float(down) == 0.0 and float(up) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": "dpmpp_2m_karras"}, "--scheduler dpmpp_2m --schedule karras"),
        ({"scheduler": "ddim"}, "euler, euler_a, dpmpp_2m"),
        ({"scheduler": "unipc"}, "heun"),
        ({"scheduler": "unipc"}, "not 'unipc'"),
        ({"scheduler": "euler_a", "eta": 0.5}, "--eta"),
    ],
)
def test_unsupported_comfy_combinations(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerateConfig.create("x", noise="comfy", **kwargs)


def test_comfy_schedule_needs_the_comfy_policy():
    with pytest.raises(ConfigError, match="comfy noise policy only"):
        GenerateConfig.create("x", schedule="karras")


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "heun"])
def test_supported_comfy_samplers_validate(scheduler):
    cfg = GenerateConfig.create("x", noise="comfy", scheduler=scheduler, schedule="karras")
    assert (cfg.noise, cfg.scheduler, cfg.schedule, cfg.eta) == ("comfy", scheduler, "karras", 0.0)
