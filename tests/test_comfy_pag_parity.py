"""diffguide's PAG in the ``comfy`` noise policy vs ComfyUI's own PerturbedAttentionGuidance node.

The reference is real ComfyUI core (vendor/ComfyUI, installed by scripts/install_comfyui.sh):
the model is patched by ``comfy_extras.nodes_pag.PerturbedAttentionGuidance`` (called the way
ComfyUI's executor calls an io-style node) and sampled by ``comfy.sample.sample`` as the KSampler
node does. Skipped only when ComfyUI cannot be installed or imported (and then failed instead
when DIFFGUIDE_REQUIRE_COMFY=1). ``pytest -s`` prints the measured differences.

What the node does (ComfyUI 0.30): a post-CFG function ``cfg_result + (cond_pred - pag) * scale``
in x0 space, where ``pag`` is a separate forward of the cond rows with an ``attn1`` replace patch
returning ``v`` (so the layer outputs ``to_out(to_v(h))``, the identity attention map of the PAG
paper) keyed by ``("middle", 0)``. ``BasicTransformerBlock.forward`` looks up
``(block, id, transformer_index)`` first and falls back to ``(block, id)``, so that key patches
every transformer block of every SpatialTransformer of the middle block: diffguide's ``mid``.
"""

from __future__ import annotations

import comfy_support
import pytest
import torch
from comfy_nodes_support import import_comfy_extra, run_io_node

from diffguide import CFG, PAG, GuidedPipeline
from diffguide.pipeline import GenerateConfig
from diffguide.sampling.comfy import SD_SCALE_FACTOR
from diffguide.testing import tiny_sd15

STEPS = 8
SEED = 42
TOL = 1e-4  # as the CFG parity tests: float rounding of eps-space vs x0-space combination


@pytest.fixture(scope="module")
def pag_node():
    try:
        return import_comfy_extra("nodes_pag").PerturbedAttentionGuidance
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")


def _setup(unet):
    pipe = tiny_sd15()
    pipe.unet = unet  # ComfyUI's UNet hard-codes GroupNorm(32): a UNet that both can represent
    return GuidedPipeline(pipe), comfy_support.comfy_model_from_diffusers_unet(unet)


@pytest.fixture(scope="module")
def setup(pag_node):
    return _setup(comfy_support.tiny_unet(seed=0, cross_attention_dim=32))


@pytest.fixture(scope="module")
def setup_mid2(pag_node):
    # 2 transformer blocks in the mid block (down/up keep 1)
    return _setup(
        comfy_support.tiny_unet(seed=0, cross_attention_dim=32, transformer_layers_per_block=(1, 2))
    )


def _run_both(gp, patcher, node, prompts, negatives, w, s, layers="mid", plain=True):
    """(diffguide [CFG(w), PAG(s, layers)] result, ComfyUI KSampler + PAG node latents,
    ComfyUI KSampler without the node or None), latents in model space."""
    cfg = GenerateConfig.create(
        prompts,
        negatives,
        guidance=[CFG(w), PAG(s, layers=layers)],
        steps=STEPS,
        seed=SEED,
        noise="comfy",
        schedule="normal",
    )
    cond, uncond = gp.encode(cfg, 32, 32)
    ours = gp.generate(cfg, decode=False)
    negative = uncond.embeds if uncond is not None else torch.zeros_like(cond.embeds)
    kwargs = dict(
        seed=SEED,
        steps=STEPS,
        cfg=w,
        positive=cond.embeds,
        negative=negative,
        latent=torch.zeros(len(prompts), 4, 16, 16),
        sampler_name="euler",
        scheduler="normal",
    )
    theirs = comfy_support.comfy_ksampler(run_io_node(node, model=patcher, scale=s), **kwargs)
    if not plain:
        return ours, theirs * SD_SCALE_FACTOR, None
    return ours, theirs * SD_SCALE_FACTOR, comfy_support.comfy_ksampler(patcher, **kwargs) * SD_SCALE_FACTOR


def _max_abs(a, b):
    return (a - b).abs().max().item()


def _magnitude(latents):
    return f"(values up to {latents.abs().max().item():.3g}, model space)"


@pytest.mark.parametrize(
    ("prompts", "negatives"), [(["a cat"], [""]), (["a cat", "a dog"], ["", "ugly"])], ids=["b1", "b2"]
)
def test_pag_node_matches_cfg4_pag2(setup, pag_node, prompts, negatives):
    """KSampler euler/normal, cfg 4, model patched by the PAG node at scale 2 == [CFG(4), PAG(2, mid)]."""
    gp, patcher = setup
    ours, theirs, plain = _run_both(gp, patcher, pag_node, prompts, negatives, 4.0, 2.0)
    err = _max_abs(ours.latents, theirs)
    print(f"PAG node, cfg 4, batch {len(prompts)}: max |ours - ComfyUI| = {err:.3g} {_magnitude(theirs)}")
    assert err <= TOL, f"max abs diff {err:.3g} (model space)"
    assert _max_abs(theirs, plain) > 0.1  # the node really changed ComfyUI's result
    assert [g["method"] for g in ours.manifests[0]["parameters"]["guidance"]] == ["cfg", "pag"]
    # One batched forward per step: rows [u, c, p].
    assert ours.forward_calls == STEPS


def test_pag_node_at_cfg1_batch2(setup, pag_node):
    """cfg 1: ComfyUI skips the uncond pass (cfg_result = cond_pred) but still runs the node's
    post-CFG function, so the result is c + s (c - p), exactly diffguide's PAG without CFG."""
    gp, patcher = setup
    ours, theirs, plain = _run_both(gp, patcher, pag_node, ["a cat", "a dog"], ["", "ugly"], 1.0, 2.0)
    err = _max_abs(ours.latents, theirs)
    print(f"PAG node, cfg 1, batch 2: max |ours - ComfyUI| = {err:.3g} {_magnitude(theirs)}")
    assert err <= TOL, f"max abs diff {err:.3g} (model space)"
    assert _max_abs(theirs, plain) > 0.1


@pytest.mark.parametrize(("layers", "matches"), [("mid", True), ("m0.0", False), ("m0.1", False)])
def test_pag_node_patches_every_mid_transformer_block(setup_mid2, pag_node, layers, matches):
    """With 2 transformer blocks in the mid block, the node's ("middle", 0) patch perturbs both:
    diffguide's ``mid`` (= ``m0``) matches it, either single block (``m0.0``, ``m0.1``) does not."""
    gp, patcher = setup_mid2
    assert len(gp.unet.mid_block.attentions) == 1
    assert len(gp.unet.mid_block.attentions[0].transformer_blocks) == 2
    ours, theirs, _ = _run_both(gp, patcher, pag_node, ["a cat"], [""], 4.0, 2.0, layers, plain=False)
    err = _max_abs(ours.latents, theirs)
    print(f"PAG node, 2 mid blocks, diffguide layers={layers}: max |ours - ComfyUI| = {err:.3g}")
    if matches:
        assert err <= TOL, f"max abs diff {err:.3g} (model space)"
    else:
        assert err > 0.1, f"{layers} unexpectedly matches the node (max abs diff {err:.3g})"
