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

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import comfy_support
import pytest
import torch
from diffusers import UNet2DConditionModel

from diffguide import CFG, PAG, GuidedPipeline
from diffguide.pipeline import GenerateConfig
from diffguide.sampling.comfy import SD_SCALE_FACTOR
from diffguide.testing import tiny_sd15

STEPS = 8
SEED = 42
TOL = 1e-4  # as the CFG parity tests: float rounding of eps-space vs x0-space combination
# Imported by comfy_api.latest (video types) but never used by the PAG node.
_NODE_STANDINS = ("av",)


def _import_pag_node():
    """``comfy_extras.nodes_pag``, with import-only stand-ins for the missing _NODE_STANDINS,
    removed again afterwards (as comfy_support does for torchvision)."""
    comfy_support.load_comfy()
    missing = [n for n in _NODE_STANDINS if importlib.util.find_spec(n) is None]
    standin_dir = Path(tempfile.mkdtemp(prefix="diffguide-comfy-node-standins-"))
    for name in missing:
        (standin_dir / name).mkdir()
        (standin_dir / name / "__init__.py").write_text(comfy_support._LENIENT_STANDIN)
    sys.path.insert(0, str(standin_dir))
    try:
        import comfy_extras.nodes_pag as nodes_pag
    except Exception as exc:  # ComfyUI core is there: a node that does not import is a failure, not a skip
        raise RuntimeError(
            f"ComfyUI's comfy_extras/nodes_pag.py does not import: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for mod in list(sys.modules):
            if mod.split(".")[0] in missing:
                del sys.modules[mod]
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ not in missing]
        sys.path.remove(str(standin_dir))
        shutil.rmtree(standin_dir, ignore_errors=True)
    return nodes_pag


@pytest.fixture(scope="module")
def pag_node():
    try:
        return _import_pag_node().PerturbedAttentionGuidance
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")


def comfy_pag(node, patcher, scale: float):
    """The MODEL output of the node, executed as ComfyUI's executor runs io-style nodes."""
    cls = node.PREPARE_CLASS_CLONE(None)
    return getattr(cls, cls.FUNCTION)(model=patcher, scale=scale).result[0]


def _mid2_unet():
    """comfy_support.tiny_unet with 2 transformer blocks in the mid block (down/up keep 1)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        transformer_layers_per_block=(1, 2),  # the mid block takes the last level's depth
    )
    return unet.eval().requires_grad_(False)


def _setup(unet):
    pipe = tiny_sd15()
    pipe.unet = unet  # ComfyUI's UNet hard-codes GroupNorm(32): a UNet that both can represent
    return GuidedPipeline(pipe), comfy_support.comfy_model_from_diffusers_unet(unet)


@pytest.fixture(scope="module")
def setup(pag_node):
    return _setup(comfy_support.tiny_unet(seed=0, cross_attention_dim=32))


@pytest.fixture(scope="module")
def setup_mid2(pag_node):
    return _setup(_mid2_unet())


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
    theirs = comfy_support.comfy_ksampler(comfy_pag(node, patcher, s), **kwargs)
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
