"""Sampler knobs (sampling/knobs.py): dynamic thresholding, churn and ancestral options, on known
values, against diffusers' DDPMScheduler and against ComfyUI's k-diffusion samplers (KSampler's)."""

from __future__ import annotations

import math

import comfy_support
import pytest
import torch
from diffusers import DDPMScheduler

from diffguide.errors import ConfigError
from diffguide.sampling.knobs import (
    DynamicThreshold,
    Knobs,
    ancestral_step,
    churn_gamma,
    dynamic_threshold,
    sample_euler,
    thresholded_x0,
)


def test_dynamic_threshold_known_values():
    x0 = torch.tensor([[0.5, -2.0, 3.0, 0.1]])
    # |x0| sorted 0.1, 0.5, 2, 3: the 0.5 quantile is 1.25 (linear), within [1, 2]
    got = dynamic_threshold(x0, DynamicThreshold(0.5, 2.0))
    assert torch.allclose(got, torch.tensor([[0.4, -1.0, 1.0, 0.08]]))
    # max value 1: s = 1, a plain clip to [-1, 1]
    assert torch.equal(
        dynamic_threshold(x0, DynamicThreshold(0.5, 1.0)), torch.tensor([[0.5, -1.0, 1.0, 0.1]])
    )
    # s never below 1: an image inside [-1, 1] is unchanged
    assert torch.equal(dynamic_threshold(x0 / 4, DynamicThreshold(0.9, 5.0)), x0 / 4)


@pytest.mark.parametrize(("p", "m"), [(0.995, 1.0), (0.9, 1.5), (0.5, 3.0)])
def test_dynamic_threshold_equals_diffusers(p, m):
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=m)
    assert torch.equal(dynamic_threshold(x0, DynamicThreshold(p, m)), sched._threshold_sample(x0))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_thresholded_x0_equals_ddpm_step(prediction):
    """DDPMScheduler with thresholding: its pred_original_sample is our thresholded x0."""
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction,
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
    )  # fmt: skip
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = int(sched.timesteps[3])
    abar = float(sched.alphas_cumprod[t])
    sigma = math.sqrt((1 - abar) / abar)
    ref = sched.step(pred, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
    got = thresholded_x0(prediction, x, sigma, pred, DynamicThreshold(0.9, 1.5))
    diff = (got - ref).abs().max().item()
    print(f"{prediction}: thresholded x0 vs DDPMScheduler {diff:.3g}")
    assert diff <= 1e-5
    assert (
        ref.abs().amax(dim=(1, 2, 3)) <= 1.0 + 1e-6
    ).all()  # thresholding did act (x0 scaled into [-1, 1])


def test_thresholding_refuses_flow():
    with pytest.raises(
        ConfigError, match=r"^dynamic thresholding is for epsilon and v-prediction models, not 'flow'$"
    ):
        thresholded_x0("flow", torch.zeros(1, 4), 0.5, torch.zeros(1, 4), DynamicThreshold())


def test_ancestral_step_and_churn_known_values():
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert math.isclose(up, math.sqrt(0.75)) and math.isclose(down, 0.5)
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    down, up = ancestral_step(2.0, 1.0, 0.5)
    assert math.isclose(up, 0.5 * math.sqrt(0.75)) and math.isclose(down, math.sqrt(1 - 0.1875))
    assert ancestral_step(1.0, 0.0, 1.0) == (0.0, 0.0)
    assert math.isclose(churn_gamma(3.0, 10, 1.0), 0.1)
    assert math.isclose(churn_gamma(3.0, 10, 10.0), math.sqrt(2) - 1)  # capped
    assert churn_gamma(3.0, 10, 1.0, s_tmin=4.0) == 0.0 and churn_gamma(3.0, 10, 1.0, s_tmax=2.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": -1.0}, "^eta must be a finite number >= 0, got -1.0$"),
        ({"s_tmin": 2.0, "s_tmax": 1.0}, r"^s_tmax \(1.0\) must be >= s_tmin \(2.0\)$"),
        ({"eta": 1.0, "s_churn": 1.0}, "^eta .* and s_churn .* are separate samplers: set one$"),
    ],
)
def test_knob_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Knobs(**kwargs)


# -- against ComfyUI's k-diffusion samplers (what KSampler runs) -----------------------------------
@pytest.fixture(scope="module")
def comfy():
    reason = comfy_support.comfy_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    import comfy.k_diffusion.sampling as ks
    import comfy.model_sampling as ms

    return ks, ms


def toy_denoise(x, sigma):
    """A smooth x0 predictor of x and sigma (a stand-in model)."""
    s = sigma if isinstance(sigma, float) else sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x) / (1 + s * s) ** 0.5 + 0.1 * x.mean(dim=(1, 2, 3), keepdim=True)


class ComfyModel:
    """Callable as k-diffusion's model (x, sigma * s_in); nests model_sampling as KSampler's wrapper does."""

    def __init__(self, model_sampling):
        inner = type("Inner", (), {})()
        inner.inner_model = type("Inner2", (), {"model_sampling": model_sampling})()
        self.inner_model = inner

    def __call__(self, x, sigma, **kwargs):
        return toy_denoise(x, sigma)


SIGMAS = [14.6, 6.1, 2.9, 1.4, 0.6, 0.2, 0.0]


def test_churn_matches_comfy_sample_euler(comfy):
    ks, _ = comfy
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * SIGMAS[0]
    knobs = Knobs(s_churn=2.0, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)
    torch.manual_seed(7)  # sample_euler draws churn noise with torch.randn_like
    ref = ks.sample_euler(
        lambda xx, s: toy_denoise(xx, s), x, torch.tensor(SIGMAS), disable=True,
        s_churn=knobs.s_churn, s_tmin=knobs.s_tmin, s_tmax=knobs.s_tmax, s_noise=knobs.s_noise,
    )  # fmt: skip
    torch.manual_seed(7)
    got = sample_euler(toy_denoise, x, SIGMAS, knobs, noise=torch.randn_like)
    diff = (got - ref).abs().max().item()
    print(f"euler churn vs ComfyUI sample_euler: {diff:.3g}")
    assert diff <= 1e-5 * (1 + ref.abs().max().item())
    torch.manual_seed(7)
    plain = sample_euler(toy_denoise, x, SIGMAS, Knobs(), noise=torch.randn_like)
    assert (plain - got).abs().max().item() > 1e-2  # churn acted


@pytest.mark.parametrize(("eta", "s_noise"), [(1.0, 1.0), (0.6, 0.9)])
def test_ancestral_matches_comfy_sample_euler_ancestral(comfy, eta, s_noise):
    ks, ms = comfy
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * SIGMAS[0]
    noises = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(8)]
    it = iter(noises)
    ref = ks.sample_euler_ancestral(
        ComfyModel(ms.EPS()), x, torch.tensor(SIGMAS), disable=True, eta=eta, s_noise=s_noise,
        noise_sampler=lambda s, sn: next(it),
    )  # fmt: skip
    it2 = iter(noises)
    got = sample_euler(toy_denoise, x, SIGMAS, Knobs(eta=eta, s_noise=s_noise), noise=lambda _: next(it2))
    diff = (got - ref).abs().max().item()
    print(f"euler ancestral eta {eta} s_noise {s_noise} vs ComfyUI: {diff:.3g}")
    assert diff <= 1e-5 * (1 + ref.abs().max().item())


def test_eta_zero_is_plain_euler(comfy):
    ks, _ = comfy
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * SIGMAS[0]
    ref = ks.sample_euler(lambda xx, s: toy_denoise(xx, s), x, torch.tensor(SIGMAS), disable=True)
    got = sample_euler(toy_denoise, x, SIGMAS, Knobs(), noise=torch.randn_like)
    assert (got - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())
