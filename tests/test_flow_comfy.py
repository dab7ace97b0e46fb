"""The comfy noise policy on AuraFlow and Flux vs ComfyUI's own sampling code.

ComfyUI's side: the model sampling its model classes build (``comfy.model_base.model_sampling``
with ``supported_models.AuraFlow`` / ``Flux`` / ``FluxSchnell``), with the shift ComfyUI's
``ModelSamplingFlux`` node sets for the image size on dev-like Flux (the node's formula, written
out here: its module needs torchvision); ``calculate_sigmas``, ``prepare_noise`` and the
k-diffusion samplers (euler, euler_ancestral -> its RF variant, dpmpp_2m). The model is the
same tiny transformer through diffguide's family forward on both sides, CFG combined in x0 as
ComfyUI does, latents unpacked on ComfyUI's side (its Flux packs inside the model): only the
sampling code is compared. Final latents must agree to 1e-4.
"""

from __future__ import annotations

from types import SimpleNamespace

import comfy_support
import pytest
import torch
from dit_support import _liven as liven

from diffguide import CFG, ConfigError, EmbeddedGuidance, GuidedPipeline
from diffguide.conditioning import ConditioningFile
from diffguide.models.denoiser import Conditioning
from diffguide.pipeline import GenerateConfig
from diffguide.sampling.comfy import ComfyFlowSampling, ComfyFluxSampling, comfy_sigmas
from diffguide.testing_dit import qwen_embeds, tiny_auraflow, tiny_flux, tiny_qwen_image

TOL = 1e-4
SEED, STEPS, W, SIZE = 11, 6, 4.0, 32
CASES = [
    ("euler", "euler", "simple"),
    ("euler_a", "euler_ancestral", "normal"),
    ("dpmpp_2m", "dpmpp_2m", "karras"),
    # heun's second evaluation divides by its sigma: at the normal schedule's last sigma (2.5e-4 on
    # Flux) that magnifies the rounding of CFG in flow vs x0 space ~4000x (see the CFG-1 test)
    ("heun", "heun", "simple"),
]


@pytest.fixture(scope="module")
def comfy():
    reason = comfy_support.comfy_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    import comfy.k_diffusion.sampling as kd
    import comfy.model_base as mb
    import comfy.supported_models as sm

    return SimpleNamespace(kd=kd, mb=mb, sm=sm, c=comfy_support.load_comfy())


def comfy_model_sampling(comfy, model: str, width: int = SIZE, height: int = SIZE):
    """What ComfyUI samples AuraFlow / Flux / Flux schnell with (Flux dev: after its
    ModelSamplingFlux node with the default max_shift 1.15, base_shift 0.5 for width x height)."""
    mt = comfy.mb.ModelType
    kind = {"AuraFlow": mt.FLOW, "Flux": mt.FLUX, "FluxSchnell": mt.FLOW, "QwenImage": mt.FLUX}[model]
    ms = comfy.mb.model_sampling(getattr(comfy.sm, model)({}), kind)
    if model == "Flux":  # nodes_model_advanced.ModelSamplingFlux.patch
        x1, x2, max_shift, base_shift = 256, 4096, 1.15, 0.5
        mm = (max_shift - base_shift) / (x2 - x1)
        ms.set_parameters(shift=(width * height / (8 * 8 * 2 * 2)) * mm + (base_shift - mm * x1))
    return ms


@pytest.fixture(scope="module")
def aura():
    pipe = tiny_auraflow(seed=0)
    liven(pipe.transformer, 3)
    pipe.set_progress_bar_config(disable=True)
    return GuidedPipeline(pipe)


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux(seed=0)
    liven(pipe.transformer, 3)  # at diffusers' init the tiny model's prediction barely depends on the step
    return GuidedPipeline(pipe)


@pytest.fixture(scope="module")
def qwen():
    pipe = tiny_qwen_image(seed=0)
    liven(pipe.transformer, 3)
    return GuidedPipeline(pipe)


def qwen_conditioning() -> ConditioningFile:
    (pe, pm), (ne, nm) = qwen_embeds(1, 2), qwen_embeds(2, 2)
    return ConditioningFile(
        Conditioning(tensors={"embeds": pe, "mask": pm}), Conditioning(tensors={"embeds": ne, "mask": nm})
    )


def comfy_run(comfy, gp, cfg, ms, sampler, schedule, conditioning=None):
    """ComfyUI's KSampler path from prepare_noise to the final (unpacked) latent (comfy_support.k_sample)."""
    fam, model = gp.family, gp.model
    if conditioning is None:
        cond, uncond = gp.encode(cfg, SIZE, SIZE)
    else:
        cond, uncond = conditioning.cond, conditioning.uncond
    cond, uncond = fam.model_inputs(gp.pipe, cfg.guidance, cond, uncond, SIZE, SIZE)
    both = Conditioning.cat([uncond, cond])

    def denoise(x, sigma, **_):
        # ComfyUI's model gets ms.timestep(sigma) (sigma * multiplier); diffguide's forward takes
        # the 0..1000 scale, so the multiplier-1 samplings' timestep is scaled by 1000 here.
        t = ms.timestep(sigma) * (1000.0 / getattr(ms, "multiplier", 1.0))
        xin = fam.pack(ms.calculate_input(sigma, x))
        out = fam.forward(model, torch.cat([xin, xin]), torch.cat([t, t]), both).float()
        x0u, x0c = (
            ms.calculate_denoised(sigma, fam.unpack(o, SIZE, SIZE).reshape(x.shape), x) for o in out.chunk(2)
        )
        return x0u + W * (x0c - x0u)  # ComfyUI's CFG, in x0 space

    latent = torch.zeros(fam.latent_shape(gp.pipe, 2, SIZE, SIZE))
    return comfy_support.k_sample(
        ms, denoise, latent, sampler=sampler, schedule=schedule, steps=STEPS, seed=SEED
    )


def run_both(comfy, gp, model, guidance, scheduler, sampler, schedule, conditioning=None):
    cfg = GenerateConfig.create(
        ["a cat", "a dog"], ["", "ugly"], guidance=guidance, steps=STEPS, seed=SEED, scheduler=scheduler,
        noise="comfy", schedule=schedule, width=SIZE, height=SIZE,
    )  # fmt: skip
    ours = gp.generate(cfg, decode=False, conditioning=conditioning)
    # heun evaluates twice per step, except for the last step (an Euler step to sigma 0)
    assert ours.forward_calls == (2 * STEPS - 1 if sampler == "heun" else STEPS)
    ms = comfy_model_sampling(comfy, model)
    # Qwen-Image: ComfyUI's (B, 16, 1, h, w) latent is diffguide's sampling layout (B, 1, 16, h, w)
    theirs = comfy_run(comfy, gp, cfg, ms, sampler, schedule, conditioning).reshape(ours.latents.shape)
    assert theirs.shape == ours.latents.shape
    diff = (ours.latents - theirs).abs().max().item()
    print(f"{model} comfy {sampler}/{schedule}: max abs diff {diff:.3g}")
    assert diff <= TOL
    other = comfy_run(comfy, gp, cfg, ms, "euler", "ddim_uniform", conditioning).reshape(ours.latents.shape)
    assert (ours.latents - other).abs().max() > 1e-2  # the comparison can tell schedules apart
    return ours


@pytest.mark.parametrize(("scheduler", "sampler", "schedule"), CASES)
def test_auraflow_comfy_policy_matches_comfyui(comfy, aura, scheduler, sampler, schedule):
    ours = run_both(comfy, aura, "AuraFlow", [CFG(W)], scheduler, sampler, schedule)
    sched = ours.manifests[0]["scheduler"]
    assert sched["class"] == "ComfyFlowSampling"
    assert sched["config"] == {"prediction_type": "flow", "shift": 1.73, "multiplier": 1.0}
    assert sched["timesteps"][0] == pytest.approx(1000 * sched["sigmas"][0])


@pytest.mark.parametrize(("scheduler", "sampler", "schedule"), CASES)
def test_flux_comfy_policy_matches_comfyui(comfy, flux, scheduler, sampler, schedule):
    """Dev-like Flux: true CFG 4 with embedded guidance 2 (a model input on every row)."""
    ours = run_both(comfy, flux, "Flux", [CFG(W), EmbeddedGuidance(2.0)], scheduler, sampler, schedule)
    sched = ours.manifests[0]["scheduler"]
    assert sched["class"] == "ComfyFluxSampling"
    assert sched["config"]["flux_time_shift_mu"] == pytest.approx(0.5 - 0.65 * 252 / 3840)


@pytest.mark.parametrize(("scheduler", "sampler", "schedule"), CASES)
def test_qwen_image_comfy_policy_matches_comfyui(comfy, qwen, scheduler, sampler, schedule):
    """Qwen-Image, plain CFG 4 (KSampler's cfg), embeddings from a conditioning file."""
    ours = run_both(comfy, qwen, "QwenImage", [CFG(W)], scheduler, sampler, schedule, qwen_conditioning())
    sched = ours.manifests[0]["scheduler"]
    assert sched["class"] == "ComfyFluxSampling"
    assert sched["config"]["flux_time_shift_mu"] == pytest.approx(1.15)


@pytest.mark.parametrize(
    ("ours", "model", "size"),
    [
        (ComfyFlowSampling(1.73, 1.0), "AuraFlow", SIZE),
        (ComfyFluxSampling(0.5 + 0.65 * (4096 - 256) / 3840), "Flux", 1024),
        (ComfyFluxSampling(0.5 + 0.65 * (1536 * 640 / 256 - 256) / 3840), "Flux", (1536, 640)),
        (ComfyFlowSampling(1.0, 1.0), "FluxSchnell", SIZE),
        (ComfyFluxSampling(1.15), "QwenImage", SIZE),
    ],
)
@pytest.mark.parametrize("schedule", ["normal", "simple", "karras", "sgm_uniform"])
def test_flow_sigmas_match_comfyui(comfy, ours, model, size, schedule):
    w, h = size if isinstance(size, tuple) else (size, size)
    theirs_ms = comfy_model_sampling(comfy, model, w, h)
    assert ours.shift == pytest.approx(theirs_ms.shift, abs=1e-12)
    assert torch.allclose(ours.sigmas, theirs_ms.sigmas, atol=1e-6, rtol=0)
    theirs = comfy.c.samplers.calculate_sigmas(theirs_ms, schedule, STEPS).float()
    assert torch.allclose(comfy_sigmas(schedule, STEPS, model_sampling=ours), theirs, atol=1e-6, rtol=0)


def test_flux_comfy_shift_follows_the_image_size(flux):
    fam = flux.family
    assert fam.comfy_model_sampling(flux.pipe, 1024, 1024).shift == pytest.approx(1.15)
    assert fam.comfy_model_sampling(flux.pipe, 256, 256).shift == pytest.approx(0.5)


@pytest.mark.parametrize("fixture", ["aura", "flux"])
def test_heun_matches_comfyui_exactly_without_cfg(comfy, request, fixture):
    """No CFG combination (w = 1): the heun updates alone, on the normal schedule down to its tiny
    last sigma, agree with ComfyUI's sample_heun to float rounding."""
    gp = request.getfixturevalue(fixture)
    model = {"aura": "AuraFlow", "flux": "Flux"}[fixture]
    terms = [EmbeddedGuidance(2.0)] if fixture == "flux" else []
    cfg = GenerateConfig.create(
        ["a cat", "a dog"], guidance=terms, steps=STEPS, seed=SEED, scheduler="heun", noise="comfy",
        schedule="normal", width=SIZE, height=SIZE,
    )  # fmt: skip
    ours = gp.generate(cfg, decode=False)
    assert ours.forward_calls == 2 * STEPS - 1
    ms = comfy_model_sampling(comfy, model)
    kd, fam = comfy.kd, gp.family
    cond, _ = gp.encode(cfg, SIZE, SIZE)
    cond, _ = fam.model_inputs(gp.pipe, cfg.guidance, cond, None, SIZE, SIZE)

    def denoise(x, sigma, **_):
        t = ms.timestep(sigma) * (1000.0 / getattr(ms, "multiplier", 1.0))
        out = fam.forward(gp.model, fam.pack(ms.calculate_input(sigma, x)), t, cond).float()
        return ms.calculate_denoised(sigma, fam.unpack(out, SIZE, SIZE).reshape(x.shape), x)

    sigmas = comfy.c.samplers.calculate_sigmas(ms, "normal", STEPS)
    latent = torch.zeros(fam.latent_shape(gp.pipe, 2, SIZE, SIZE))
    x = ms.noise_scaling(sigmas[0], comfy.c.sample.prepare_noise(latent, SEED), latent, True)
    with torch.inference_mode():
        theirs = kd.sample_heun(denoise, x, sigmas, disable=True).reshape(ours.latents.shape)
    diff = (ours.latents - theirs).abs().max().item()
    print(f"{model} comfy heun/normal without CFG: max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_comfy_policy_refuses_other_samplers_in_one_line(aura):
    with pytest.raises(ConfigError, match=r"^the comfy noise policy supports the samplers .*not 'unipc'$"):
        GenerateConfig.create(["a cat"], guidance=[CFG(W)], steps=2, scheduler="unipc", noise="comfy")
