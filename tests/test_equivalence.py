"""diffguide reproduces diffusers' own pipelines on tiny SD1.5 and SDXL models.

Same weights, seeds, scheduler and step count; diffusers gets one CPU generator per image
(``seed + i``), diffguide ``seed=seed``. Final latents (before the VAE) must agree to 1e-4.
The diffusers side always runs on a *new* pipeline object that shares the components, so
the shared fixture pipelines (and the scheduler config diffguide copies) stay untouched.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)

from diffguide import CFG, PAG
from diffguide.perturb.identity_attention import IdentityAttention
from diffguide.sampling.schedulers import SCHEDULERS

TOL = 1e-4
STEPS = 3
SEED = 7
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["ugly", "blurry, low quality"]


@pytest.fixture(params=["sd15", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture
def pair(arch, request):
    """(diffusers pipeline, GuidedPipeline) over the same components."""
    return request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)


def reference_pipe(pipe, scheduler: str = "euler", pag_layers: list[str] | None = None):
    components = dict(pipe.components)
    xl = "text_encoder_2" in components
    if pag_layers is None:
        ref = StableDiffusionXLPipeline(**components) if xl else StableDiffusionPipeline(**components)
    else:
        cls = StableDiffusionXLPAGPipeline if xl else StableDiffusionPAGPipeline
        ref = cls(**components, pag_applied_layers=pag_layers)
    cls_, overrides = SCHEDULERS[scheduler]
    ref.scheduler = cls_.from_config(pipe.scheduler.config, **overrides)
    ref.set_progress_bar_config(disable=True)
    return ref


def diffusers_latents(ref, prompts=PROMPTS, seed=SEED, **kwargs) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    kwargs.setdefault("num_inference_steps", STEPS)
    return ref(prompts, generator=gens, output_type="latent", **kwargs).images


def ours(gp, guidance, negative=NEGATIVES, prompts=PROMPTS, **kwargs) -> torch.Tensor:
    kwargs.setdefault("steps", STEPS)
    return gp.generate(prompts, negative, guidance=guidance, seed=SEED, decode=False, **kwargs).latents


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# --- CFG ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler", ["euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc", "heun", "ddpm"]
)
def test_cfg_matches_diffusers(pair, scheduler):
    pipe, gp = pair
    ref = diffusers_latents(reference_pipe(pipe, scheduler), negative_prompt=NEGATIVES, guidance_scale=5.0)
    got = ours(gp, [CFG(5.0)], scheduler=scheduler)
    assert ref.shape == (2, 4, 16, 16)
    assert maxdiff(ref, got) <= TOL


def test_cfg_guidance_rescale_matches_diffusers(pair):
    pipe, gp = pair
    ref = diffusers_latents(
        reference_pipe(pipe), negative_prompt=NEGATIVES, guidance_scale=5.0, guidance_rescale=0.7
    )
    got = ours(gp, [CFG(5.0, rescale=0.7)])
    assert maxdiff(ref, got) <= TOL
    # the rescale is not a no-op here, so the comparison can see it
    assert maxdiff(got, ours(gp, [CFG(5.0)])) > 1e-2


def test_no_guidance_matches_guidance_scale_1(pair):
    pipe, gp = pair
    ref = diffusers_latents(reference_pipe(pipe), guidance_scale=1.0)
    assert maxdiff(ref, ours(gp, [], negative="")) <= TOL
    assert maxdiff(ref, ours(gp, [CFG(1.0)], negative="")) <= TOL


# --- negative prompts ---------------------------------------------------------------------


def test_default_negative_matches_diffusers_default(pair):
    """diffguide's default negative "" is diffusers' negative_prompt=None: on SDXL (with
    force_zeros_for_empty_prompt) zero embeddings, on SD1.5 the encoded empty string."""
    pipe, gp = pair
    ref = diffusers_latents(reference_pipe(pipe), negative_prompt=None, guidance_scale=5.0)
    assert maxdiff(ref, ours(gp, [CFG(5.0)], negative="")) <= TOL


def test_sdxl_empty_negative_is_zeros_not_encoded_empty_string(sdxl_pipe, sdxl):
    assert sdxl_pipe.config.force_zeros_for_empty_prompt
    explicit = diffusers_latents(reference_pipe(sdxl_pipe), negative_prompt=["", ""], guidance_scale=5.0)
    got = ours(sdxl, [CFG(5.0)], negative="")
    # diffusers encodes an explicit "" (not zeros); diffguide treats "" as "no negative prompt"
    assert maxdiff(explicit, got) > 1e-3


def test_mixed_negative_list_matches_diffusers(pair):
    """A list with one empty entry is encoded entry by entry on both sides (no zeros)."""
    pipe, gp = pair
    negatives = ["", "blurry"]
    ref = diffusers_latents(reference_pipe(pipe), negative_prompt=negatives, guidance_scale=5.0)
    assert maxdiff(ref, ours(gp, [CFG(5.0)], negative=negatives)) <= TOL


def test_single_negative_broadcasts_like_diffusers(pair):
    pipe, gp = pair
    ref = diffusers_latents(reference_pipe(pipe), negative_prompt=["ugly", "ugly"], guidance_scale=5.0)
    assert maxdiff(ref, ours(gp, [CFG(5.0)], negative="ugly")) <= TOL


# --- PAG ----------------------------------------------------------------------------------

# (arch, diffusers pag_applied_layers entry, diffguide layer spec)
PAG_LAYERS = [
    ("sd15", "mid", "mid"),
    ("sd15", "down_blocks.0.attentions.0", "d0"),  # the tiny SD1.5's only down unit
    ("sdxl", "mid", "mid"),
    ("sdxl", "down_blocks.1.attentions.0", "d0"),  # SDXL's down_blocks.0 has no attention
    ("sdxl", "down_blocks.1.attentions.0", "down_blocks.1.attentions.0"),
]
# (guidance_scale, pag_adaptive_scale): with CFG, without CFG, adaptive (reaches 0 at the end)
PAG_MODES = [(5.0, 0.0), (1.0, 0.0), (5.0, 0.004)]


def diffusers_pag_targets(ref, **kwargs) -> list[str]:
    """The attention layers diffusers' PAG pipeline actually perturbs (seen during its run)."""
    seen: list[str] = []

    def on_step(pipe, i, t, cb_kwargs):
        if i == 0:
            procs = pipe.unet.attn_processors
            seen.extend(k.removesuffix(".processor") for k, v in procs.items() if "PAG" in type(v).__name__)
        return cb_kwargs

    diffusers_latents(ref, num_inference_steps=1, callback_on_step_end=on_step, **kwargs)
    return sorted(seen)


@pytest.mark.parametrize(("arch", "dl", "ol"), PAG_LAYERS, ids=[f"{a}-{o}" for a, _, o in PAG_LAYERS])
def test_pag_layers_are_diffusers_layers(arch, dl, ol, pair):
    pipe, _ = pair
    ref = reference_pipe(pipe, pag_layers=[dl])
    expected = diffusers_pag_targets(ref, negative_prompt=NEGATIVES, guidance_scale=5.0, pag_scale=3.0)
    assert expected, "diffusers perturbed nothing"
    assert sorted(IdentityAttention(ol).targets(pipe.unet)) == expected


# every layer choice with and without CFG; the adaptive scale on the mid block
PAG_CASES = [(*layers, 5.0, 0.0) for layers in PAG_LAYERS]
PAG_CASES += [(*layers, 1.0, 0.0) for layers in PAG_LAYERS if layers[2] != "down_blocks.1.attentions.0"]
PAG_CASES += [(*layers, 5.0, 0.004) for layers in PAG_LAYERS if layers[2] == "mid"]


@pytest.mark.parametrize(
    ("arch", "dl", "ol", "w", "adaptive"),
    PAG_CASES,
    ids=[f"{a}-{o}-cfg{w:g}-ad{ad:g}" for a, _, o, w, ad in PAG_CASES],
)
def test_pag_matches_diffusers(arch, dl, ol, w, adaptive, pair):
    """Adaptive 0.004 over timesteps 667, 334, 1 gives PAG scales 1.668, 0.336, 0."""
    pipe, gp = pair
    ref = reference_pipe(pipe, pag_layers=[dl])
    expected = diffusers_latents(
        ref, negative_prompt=NEGATIVES, guidance_scale=w, pag_scale=3.0, pag_adaptive_scale=adaptive
    )
    terms = ([CFG(w)] if w != 1.0 else []) + [PAG(3.0, layers=ol, adaptive_scale=adaptive)]
    assert maxdiff(expected, ours(gp, terms)) <= TOL
    # the shared UNet is back to its plain processors (after diffusers' run and ours)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_pag_changes_the_result(pair):
    """So that the PAG comparisons above can see a wrong perturbation."""
    _, gp = pair
    cfg_only = ours(gp, [CFG(5.0)], steps=2)
    for layers in ("mid", "d0"):
        assert maxdiff(ours(gp, [CFG(5.0), PAG(3.0, layers=layers)], steps=2), cfg_only) > 1e-2


def test_pag_with_rescale_matches_diffusers(sdxl_pipe, sdxl):
    ref = reference_pipe(sdxl_pipe, pag_layers=["mid"])
    expected = diffusers_latents(
        ref, negative_prompt=NEGATIVES, guidance_scale=5.0, pag_scale=2.0, guidance_rescale=0.5
    )
    got = ours(sdxl, [CFG(5.0, rescale=0.5), PAG(2.0)])
    assert maxdiff(expected, got) <= TOL
