"""Parity of diffguide.sampling.comfy with real ComfyUI core (vendor/ComfyUI, installed by
scripts/install_comfyui.sh). Skipped only when ComfyUI cannot be installed or imported.
"""

from __future__ import annotations

import comfy_support
import pytest
import torch
from comfy_reference import comfy_euler, comfy_ksampler, make_comfy_denoiser

from diffguide.errors import ConfigError
from diffguide.sampling.comfy import (
    COMFY_SCHEDULERS,
    SD_SCALE_FACTOR,
    ComfyModelSampling,
    comfy_noise,
    comfy_sigmas,
)

CTX_DIM = 32
LATENT = (1, 4, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def c():
    """ComfyUI core (installed on first use); every test here is skipped, with the reason, without it."""
    try:
        return comfy_support.load_comfy()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")


@pytest.fixture(scope="module")
def unet():
    return comfy_support.tiny_unet(seed=0, cross_attention_dim=CTX_DIM)


@pytest.fixture(scope="module")
def patcher(unet):
    return comfy_support.comfy_model_from_diffusers_unet(unet)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1234)
    cond = torch.randn(1, 8, CTX_DIM, generator=g)
    uncond = torch.randn(1, 8, CTX_DIM, generator=g)
    return cond, uncond


def _cfg_eps_fn(unet, cond, uncond, cfg):
    """Plain CFG in eps space, one batched forward [uncond, cond] (what our engine will do)."""

    def fn(x_in, t):
        b = x_in.shape[0]
        with torch.no_grad():
            eps = unet(
                torch.cat([x_in, x_in]),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)]),
            ).sample
        u, c_ = eps.chunk(2)
        return u + cfg * (c_ - u)

    return fn


def _max_abs(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("seed", [0, 42, 123456789, 2**63 - 5])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 9, 7), (4, 4, 16, 16), (3, 16, 5, 6)])
def test_noise_matches_prepare_noise(c, seed, shape):
    ref = c.sample.prepare_noise(torch.zeros(shape), seed)
    assert torch.equal(comfy_noise(seed, shape), ref)


@pytest.mark.parametrize("batch_index", [[0], [2], [1, 0], [3, 1, 3], [0, 1, 2, 3]])
def test_noise_batch_index_matches_prepare_noise(c, batch_index):
    shape = (len(batch_index), 4, 8, 8)
    ref = c.sample.prepare_noise(torch.zeros(shape), 7, batch_index)
    assert torch.equal(comfy_noise(7, shape, batch_index=batch_index), ref)


def test_noise_is_whole_batch_not_per_image(c):
    # The documented difference from the diffusers policy: row 1 is not seed+1's noise.
    batch = comfy_noise(5, (2, 4, 8, 8))
    assert torch.equal(batch[:1], comfy_noise(5, (1, 4, 8, 8)))
    assert not torch.equal(batch[1:], comfy_noise(6, (1, 4, 8, 8)))


def test_noise_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    comfy_noise(99, (1, 4, 8, 8))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------- schedules


def test_model_sampling_tables(patcher):
    ref = patcher.get_model_object("model_sampling")
    ours = ComfyModelSampling()
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.log_sigmas, ref.log_sigmas)
    g = torch.Generator().manual_seed(0)
    sigmas = torch.exp(torch.rand(200, generator=g) * 6 - 4)  # 0.018 .. 7.4, plus the table itself
    sigmas = torch.cat([sigmas, ref.sigmas])
    assert torch.equal(ours.sigma_to_timestep(sigmas), ref.timestep(sigmas))
    ts = torch.cat(
        [torch.rand(200, generator=g) * 999, torch.arange(1000).float(), torch.tensor([-3.0, 1200.0])]
    )
    assert torch.equal(ours.timestep_to_sigma(ts), ref.sigma(ts))


@pytest.mark.parametrize("scheduler", COMFY_SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 8, 20, 33])
def test_schedule_matches_calculate_sigmas(c, patcher, scheduler, steps):
    if scheduler == "kl_optimal" and steps == 1:
        with pytest.raises(ConfigError):
            comfy_sigmas(scheduler, steps)
        return
    ref = c.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)
    ours = comfy_sigmas(scheduler, steps)
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    assert _max_abs(ours, ref.float()) <= 1e-6
    assert torch.equal(ours, ref.float())  # in fact bit-identical


@pytest.mark.parametrize(
    ("scheduler", "denoise"), [("normal", 0.5), ("karras", 0.75), ("simple", 0.3), ("normal", 0.0)]
)
def test_schedule_denoise_matches_ksampler(patcher, scheduler, denoise):
    ref = comfy_support.comfy_calculate_sigmas(patcher, scheduler, 10, denoise=denoise)
    ours = comfy_sigmas(scheduler, 10, denoise=denoise)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref.float())


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown ComfyUI scheduler 'beta'"):
        comfy_sigmas("beta", 8)


# ------------------------------------------------------------------------------------ full sampling


def test_ksampler_parity_euler_normal_cfg5(patcher, unet, prompts):
    """ComfyUI KSampler (euler, normal, cfg 5, 8 steps, seed 42, denoise 1) vs comfy_euler + comfy_noise."""
    cond, uncond = prompts
    ref = comfy_support.comfy_ksampler(
        patcher, seed=42, steps=8, cfg=5.0, positive=cond, negative=uncond, latent=torch.zeros(LATENT)
    )
    ms = ComfyModelSampling()
    sigmas = comfy_sigmas("normal", 8)
    noise = comfy_noise(42, LATENT)
    assert ms.is_max_denoise(sigmas)  # so x = noise * sqrt(1 + sigma_max^2), not noise * sigma_max
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros(LATENT), max_denoise=True)
    ours = comfy_euler(make_comfy_denoiser(_cfg_eps_fn(unet, cond, uncond, 5.0)), x, sigmas)
    # ComfyUI's LATENT is the model-space latent / 0.18215; compare in model space.
    err = _max_abs(ours, ref * SD_SCALE_FACTOR)
    assert err <= 1e-4, f"max abs diff {err:.3g} (model space)"
    # The same through the one-call helper, in LATENT convention.
    latent_out = comfy_ksampler(_cfg_eps_fn(unet, cond, uncond, 5.0), 42, torch.zeros(LATENT), 8, "normal")
    assert torch.equal(latent_out, ours / SD_SCALE_FACTOR)


def test_ksampler_bit_exact_when_cfg_combined_in_x0(patcher, unet, prompts):
    """The only difference above is float rounding of CFG in eps vs x0 space: combining in x0 like
    ComfyUI makes the whole run (noise, sigmas, timesteps, scaling, Euler) match exactly."""
    cond, uncond = prompts
    ref = comfy_support.comfy_ksampler(
        patcher, seed=42, steps=8, cfg=5.0, positive=cond, negative=uncond, latent=torch.zeros(LATENT)
    )
    ms = ComfyModelSampling()

    def x0_cfg(x, sigma):
        x_in = ms.calculate_input(sigma, x)
        t = ms.sigma_to_timestep(sigma).float()
        with torch.no_grad():
            eps = unet(
                torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])
            ).sample
        x0_u, x0_c = ms.calculate_denoised(torch.cat([sigma, sigma]), eps.float(), torch.cat([x, x])).chunk(2)
        return x0_u + (x0_c - x0_u) * 5.0

    sigmas = comfy_sigmas("normal", 8)
    x = ms.noise_scaling(sigmas[0], comfy_noise(42, LATENT), torch.zeros(LATENT), ms.is_max_denoise(sigmas))
    ours = comfy_euler(x0_cfg, x, sigmas) / SD_SCALE_FACTOR
    assert _max_abs(ours, ref) <= 1e-6


def test_ksampler_parity_cfg1_karras(patcher, unet, prompts):
    """cfg 1: ComfyUI skips the uncond pass; so do we. Karras schedule."""
    cond, _ = prompts
    ref = comfy_support.comfy_ksampler(
        patcher,
        seed=3,
        steps=6,
        cfg=1.0,
        positive=cond,
        negative=torch.zeros_like(cond),
        latent=torch.zeros(LATENT),
        scheduler="karras",
    )

    def cond_only(x_in, t):
        with torch.no_grad():
            return unet(x_in, t, encoder_hidden_states=cond.expand(x_in.shape[0], -1, -1)).sample

    ours = comfy_ksampler(cond_only, 3, torch.zeros(LATENT), 6, "karras")
    assert _max_abs(ours, ref) <= 1e-6


def test_ksampler_parity_img2img_batch_index(patcher, unet, prompts):
    """denoise < 1 on a non-empty latent (noise * sigma path, latent scaling in/out), batch of 2 with a
    batch_index, sgm_uniform schedule."""
    cond, uncond = prompts
    latent = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(9)) * 3
    ref = comfy_support.comfy_ksampler(
        patcher,
        seed=11,
        steps=5,
        cfg=3.0,
        positive=cond,
        negative=uncond,
        latent=latent,
        scheduler="sgm_uniform",
        denoise=0.6,
        batch_index=[2, 0],
    )
    ours = comfy_ksampler(
        _cfg_eps_fn(unet, cond, uncond, 3.0), 11, latent, 5, "sgm_uniform", denoise=0.6, batch_index=[2, 0]
    )
    err = _max_abs(ours * SD_SCALE_FACTOR, ref * SD_SCALE_FACTOR)
    assert err <= 1e-4, f"max abs diff {err:.3g} (model space)"
