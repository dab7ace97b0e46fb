"""The family interface: named conditioning, family lookup, flow-matching schedules, x0 helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from diffguide import CFG, Conditioning, ConfigError, DiffguideError, GuidedPipeline
from diffguide.conditioning import save_conditioning
from diffguide.models.denoiser import prediction_to_x0
from diffguide.models.families import family_of
from diffguide.models.families.sd import SDFamily
from diffguide.sampling.steppers import FlowStepper, flow_set_timesteps


def test_conditioning_named_tensors_and_shared_values():
    a = Conditioning(
        tensors={"embeds": torch.zeros(2, 3, 4), "mask": torch.ones(2, 3)}, shared={"ids": torch.arange(3)}
    )
    b = Conditioning(
        tensors={"embeds": torch.ones(1, 3, 4), "mask": torch.zeros(1, 3)}, shared={"ids": torch.arange(3)}
    )
    both = Conditioning.cat([a, b])
    assert (
        both.batch == 3 and both["mask"].shape == (3, 3) and torch.equal(both.shared["ids"], torch.arange(3))
    )
    assert torch.equal(both.rows(2, 3).embeds, b.embeds) and both.rows(0, 2).shared is both.shared
    assert both.pooled is None and "mask" in both and both.repeat(2).batch == 6
    legacy = Conditioning(torch.zeros(1, 3, 4), torch.zeros(1, 8))
    assert list(legacy.tensors) == ["embeds", "pooled"] and legacy.time_ids is None


def test_conditioning_errors():
    with pytest.raises(ConfigError, match=r"^conditioning tensors disagree on the batch size"):
        Conditioning(torch.zeros(2, 3, 4), torch.zeros(1, 8))
    with pytest.raises(ConfigError, match=r"^conditioning needs at least one tensor"):
        Conditioning()
    with pytest.raises(ConfigError, match=r"^conditioning tensor 'embeds' given twice$"):
        Conditioning(torch.zeros(1, 3, 4), tensors={"embeds": torch.zeros(1, 3, 4)})
    one = Conditioning(tensors={"embeds": torch.zeros(1, 3, 4)}, shared={"ids": torch.arange(3)})
    other = Conditioning(tensors={"embeds": torch.zeros(1, 3, 4)}, shared={"ids": torch.arange(4)})
    with pytest.raises(ConfigError, match=r"^branches carry different shared conditioning values"):
        Conditioning.cat([one, other])
    with pytest.raises(ConfigError, match=r"^conditioning has no 'pooled' \(it has embeds\)$"):
        one["pooled"]


def test_conditioning_file_refuses_names_it_cannot_store(tmp_path):
    c = Conditioning(tensors={"embeds": torch.zeros(1, 3, 4), "guidance": torch.ones(1)})
    with pytest.raises(DiffguideError, match=r"^conditioning files cannot hold 'guidance' yet"):
        save_conditioning(tmp_path / "c.safetensors", c, None)
    assert not (tmp_path / "c.safetensors").exists()


def test_family_lookup(sd15_pipe, sdxl_pipe):
    assert family_of(sd15_pipe).architecture(sd15_pipe) == "sd15"
    assert (
        isinstance(family_of(sdxl_pipe), SDFamily) and family_of(sdxl_pipe).architecture(sdxl_pipe) == "sdxl"
    )
    with pytest.raises(
        DiffguideError,
        match=r"^object is not a supported model family \(supported: sd3, flux, auraflow, qwen-image, sd\)$",
    ):
        GuidedPipeline(object())


@pytest.mark.parametrize("seq_len", [64, 1024, 4096])
def test_dynamic_shift_matches_diffusers(seq_len):
    """Flux/Qwen-Image schedules: mu from the sequence length, sigmas linspace(1, 1/N, N), as diffusers."""
    args = (seq_len, 256, 4096, 0.5, 1.15)
    ours = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas = np.linspace(1.0, 1 / 6, 6).tolist()
    mu = flow_set_timesteps(ours, 6, "cpu", seq_len, sigmas=sigmas)
    ref.set_timesteps(sigmas=sigmas, device="cpu", mu=diffusers_calculate_shift(*args))
    assert mu == pytest.approx(diffusers_calculate_shift(*args))
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    stepper = FlowStepper(ours)
    assert stepper.sigmas == ref.sigmas[:-1].tolist() and stepper.timesteps == ref.timesteps.tolist()


def test_static_shift_is_the_schedulers_own():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert flow_set_timesteps(sched, 4, "cpu", 256) is None
    smin = 3 * 0.001 / (1 + 2 * 0.001)  # diffusers shifts the already shifted sigma_min once more
    t = np.linspace(1.0, smin, 4)
    assert FlowStepper(sched).sigmas == pytest.approx((3 * t / (1 + 2 * t)).tolist(), abs=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_prediction_to_x0_inverts_the_forward_process(prediction):
    g = torch.Generator().manual_seed(0)
    x0, noise, sigma = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), 0.7
    if prediction == "flow":
        x, pred = (1 - sigma) * x0 + sigma * noise, noise - x0
    else:
        a, s = 1 / (1 + sigma**2) ** 0.5, sigma / (1 + sigma**2) ** 0.5  # VP form of x0 + sigma * noise
        x = a * x0 + s * noise
        pred = noise if prediction == "epsilon" else a * noise - s * x0
    assert torch.allclose(prediction_to_x0(prediction, x, sigma, pred), x0, atol=1e-6)


def test_sd_last_step_x0_is_the_final_latents(sd15):
    """Euler on an epsilon UNet: the last step goes to sigma 0, i.e. to x0 of the guided prediction."""
    seen = []
    out = sd15.generate("a cat", guidance=[CFG(4.0)], steps=3, seed=1, decode=False, callback=seen.append)
    step = seen[-1].step
    assert step.prediction == "epsilon" and step.x is not None
    assert (step.to_x0(seen[-1].guided) - out.latents).abs().max().item() <= 1e-5
