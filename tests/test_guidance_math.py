"""Guidance terms that combine predictions (no model-side perturbation): APG, CFG-Zero*, TCFG,
magnitude-aware, ComfyUI's RescaleCFG and CFGNorm, the guidance interval.

Each: formulas on known values; equality with its reference (diffusers' guider or ComfyUI's node,
run by ComfyUI's own sampling_function) on identical predictions; windows; batch = single runs;
composition in one forward; end to end on the tiny SD1.5 and SD3."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
from families_support import tiny_sd3
from guidance_refs import Patcher, comfy_guided, comfy_node_module, diffusers_guided

from diffguide import CFG, PAG, TPG, ConfigError, GuidedPipeline, StepInfo, Window
from diffguide.errors import DiffguideError
from diffguide.guidance import (
    APG,
    FDG,
    TCFG,
    AdaptiveCFG,
    CFGNorm,
    CFGZeroStar,
    MagnitudeAware,
    RescaleCFG,
    RunState,
    guidance_interval,
    interval_window,
)
from diffguide.guidance.cfg_zero_star import optimized_scale
from diffguide.guidance.fdg import collapse, laplacian_pyramid, pyr_up
from diffguide.guidance.sharpness import joint_bilateral
from diffguide.guidance.space import comfy_input, x0_to_pred

TOL = 1e-6
PROMPTS = ["a cat", "a dog"]
NEGATIVES = ["ugly", "blurry"]


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def vec(*values, dtype=torch.float64):
    """One image (1, N, 1, 1) with the given values along the channel dim."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1)


def preds(seed: int = 0, shape=(3, 4, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=dtype)
    u = c + 0.5 * torch.randn(shape, generator=g, dtype=dtype)
    x = torch.randn(shape, generator=g, dtype=dtype)
    return c, u, x


def step_at(x=None, sigma=1.5, prediction="epsilon", index=0, count=10, state=None):
    return StepInfo(index, count, sigma, 500.0, x, prediction, state)


def guided(term, c, u, step):
    g = c + term.delta({"cond": c, "uncond": u}, step)
    return term.post(g, {"cond": c, "uncond": u}, step)


# --- formulas on known values ------------------------------------------------------------------


def test_apg_formula_known_values():
    c, u = vec(1.0, 0.0), vec(0.0, 1.0)  # D = (1, -1): parallel to c (1, 0), orthogonal (0, -1)
    step = step_at(space := None)  # prediction space: no x needed
    assert space is None
    plain = APG(3.0, eta=0.0, norm_threshold=0.0, momentum=0.0, space="prediction")
    assert maxdiff(guided(plain, c, u, step), vec(1.0, -2.0)) == 0.0
    half = APG(3.0, eta=0.5, norm_threshold=0.0, momentum=0.0, space="prediction")
    assert maxdiff(guided(half, c, u, step), vec(2.0, -2.0)) == 0.0
    clipped = APG(3.0, eta=0.0, norm_threshold=1.0, momentum=0.0, space="prediction")  # |D| = sqrt 2 -> 1
    assert maxdiff(guided(clipped, c, u, step), vec(1.0, -2.0 / math.sqrt(2.0))) <= 1e-15
    cfg_like = APG(3.0, eta=1.0, norm_threshold=0.0, momentum=0.0, space="prediction")
    assert maxdiff(guided(cfg_like, c, u, step), u + 3.0 * (c - u)) <= 1e-15


def test_apg_momentum_known_values_and_reset_when_sigma_rises():
    term = APG(2.0, eta=1.0, norm_threshold=0.0, momentum=-0.5, space="prediction")
    state = RunState()
    c, u1, u2 = vec(1.0, 0.0), vec(0.0, 0.0), vec(0.0, 1.0)
    assert maxdiff(guided(term, c, u1, step_at(sigma=2.0, state=state)), vec(2.0, 0.0)) == 0.0  # D = (1, 0)
    # D2 = (1, -1) - 0.5 (1, 0) = (0.5, -1)
    assert maxdiff(guided(term, c, u2, step_at(sigma=1.0, state=state)), vec(1.5, -1.0)) == 0.0
    # sigma rises (a new pass): the running D starts again, as ComfyUI's node does
    assert maxdiff(guided(term, c, u2, step_at(sigma=3.0, state=state)), vec(2.0, -1.0)) == 0.0
    with pytest.raises(ConfigError, match="APG with momentum needs the run's state"):
        term.delta({"cond": c, "uncond": u1}, step_at())


def test_apg_x0_space_is_the_paper_formula_on_x0():
    c, u, x = preds(1, dtype=torch.float64)
    step = step_at(x, sigma=2.5)
    term = APG(4.0, eta=0.3, norm_threshold=3.0, momentum=0.0)
    c0, u0 = step.to_x0(c), step.to_x0(u)
    ref_x0 = APG(4.0, eta=0.3, norm_threshold=3.0, momentum=0.0, space="prediction")
    assert maxdiff(step.to_x0(guided(term, c, u, step)), guided(ref_x0, c0, u0, step)) <= 1e-12


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_x0_to_pred_moves_x0_by_the_given_amount(prediction):
    c, d, x = preds(2, dtype=torch.float64)
    step = step_at(x, sigma=0.7, prediction=prediction)
    assert maxdiff(step.to_x0(c + x0_to_pred(step, d)), step.to_x0(c) + d) <= 1e-12
    assert maxdiff(x0_to_pred(step_at(x, sigma=0.0, prediction=prediction), d), 0 * d) == 0.0


def test_cfg_zero_star_formula_known_values():
    c, u = vec(2.0, 2.0), vec(1.0, 0.0)  # alpha = <c, u> / |u|^2 = 2
    assert optimized_scale(c, u).item() == pytest.approx(2.0)
    term = CFGZeroStar(3.0, zero_init_steps=1)
    # alpha u + w (c - alpha u) = (2, 0) + 3 (0, 2)
    assert maxdiff(guided(term, c, u, step_at(index=1)), vec(2.0, 6.0)) <= 1e-7
    assert maxdiff(guided(term, c, u, step_at(index=0)), vec(0.0, 0.0)) == 0.0  # zero-init
    assert term.active(step_at(index=0)) and not CFGZeroStar(1.0).active(step_at(index=1))


def test_cfg_zero_star_zero_init_warns_on_models_that_are_not_flow():
    """Zero-init on an epsilon / v model keeps all the starting noise (FID 134 on tiny-sd, docs/quality.md):
    a GuidanceWarning at the first step; none on flow models or without zero-init."""
    from diffguide.checks import GuidanceWarning

    c, u = vec(2.0, 2.0), vec(1.0, 0.0)
    for prediction in ("epsilon", "v_prediction"):
        with pytest.warns(GuidanceWarning, match=rf"made for flow models; on this {prediction} model"):
            guided(CFGZeroStar(3.0, zero_init_steps=1), c, u, step_at(index=0, prediction=prediction))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided(CFGZeroStar(3.0, zero_init_steps=1), c, u, step_at(index=0, prediction="flow"))
        guided(CFGZeroStar(3.0, zero_init_steps=0), c, u, step_at(index=0))
        guided(CFGZeroStar(3.0, zero_init_steps=1), c, u, step_at(index=1))  # once, at the first step


def test_tcfg_formula_known_values():
    c, u = vec(2.0, 0.0), vec(0.0, 1.0)  # top singular direction of [c; u] is (1, 0): u' = 0
    assert maxdiff(guided(TCFG(3.0), c, u, step_at()), vec(6.0, 0.0)) <= 1e-6
    c2, u2 = vec(1.0, 0.0), vec(1.0, 0.0)  # u along v1: unchanged, plain CFG
    assert maxdiff(guided(TCFG(3.0), c2, u2, step_at()), vec(1.0, 0.0)) <= 1e-6


def test_magnitude_aware_formula_known_values():
    c, u = vec(3.0, 4.0), vec(0.0, 4.0)  # |c - u| / |u| = 3 / 4
    w = 1.0 + 6.0 * math.exp(-2.0 * 0.75)
    assert maxdiff(guided(MagnitudeAware(7.0, alpha=2.0), c, u, step_at()), u + w * (c - u)) <= 1e-12
    assert maxdiff(guided(MagnitudeAware(7.0, alpha=0.0), c, u, step_at()), u + 7.0 * (c - u)) <= 1e-12


def test_cfg_norm_formula_known_values():
    # eps model at sigma 1: x0 = x sqrt 2 - eps; x = 0 makes x0 = -eps
    x, c = vec(0.0, 0.0), vec(3.0, 4.0)  # |c0| = 5
    g = vec(6.0, 8.0)  # |g0| = 10 -> halved
    step = step_at(x, sigma=1.0)
    out = CFGNorm(1.0).post(g, {"cond": c}, step)
    assert maxdiff(out, vec(3.0, 4.0)) <= 1e-8  # the node's + 1e-8 in the denominator
    assert maxdiff(CFGNorm(1.0).post(c / 2, {"cond": c}, step), c / 2) <= 1e-12  # attenuates only
    assert maxdiff(CFGNorm(1.0, pre_cfg=True).post(c / 2, {"cond": c}, step), c) <= 1e-12  # amplifies
    assert maxdiff(CFGNorm(0.5, pre_cfg=True).post(c / 2, {"cond": c}, step), 0.75 * c) <= 1e-12


def test_rescale_cfg_multiplier_one_matches_the_cond_std_in_v():
    c, u, x = preds(3, dtype=torch.float64)
    step = step_at(x, sigma=1.3)
    g = RescaleCFG(1.0).post(u + 5.0 * (c - u), {"cond": c}, step)
    xs = comfy_input(step) / (1.0 + 1.3**2)

    def v(pred):
        return (xs - step.to_x0(pred)).std(dim=(1, 2, 3))

    assert maxdiff(v(g), v(c)) <= 1e-12


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: APG(norm_threshold=-1.0), "APG norm_threshold must be >= 0, got -1.0"),
        (lambda: APG(space="eps"), "APG space must be one of x0, prediction, got 'eps'"),
        (lambda: APG(momentum=2.0), "APG momentum must be in [-5, 1], got 2.0"),
        (lambda: CFGZeroStar(zero_init_steps=-1), "CFG-Zero* zero_init_steps must be >= 0, got -1"),
        (lambda: CFGZeroStar(zero_init_steps=1.5), "CFG-Zero* zero_init_steps must be an integer, got 1.5"),
        (lambda: TCFG(math.nan), "TCFG scale must be a finite number, got nan"),
        (lambda: MagnitudeAware(alpha=-1.0), "magnitude-aware alpha must be >= 0, got -1.0"),
        (lambda: RescaleCFG(1.5), "RescaleCFG multiplier must be in [0, 1], got 1.5"),
        (lambda: CFGNorm(pre_cfg="yes"), "CFGNorm pre_cfg must be true or false, got 'yes'"),
        (
            lambda: guidance_interval(4.0, "sd3"),
            "unknown guidance interval 'sd3'; known: sdxl, edm2-s, edm2-xxl",
        ),
    ],
)
def test_bad_parameters_are_one_line_errors(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message


def test_fdg_pyramid_collapses_to_its_input_and_equal_scales_are_cfg():
    c, u, _ = preds(11, dtype=torch.float64)
    bands = laplacian_pyramid(c, 3)
    assert [b.shape[-1] for b in bands] == [8, 4, 2]
    assert maxdiff(collapse(bands), c) <= 1e-14
    smooth = torch.ones_like(c)  # a constant has no detail: everything in the coarse level
    assert maxdiff(laplacian_pyramid(smooth, 2)[0], 0 * smooth) <= 1e-14
    assert maxdiff(guided(FDG((4.0, 4.0)), c, u, step_at()), u + 4.0 * (c - u)) <= 1e-13
    # only the coarse level guided: g - c = pyr_up(3 (c_1 - u_1)), the fine band is c's own
    coarse = laplacian_pyramid(c, 2)[1] - laplacian_pyramid(u, 2)[1]
    assert maxdiff(FDG((1.0, 4.0)).guided(c, u) - c, pyr_up(3.0 * coarse)) <= 1e-13


def test_fdg_refuses_packed_and_indivisible_predictions():
    c3 = torch.zeros(1, 64, 16)
    with pytest.raises(
        DiffguideError, match=r"FDG needs \(B, C, H, W\) predictions, got shape \(1, 64, 16\)"
    ):
        guided(FDG(), c3, c3, step_at())
    c = torch.zeros(1, 4, 12, 10)
    with pytest.raises(
        DiffguideError, match="FDG with 3 levels needs latent sides divisible by 4 and at least 12, got 12x10"
    ):
        guided(FDG((3.0, 2.0, 1.5)), c, c, step_at())


def fooocus_compute_cfg(uncond, cond, cfg_scale, adaptive_cfg, timestep):
    """Fooocus's compute_cfg (modules/patch.py) as its CFG hook calls it, t = 1 - timestep / 999."""
    t = 1.0 - timestep / 999.0
    real = uncond + cfg_scale * (cond - uncond)
    if cfg_scale > adaptive_cfg:
        return real * t + (uncond + adaptive_cfg * (cond - uncond)) * (1 - t)
    return real


@pytest.mark.parametrize(("w", "mimic"), [(12.0, 7.0), (5.0, 7.0), (7.0, 7.0)])
def test_adaptive_cfg_is_fooocus_compute_cfg(w, mimic):
    """In float64: Fooocus blends two CFG results, we scale once (float32 orders differ by 2e-6)."""
    c, u, _ = preds(14, dtype=torch.float64)
    worst = 0.0
    for timestep in (999.0, 700.0, 250.0, 1.0):
        step = StepInfo(0, 10, 1.0, timestep)
        want = fooocus_compute_cfg(u, c, w, mimic, timestep)
        worst = max(worst, maxdiff(guided(AdaptiveCFG(w, mimic=mimic), c, u, step), want))
    print(f"adaptive CFG ({w}, mimic {mimic}) vs Fooocus's formula: max diff {worst:.2e}")
    assert worst <= 1e-12
    first = AdaptiveCFG(w, mimic=mimic).scale_at(StepInfo(0, 10, 14.6, 999.0))
    assert first == (mimic if w > mimic else w)  # the first step is guided like the mimicked scale
    assert AdaptiveCFG(w, mimic=mimic).scale_at(StepInfo(9, 10, 0.03, 0.0)) == w  # the last like w


def test_sharpness_filter_is_kornias_joint_bilateral_blur():
    """Fooocus's anisotropic.py is kornia's joint bilateral blur (13 x 13, sigma 3 and 3, L1, reflect)."""
    from kornia.filters import joint_bilateral_blur

    x, g, _ = preds(15, shape=(2, 4, 16, 12))
    d = maxdiff(joint_bilateral(x, g), joint_bilateral_blur(x, g, (13, 13), 3.0, (3.0, 3.0), "reflect", "l1"))
    print(f"sharpness filter vs kornia: max diff {d:.2e}")
    assert d <= TOL
    flat = torch.ones(1, 4, 16, 16)
    assert maxdiff(joint_bilateral(3.0 * flat, torch.randn(1, 4, 16, 16)), 3.0 * flat) <= 1e-6  # averages
    with pytest.raises(
        DiffguideError, match=r"Fooocus sharpness needs \(B, C, H, W\) predictions with sides above 6"
    ):
        joint_bilateral(torch.zeros(1, 4, 6, 16), torch.zeros(1, 4, 6, 16))


def fooocus_cfg_hook(x, c0, u0, w, adaptive_cfg, sharpness, timestep):
    """Fooocus's sampler CFG hook (modules/patch.py) in ComfyUI's terms: eps = x - x0, its filter
    (kornia's joint bilateral blur on the standardised cond x0), compute_cfg; returns the guided x0."""
    from kornia.filters import joint_bilateral_blur

    cond_eps, uncond_eps = x - c0, x - u0
    t = 1.0 - timestep / 999.0
    alpha = 0.001 * sharpness * t
    std, mean = torch.std_mean(c0, dim=(1, 2, 3), keepdim=True)
    degraded = joint_bilateral_blur(
        cond_eps, (c0 - mean) / (std + 1e-5), (13, 13), 3.0, (3.0, 3.0), "reflect", "l1"
    )
    weighted = degraded * alpha + cond_eps * (1.0 - alpha)
    return x - fooocus_compute_cfg(uncond_eps, weighted, w, adaptive_cfg, timestep)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_adaptive_cfg_with_sharpness_is_fooocus_cfg_hook(prediction):
    c, u, x = preds(16, shape=(2, 4, 16, 16), dtype=torch.float64)
    worst = 0.0
    for timestep, sigma in ((999.0, 14.6), (500.0, 1.9), (20.0, 0.05)):
        step = StepInfo(0, 10, sigma, timestep, x, prediction)
        ours = step.to_x0(guided(AdaptiveCFG(12.0, mimic=7.0, sharpness=2.0), c, u, step))
        ref = fooocus_cfg_hook(comfy_input(step), step.to_x0(c), step.to_x0(u), 12.0, 7.0, 2.0, timestep)
        worst = max(worst, maxdiff(ours, ref))
    print(f"adaptive CFG + sharpness vs Fooocus's hook ({prediction}): max diff {worst:.2e}")
    assert worst <= 1e-10
    sharp = guided(AdaptiveCFG(12.0, mimic=7.0, sharpness=2.0), c, u, step)
    assert maxdiff(sharp, guided(AdaptiveCFG(12.0, mimic=7.0), c, u, step)) > 1e-6


# --- equality with the references on identical predictions -------------------------------------


@pytest.mark.parametrize(
    ("scales", "rhos"), [((10.0, 5.0), None), ((7.0, 3.0, 2.0), (0.5, 1.0, 0.0)), ((4.0,), None)]
)
def test_fdg_matches_diffusers_guider(scales, rhos):
    c, u, _ = preds(12, shape=(3, 4, 16, 16))
    ref = FrequencyDecoupledGuidance(
        guidance_scales=list(scales), parallel_weights=list(rhos) if rhos else None
    )
    want = diffusers_guided(ref, c, u)
    d = maxdiff(FDG(scales, rhos).guided(c, u), want)
    engine = maxdiff(guided(FDG(scales, rhos), c, u, step_at()), want)  # c + (g - c): one rounding
    print(f"FDG {scales} vs diffusers: max diff {d:.2e} (through the engine's c + delta: {engine:.2e})")
    assert d <= TOL and engine <= TOL * (1 + want.abs().max().item())


def test_diffusers_fdg_defects():
    """Documented: a level at scale 1 appends the previous level's band (shape error), and a latent
    with no power-of-two side comes back padded to the next power of two."""
    c, u, _ = preds(13, shape=(1, 4, 16, 16))
    with pytest.raises(RuntimeError, match="must match the size"):
        diffusers_guided(FrequencyDecoupledGuidance(guidance_scales=[7.0, 3.0, 1.0]), c, u)
    assert guided(FDG((7.0, 3.0, 1.0)), c, u, step_at()).shape == c.shape
    c96 = torch.randn(1, 4, 96, 96)
    assert diffusers_guided(FrequencyDecoupledGuidance(), c96, 0.9 * c96).shape == (1, 4, 128, 128)
    assert guided(FDG(), c96, 0.9 * c96, step_at()).shape == c96.shape


@pytest.mark.parametrize(("eta", "r", "beta"), [(0.0, 2.5, -0.75), (0.5, 0.0, 0.0), (1.0, 10.0, 0.3)])
def test_apg_matches_diffusers_guider_over_steps(eta, r, beta):
    """diffusers' original formulation c + s N with s = w - 1, in prediction space, 4 steps of momentum."""
    w = 6.0
    ref = AdaptiveProjectedGuidance(
        guidance_scale=w - 1.0,
        eta=eta,
        adaptive_projected_guidance_rescale=r,
        adaptive_projected_guidance_momentum=beta or None,
        use_original_formulation=True,
    )
    ref.momentum_buffer = MomentumBuffer(beta) if beta else None  # what its prepare_inputs does at step 0
    term, state = APG(w, eta=eta, norm_threshold=r, momentum=beta, space="prediction"), RunState()
    worst = 0.0
    for i in range(4):
        c, u, _ = preds(10 + i)
        got = guided(term, c, u, step_at(sigma=3.0 - i, index=i, state=state))
        worst = max(worst, maxdiff(got, diffusers_guided(ref, c, u, i)))
    print(f"APG vs diffusers (eta={eta}, r={r}, beta={beta}): max diff {worst:.2e}")
    assert worst <= TOL


def test_diffusers_apg_default_formulation_is_not_the_paper_when_eta_is_not_one():
    """Documented: diffusers' default u + w N equals the paper's c + (w - 1) N only where N = D."""
    c, u, _ = preds(4)
    ref = AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_rescale=0.0)
    ours = guided(APG(5.0, eta=0.0, norm_threshold=0.0, momentum=0.0, space="prediction"), c, u, step_at())
    assert maxdiff(ours, diffusers_guided(ref, c, u)) > 1e-2
    same = AdaptiveProjectedGuidance(guidance_scale=5.0, eta=1.0, adaptive_projected_guidance_rescale=0.0)
    cfg = guided(APG(5.0, eta=1.0, norm_threshold=0.0, momentum=0.0, space="prediction"), c, u, step_at())
    assert maxdiff(cfg, diffusers_guided(same, c, u)) <= TOL


@pytest.fixture(scope="module")
def comfy_nodes():
    return {
        name: comfy_node_module(name)
        for name in ("nodes_apg", "nodes_cfg", "nodes_tcfg", "nodes_model_advanced")
    }


@pytest.mark.parametrize(("eta", "r", "beta"), [(0.0, 2.5, -0.75), (0.4, 0.0, 0.5), (1.0, 0.0, 0.0)])
def test_apg_matches_comfy_node_in_x0_with_cfg_one_below(comfy_nodes, eta, r, beta):
    """ComfyUI's node at cfg w - 1 is the paper's APG at w, in x0 space (momentum over 4 steps,
    reset when sigma rises); at eta 1, r 0 the node's cfg w is CFG at w + 1 (asserted)."""
    w = 5.0
    patcher = Patcher()
    comfy_nodes["nodes_apg"].APG.execute(patcher, eta, r, beta)
    term, state = APG(w, eta=eta, norm_threshold=r, momentum=beta), RunState()
    worst = 0.0
    for i, sigma in enumerate([8.0, 3.0, 1.0, 9.0]):  # the last one restarts the momentum
        c, u, x = preds(20 + i, dtype=torch.float64)
        step = step_at(x, sigma=sigma, index=i, state=state)
        got = step.to_x0(guided(term, c, u, step))
        ref = comfy_guided(patcher, comfy_input(step), sigma, step.to_x0(c), step.to_x0(u), w - 1.0)
        worst = max(worst, maxdiff(got, ref))
    print(f"APG vs ComfyUI node (eta={eta}, r={r}, beta={beta}): max diff {worst:.2e}")
    assert worst <= TOL
    if (eta, r, beta) == (1.0, 0.0, 0.0):
        c0, u0 = step.to_x0(c), step.to_x0(u)
        node = comfy_guided(patcher, comfy_input(step), 9.0, c0, u0, w)
        assert maxdiff(node, u0 + (w + 1.0) * (c0 - u0)) <= 1e-12


@pytest.mark.parametrize("zero_init", [0, 2])
def test_cfg_zero_star_matches_diffusers_guider(zero_init):
    ref = ClassifierFreeZeroStarGuidance(guidance_scale=4.5, zero_init_steps=zero_init)
    term = CFGZeroStar(4.5, zero_init_steps=zero_init)
    worst = 0.0
    for i in range(4):
        c, u, _ = preds(30 + i)
        worst = max(worst, maxdiff(guided(term, c, u, step_at(index=i)), diffusers_guided(ref, c, u, i)))
    print(f"CFG-Zero* vs diffusers (zero_init_steps={zero_init}): max diff {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_comfy_cfg_zero_star_node_differs_by_the_affine_part(comfy_nodes, prediction):
    """ComfyUI's node applies alpha u + w (c - alpha u) to the x0 estimates; the paper applies it to
    the prediction. x0 is affine in the prediction, so they differ by (w - 1)(1 - alpha) x (documented)."""
    w, sigma = 4.0, 0.6
    patcher = Patcher()
    comfy_nodes["nodes_cfg"].CFGZeroStar.execute(patcher)
    c, u, x = preds(5, dtype=torch.float64)
    step = step_at(x, sigma=sigma, prediction=prediction, index=3)
    ours = step.to_x0(guided(CFGZeroStar(w, zero_init_steps=0), c, u, step))
    xc = comfy_input(step)
    node = comfy_guided(patcher, xc, sigma, step.to_x0(c), step.to_x0(u), w)
    alpha = optimized_scale(c, u)
    assert (
        maxdiff(node, ours + (w - 1.0) * (1.0 - alpha) * xc) <= 1e-5
    )  # alpha: float32 (diffusers) vs float64
    assert maxdiff(node, ours) > 1e-3


def test_tcfg_matches_diffusers_guider_and_comfy_node(comfy_nodes):
    w = 5.0
    c, u, x = preds(6)
    got = guided(TCFG(w), c, u, step_at())
    d = maxdiff(got, diffusers_guided(TangentialClassifierFreeGuidance(guidance_scale=w), c, u))
    c64, u64, x64 = (t.double() for t in (c, u, x))
    patcher = Patcher()
    comfy_nodes["nodes_tcfg"].TCFG.execute(patcher)
    step = step_at(x64, sigma=1.0)  # the node damps x - x0 = sigma eps: the same float32 SVD input at sigma 1
    ours = step.to_x0(guided(TCFG(w), c64, u64, step))
    node = comfy_guided(patcher, comfy_input(step), 1.0, step.to_x0(c64), step.to_x0(u64), w)
    print(f"TCFG: vs diffusers {d:.2e}, vs ComfyUI {maxdiff(ours, node):.2e}")
    assert d <= TOL
    # The node stacks [u; c] where diffusers and we stack [c; u]: float32 SVD rounding of v1 (each
    # 2e-6 from the float64 v1 here) times w - 1; the same u' in exact arithmetic.
    assert maxdiff(ours, node) <= 5e-5


def test_magnitude_aware_matches_diffusers_guider():
    """On packed (B, tokens, channels) predictions: diffusers' guider fails on 4-d ones (asserted)."""
    c, u, _ = preds(7, shape=(3, 64, 16))
    worst = max(
        maxdiff(
            guided(MagnitudeAware(w, alpha=a), c, u, step_at()),
            diffusers_guided(MagnitudeAwareGuidance(w, a), c, u),
        )
        for w, a in [(10.0, 8.0), (4.0, 0.5), (1.5, 0.0)]
    )
    print(f"magnitude-aware vs diffusers: max diff {worst:.2e}")
    assert worst <= TOL
    c4, u4, _ = preds(7)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        diffusers_guided(MagnitudeAwareGuidance(10.0, 8.0), c4, u4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_rescale_cfg_matches_comfy_node(comfy_nodes, prediction):
    w, phi, sigma = 6.0, 0.7, 2.2
    patcher = Patcher()
    comfy_nodes["nodes_model_advanced"].RescaleCFG().patch(patcher, phi)
    c, u, x = preds(8, dtype=torch.float64)
    step = step_at(x, sigma=sigma, prediction=prediction)
    ours = step.to_x0(RescaleCFG(phi).post(u + w * (c - u), {"cond": c}, step))
    node = comfy_guided(patcher, comfy_input(step), sigma, step.to_x0(c), step.to_x0(u), w)
    print(f"RescaleCFG vs ComfyUI ({prediction}): max diff {maxdiff(ours, node):.2e}")
    assert maxdiff(ours, node) <= TOL


@pytest.mark.parametrize("pre_cfg", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow"])
def test_cfg_norm_matches_comfy_node(comfy_nodes, pre_cfg, prediction):
    w, k, sigma = 5.0, 0.8, 0.9
    patcher = Patcher()
    comfy_nodes["nodes_cfg"].CFGNorm.execute(patcher, k, pre_cfg)
    c, u, x = preds(9, dtype=torch.float64)
    step = step_at(x, sigma=sigma, prediction=prediction)
    ours = step.to_x0(CFGNorm(k, pre_cfg=pre_cfg).post(u + w * (c - u), {"cond": c}, step))
    node = comfy_guided(patcher, comfy_input(step), sigma, step.to_x0(c), step.to_x0(u), w)
    print(f"CFGNorm(pre_cfg={pre_cfg}) vs ComfyUI ({prediction}): max diff {maxdiff(ours, node):.2e}")
    assert maxdiff(ours, node) <= TOL


# --- in the engine: windows, batches, runs, composition, the tiny models -------------------------

STEPS = 4
METHODS = {
    "apg": [APG(5.0)],
    "apg_prediction": [APG(5.0, eta=0.5, norm_threshold=3.0, momentum=0.5, space="prediction")],
    "cfg_zero_star": [CFGZeroStar(4.0)],
    "tcfg": [TCFG(4.0)],
    "mag": [MagnitudeAware(6.0, alpha=1.0)],
    "interval": [guidance_interval(4.0)],
    "rescale_cfg": [CFG(4.0), RescaleCFG(0.7)],
    "cfg_norm": [CFG(4.0), CFGNorm(1.0)],
    "cfg_norm_pre": [CFG(4.0), CFGNorm(0.8, pre_cfg=True)],
    "fdg": [FDG((6.0, 3.0), parallel_weights=(0.5, 1.0))],
    "adaptive_cfg": [AdaptiveCFG(9.0, mimic=3.0)],
    "adaptive_cfg_sharpness": [AdaptiveCFG(9.0, mimic=3.0, sharpness=20.0)],
}


def run(gp, guidance, prompts=PROMPTS, negatives=NEGATIVES, seed=3, **kwargs):
    kwargs.setdefault("steps", STEPS)
    return gp.generate(prompts, negatives, guidance=guidance, seed=seed, decode=False, **kwargs)


@pytest.fixture(scope="module")
def cond_only_f64(sd15_f64):
    return run(sd15_f64, [CFG(1.0)], steps=3).latents


@pytest.mark.parametrize("method", list(METHODS))
def test_batch_equals_single_runs_and_reruns(sd15_f64, cond_only_f64, method):
    """Per-image state (APG momentum): image i of a batch equals its own run (seed + i) in float64;
    a second run on the same pipeline repeats the first exactly."""
    terms = METHODS[method]
    batch = run(sd15_f64, terms, steps=3)
    for i in range(len(PROMPTS)):
        alone = run(sd15_f64, terms, [PROMPTS[i]], [NEGATIVES[i]], seed=3 + i, steps=3).latents
        assert maxdiff(batch.latents[i : i + 1], alone) <= 1e-9 * (1 + alone.abs().max().item()), f"image {i}"
    assert torch.equal(run(sd15_f64, terms, steps=3).latents, batch.latents)
    assert maxdiff(batch.latents, cond_only_f64) > 1e-3  # the method does something


@dataclass(frozen=True)
class StateProbe:
    """A stateful term that counts its calls in the run's state and records what it saw."""

    seen: list = field(default_factory=list, compare=False)
    name: str = "probe"
    window: Window = field(default_factory=Window)

    def branches(self):
        return ()

    def active(self, step):
        return True

    def delta(self, preds, step):
        step.state[self.name] = step.state.get(self.name, 0) + 1
        self.seen.append(step.state[self.name])
        return torch.zeros_like(preds["cond"])

    def post(self, guided, preds, step):
        return guided

    def describe(self):
        return {"method": "probe"}


def test_run_state_is_fresh_for_every_run(sd15):
    probe = StateProbe()
    gp_runs = [run(sd15, [CFG(3.0), probe], steps=3) for _ in range(2)]
    assert probe.seen == [1, 2, 3, 1, 2, 3]
    assert torch.equal(gp_runs[0].latents, gp_runs[1].latents)


@pytest.mark.parametrize(
    "term",
    [
        APG(5.0, window=Window(start=0.5)),
        CFGZeroStar(4.0, zero_init_steps=0, window=Window(start=0.5)),
        TCFG(4.0, window=Window(start=0.5)),
        MagnitudeAware(6.0, window=Window(start=0.5)),
    ],
    ids=["apg", "cfg_zero_star", "tcfg", "mag"],
)
def test_term_outside_its_window_adds_no_rows_and_no_guidance(sd15, unet_calls, term):
    steps = []
    with unet_calls(sd15.unet) as log:
        run(sd15, [term], callback=lambda s: steps.append(s))
    assert log.rows == [2, 2, 4, 4]
    for s in steps[:2]:
        assert torch.equal(s.guided, s.preds["cond"])


@pytest.mark.parametrize(
    "post", [RescaleCFG(0.7, window=Window(start=0.5)), CFGNorm(0.5, pre_cfg=True, window=Window(start=0.5))]
)
def test_corrections_act_only_inside_their_window(sd15, unet_calls, post):
    plain, corrected = [], []
    run(sd15, [CFG(4.0)], callback=plain.append)
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(4.0), post], callback=corrected.append)
    assert log.rows == [4] * STEPS  # no rows of their own
    for s in corrected[:2]:  # before the window: plain CFG, c + (w - 1)(c - u), of the step's predictions
        assert torch.equal(s.guided, s.preds["cond"] + 3.0 * (s.preds["cond"] - s.preds["uncond"]))
    late = corrected[2]
    assert (
        maxdiff(late.guided, late.preds["uncond"] + 4.0 * (late.preds["cond"] - late.preds["uncond"])) > 1e-4
    )
    assert maxdiff(corrected[0].guided, plain[0].guided) == 0.0


def test_guidance_interval_guides_only_inside_its_sigmas(sd15, unet_calls):
    sigmas: list[float] = []
    with unet_calls(sd15.unet) as log:
        run(sd15, [guidance_interval(4.0)], steps=8, callback=lambda s: sigmas.append(s.step.sigma))
    inside = [0.28 <= s <= 5.42 for s in sigmas]
    assert any(inside) and not all(inside)
    assert log.rows == [4 if i else 2 for i in inside]
    assert interval_window("edm2-xxl") == Window(sigma_min=0.28, sigma_max=2.9)
    lo, hi = interval_window(flow=True).sigma_min, interval_window(flow=True).sigma_max
    assert lo == pytest.approx(0.28 / 1.28) and hi == pytest.approx(5.42 / 6.42)


def test_every_term_composes_in_one_forward_per_step(sd15, unet_calls):
    terms = [
        APG(3.0),
        TCFG(2.0),
        MagnitudeAware(2.0),
        PAG(1.0),
        TPG(1.0),
        RescaleCFG(0.5),
        CFGNorm(1.0),
        CFGZeroStar(2.0, zero_init_steps=0),
    ]
    with unet_calls(sd15.unet) as log:
        out = run(sd15, terms)
    assert log.rows == [4 * len(PROMPTS)] * STEPS  # [uncond, cond, pag, tpg]
    assert out.forward_calls == STEPS and torch.isfinite(out.latents).all()


def test_apg_and_cfg_zero_star_runs_match_diffusers_guiders_at_every_step(sd15):
    """Whole runs on the tiny SD1.5: at every step the guided prediction equals the diffusers
    guider's (stepped along with the run, APG momentum included) on that step's predictions."""
    cases = [
        (
            APG(5.0, eta=0.0, norm_threshold=4.0, momentum=-0.5, space="prediction"),
            AdaptiveProjectedGuidance(4.0, -0.5, 4.0, eta=0.0, use_original_formulation=True),
        ),
        (CFGZeroStar(4.0, zero_init_steps=1), ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=1)),
        (TCFG(4.0), TangentialClassifierFreeGuidance(4.0)),
    ]
    for term, ref in cases:
        states = []
        run(sd15, [term], callback=states.append)
        if isinstance(ref, AdaptiveProjectedGuidance):
            ref.momentum_buffer = MomentumBuffer(-0.5)
        worst = max(
            maxdiff(s.guided, diffusers_guided(ref, s.preds["cond"], s.preds["uncond"], i, STEPS))
            for i, s in enumerate(states)
        )
        print(f"{term.describe()['method']} run on tiny SD1.5 vs diffusers guider: max diff {worst:.2e}")
        assert worst <= TOL


@pytest.fixture(scope="module")
def sd3():
    return GuidedPipeline(tiny_sd3(seed=0))


@pytest.fixture(scope="module")
def sd3_cond_only(sd3):
    return run(sd3, [CFG(1.0)], steps=3).latents


@pytest.mark.parametrize("method", list(METHODS))
def test_runs_on_tiny_sd3(sd3, sd3_cond_only, method):
    rows: list[int] = []
    handle = sd3.pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append(int(k["hidden_states"].shape[0])), with_kwargs=True
    )
    try:
        out = run(sd3, METHODS[method], steps=3)
    finally:
        handle.remove()
    assert out.forward_calls == 3 and all(r in (2, 4) for r in rows)
    assert torch.isfinite(out.latents).all()
    assert maxdiff(out.latents, sd3_cond_only) > 1e-4


def test_cfg_zero_star_zero_init_keeps_the_flow_latents_on_tiny_sd3(sd3):
    """Zero velocity on the first step: the first Euler step leaves the latents where they were."""
    states = []
    run(sd3, [CFGZeroStar(4.0, zero_init_steps=1)], steps=2, callback=states.append)
    assert torch.equal(states[0].guided, torch.zeros_like(states[0].guided))
    assert torch.equal(states[0].latents_out, states[0].latents_in)
    assert not torch.equal(states[1].latents_out, states[1].latents_in)


# --- registered: manifests, the CLI's --guide and replay ----------------------------------------

ALL_TERMS = [
    APG(5.0, eta=0.5, space="prediction"),
    CFGZeroStar(3.0, zero_init_steps=2),
    TCFG(4.0, window=Window(start=0.2)),
    MagnitudeAware(6.0, alpha=1.0),
    FDG((6.0, 3.0), parallel_weights=(0.5, 1.0)),
    AdaptiveCFG(9.0, mimic=3.0, sharpness=2.0),
    RescaleCFG(0.5),
    CFGNorm(0.8, pre_cfg=True),
]


@pytest.mark.parametrize("term", ALL_TERMS, ids=lambda t: t.method)
def test_manifest_entry_round_trips_through_json(term):
    from diffguide.guidance.registry import term_from_dict

    entry = json.loads(json.dumps(term.describe()))
    assert entry["method"] == term.method and term_from_dict(entry) == term


def test_guide_option_runs_the_terms_and_replay_is_bit_identical(tmp_path):
    from typer.testing import CliRunner

    from diffguide import testing
    from diffguide.cli.main import app
    from diffguide.io import read_manifest

    model = tmp_path / "tiny-sd15"
    testing.tiny_sd15(seed=0).save_pretrained(model)
    runner = CliRunner(env={"COLUMNS": "200"})
    args = [
        "generate",
        "-m",
        str(model),
        "-p",
        "a cat",
        "--steps",
        "3",
        "--seed",
        "3",
        "--threads",
        "1",
        "-q",
    ]
    guides = ["--guide", "apg:scale=5,momentum=-0.5", "--guide", "rescale_cfg:multiplier=0.7"]
    res = runner.invoke(app, [*args, "--cfg", "1", *guides, "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    image = tmp_path / "out" / "diffguide-000-3.png"
    methods = [t["method"] for t in read_manifest(image)["parameters"]["guidance"]]
    assert methods == ["apg", "rescale_cfg"]
    res = runner.invoke(app, ["replay", str(image)])
    assert res.exit_code == 0 and "bit-identical" in res.output and "NOT" not in res.output, res.output
    res = runner.invoke(app, [*args, "--guide", "fdg:scales=[10,x]", "-o", str(tmp_path / "fdg")])
    assert res.exit_code == 2
    assert "fdg scales: 'x' is not a number" in res.output
    assert not (tmp_path / "fdg").exists()
