"""SEG (Smoothed Energy Guidance, Hong 2024): the blur on known values, against diffusers' copy of
the official blur, against an independent reference loop on the same tiny models, diffusers'
guider shown to be a no-op, and the engine checks (one forward, window, batch, restoration, DiTs)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from diffusers import SmoothedEnergyGuidance
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig, _gaussian_blur_2d
from families_support import tiny_sd3
from guide_support import (
    NEGATIVES,
    PROMPTS,
    SEED,
    check_one_forward_with_cfg_pag,
    check_restored,
    check_window,
    maxdiff,
    reference,
    run,
)

from diffguide import CFG, ConfigError, GuidedPipeline, Window
from diffguide.guidance import SEG
from diffguide.perturb import QueryBlur
from diffguide.perturb.query import token_grid
from diffguide.perturb.query_blur import blur_grid, blur_queries, kernel_size
from diffguide.testing_dit import tiny_flux

TOL = 1e-4


# --- the blur ---------------------------------------------------------------------------------


def test_blur_known_values():
    """3x3 grid, sigma 1: taps (a, b, a) with a = e^-1/2 / (1 + 2 e^-1/2), reflect padding.
    On the linear field x = 3 r + c the centre keeps 4 and the corner becomes 8 a."""
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = blur_grid(x, 1.0)
    a = math.exp(-0.5) / (1 + 2 * math.exp(-0.5))
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0, abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(8 * a, abs=1e-6)
    assert kernel_size(1.0, 3) == 3 and kernel_size(1.0, 64) == 7 and kernel_size(0.3, 64) == 3
    assert kernel_size(100.0, 4) == 5  # clamped: side + 1 on an even side


def test_infinite_blur_is_the_mean_and_large_finite_is_not():
    """sigma -> inf: the paper's limit, every query the mean. A large *finite* sigma uses the clamped
    kernel (a box blur with reflection), which is not the mean: hence the explicit threshold."""
    q = torch.randn(2, 16, 3)
    mean = q.mean(dim=1, keepdim=True).expand_as(q)
    assert torch.allclose(blur_queries(q, (4, 4), math.inf), mean, atol=1e-6)
    assert torch.allclose(blur_queries(q, (4, 4), 1e4), mean, atol=1e-6)  # above 9999
    assert maxdiff(blur_queries(q, (4, 4), 9999.0), mean) > 1e-2


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, math.inf])
def test_blur_matches_diffusers_copy_of_the_official_blur(sigma):
    """diffusers' ``_gaussian_blur_2d`` is the official code with its inf test inverted: it blurs
    when ``sigma > threshold`` and takes the mean otherwise. Called accordingly it is the reference."""
    q = torch.randn(2, 64, 6)
    if math.isinf(sigma):
        ref = _gaussian_blur_2d(q.clone(), 3, 1.0, sigma_threshold_inf=math.inf)  # its "else": the mean
    else:
        k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        ref = _gaussian_blur_2d(q.clone(), k, sigma, sigma_threshold_inf=-1.0)  # its "is_inf": the blur
    assert maxdiff(blur_queries(q, (8, 8), sigma), ref) <= 1e-6


def test_token_grid():
    assert token_grid(64, (16, 16)) == (8, 8)
    assert token_grid(12, (6, 8)) == (3, 4)
    assert token_grid(6, (5, 9)) == (2, 3)  # (5, 9) -> (3, 5) -> (2, 3), rounding up
    with pytest.raises(Exception, match="cannot lay 7 query tokens"):
        token_grid(7, (16, 16))


def test_bad_sigma_and_scale_are_one_line_errors():
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="SEG blur sigma must be > 0"):
            SEG(blur_sigma=bad)
    with pytest.raises(ConfigError, match="SEG blur sigma must be a number, got 'wide'"):
        SEG(blur_sigma="wide")
    with pytest.raises(ConfigError, match=r"SEG scale must be in \[0, 100\]"):
        SEG(-1.0)


# --- diffusers' guider ------------------------------------------------------------------------


def test_diffusers_seg_guider_never_blurs(sd15_pipe):
    """diffusers 0.42.1 ``SmoothedEnergyGuidance.prepare_models`` never calls the base class, so its
    ``_count_prepared`` stays 0 and the ``is_conditional and _count_prepared > 1`` test never lets
    the hook in: the "SEG" prediction is a plain conditional pass and SEG adds nothing."""
    unet = sd15_pipe.unet
    config = SmoothedEnergyGuidanceConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks")
    guider = SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=3.0, seg_guidance_config=config)
    guider.set_state(step=5, num_inference_steps=10, timestep=torch.tensor(500))
    assert guider.num_conditions == 3  # CFG and SEG both enabled
    for _ in range(3):  # cond, uncond, cond_seg: the modular denoise loop's calls
        guider.prepare_models(unet)
        registries = [getattr(m, "_diffusers_hook", None) for m in unet.modules()]
        assert all(r is None or not r.hooks for r in registries)
        guider.cleanup_models(unet)
    assert guider._count_prepared == 0
    c, u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = guider.forward(pred_cond=c, pred_uncond=u, pred_cond_seg=c).pred  # p == c: only CFG remains
    assert torch.allclose(out, u + 4.0 * (c - u))
    # once forced in, its hook inverts the threshold: sigma 1 (finite) gives the mean
    q = torch.randn(1, 16, 2)
    mean = q.mean(dim=1, keepdim=True).expand_as(q)
    assert torch.allclose(_gaussian_blur_2d(q.clone(), 7, 1.0, 9999.0), mean, atol=1e-6)


# --- against the reference loop -----------------------------------------------------------------


class RefBlurProcessor:
    """Self-attention with blurred queries, written from the paper and the official processor: q, k,
    v projections, q blurred on its square grid (diffusers' copy of the official blur), SDPA, out."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert attn.residual_connection is False and attn.rescale_output_factor == 1.0
        assert attn.group_norm is None and attn.spatial_norm is None
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if math.isinf(self.sigma):
            q = _gaussian_blur_2d(q, 3, 1.0, sigma_threshold_inf=math.inf)
        else:
            size = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
            q = _gaussian_blur_2d(q, size, self.sigma, sigma_threshold_inf=-1.0)
        b, n, _ = q.shape
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def mid_self_attention(unet):
    return [m for n, m in unet.named_modules() if n.startswith("mid_block") and n.endswith("attn1")]


def blurred(unet, sigma):
    @contextmanager
    def install():
        layers = mid_self_attention(unet)
        saved = [m.processor for m in layers]
        for m in layers:
            m.processor = RefBlurProcessor(sigma)
        try:
            yield
        finally:
            for m, p in zip(layers, saved, strict=True):
                m.processor = p

    return install


CASES = [("sd15", 4.0, math.inf), ("sd15", 1.0, 1.0), ("sdxl", 4.0, math.inf), ("sdxl", 4.0, 0.5)]


@pytest.mark.parametrize(("arch", "w", "sigma"), CASES, ids=[f"{a}-w{w}-s{s}" for a, w, s in CASES])
def test_seg_matches_reference(arch, w, sigma, request):
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    assert QueryBlur().targets(pipe.unet) == [
        n for n, _ in pipe.unet.named_modules() if n.startswith("mid_block") and n.endswith("attn1")
    ]
    expected = reference(pipe, w, 3.0, blurred(pipe.unet, sigma))
    got = run(gp, ([CFG(w)] if w != 1.0 else []) + [SEG(3.0, blur_sigma=sigma)]).latents
    assert maxdiff(expected, got) <= TOL
    assert maxdiff(got, run(gp, [CFG(w)] if w != 1.0 else []).latents) > 1e-3  # SEG acts


# --- engine checks --------------------------------------------------------------------------------


def test_seg_one_forward_with_cfg_and_pag(sd15, unet_calls):
    check_one_forward_with_cfg_pag(sd15, SEG(3.0), unet_calls)


def test_seg_window(sd15, unet_calls):
    check_window(sd15, SEG(3.0, window=Window(start=0.5)), unet_calls)


def test_seg_batch_equals_single_runs(sd15_f64):
    both = run(sd15_f64, [CFG(4.0), SEG(3.0, blur_sigma=1.0)]).latents
    for i, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES, strict=True)):
        terms = [CFG(4.0), SEG(3.0, blur_sigma=1.0)]
        one = run(sd15_f64, terms, prompts=[prompt], negatives=[negative], seed=SEED + i).latents
        assert maxdiff(both[i : i + 1], one) <= 1e-10


def test_seg_leaves_the_model_as_it_was(sdxl):
    check_restored(sdxl, [CFG(4.0), SEG(3.0, blur_sigma=1.0)])


def test_seg_manifest_round_trip():
    for term in (SEG(2.0), SEG(1.5, blur_sigma=2.0, layers="m0", window=Window(start=0.2))):
        assert SEG.from_dict(term.describe()) == term


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_seg_on_transformers(family):
    """SD3: image-stream queries on the 4x4 patch grid; Flux: double and single blocks (the image
    tokens of the [text, image] sequence), its grid read from img_ids. SEG acts, one forward a step,
    and the model computes the same afterwards."""
    pipe = tiny_sd3(seed=0) if family == "sd3" else tiny_flux(seed=0)
    pipe.set_progress_bar_config(disable=True)
    gp = GuidedPipeline(pipe)
    layers = "b1" if family == "sd3" else "b1,s0"
    kwargs = {"width": 32, "height": 32, "steps": 2, "seed": 3}
    base = gp.generate(["a cat"], guidance=[CFG(3.0)], negative_prompt=["ugly"], decode=False, **kwargs)
    for sigma in (math.inf, 1.0):
        out = gp.generate(
            ["a cat"],
            guidance=[CFG(3.0), SEG(2.0, blur_sigma=sigma, layers=layers)],
            negative_prompt=["ugly"],
            decode=False,
            **kwargs,
        )
        assert out.forward_calls == 2
        assert maxdiff(out.latents, base.latents) > 1e-4
    again = gp.generate(["a cat"], guidance=[CFG(3.0)], negative_prompt=["ugly"], decode=False, **kwargs)
    assert torch.equal(again.latents, base.latents)


def test_seg_and_query_shuffle_are_chunk_invariant(sd15_f64):
    """Rows split across chunks (max_rows=3 of 6 or 8): each chunk's rows are labelled chunk-relative."""
    from diffguide.guidance import UncondQueryShuffle

    for terms in ([CFG(4.0), SEG(3.0, blur_sigma=1.0)], [CFG(4.0), UncondQueryShuffle(0.7), SEG(2.0)]):
        whole = run(sd15_f64, terms).latents
        assert maxdiff(whole, run(sd15_f64, terms, max_rows=3).latents) <= 1e-10
