"""diffguide's ComfyUI node pack run inside real ComfyUI (vendor/ComfyUI) on tiny SDXL and SD3.

Skipped only when ComfyUI cannot be installed or imported (failed instead when
DIFFGUIDE_REQUIRE_COMFY=1). ``pytest -s`` prints the measured differences and call counts.
"""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import comfy_support
import pytest
import torch
from comfy_nodes_support import (
    counting,
    import_comfy_extra,
    ksample,
    run_io_node,
    run_node,
    sdxl_cond,
    sdxl_twin,
    slg_models,
    tiny_sd3_comfy,
)

from diffguide import CFG, PAG, TPG, GuidedPipeline
from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS, mappings
from diffguide.comfy_nodes.nodes import supported
from diffguide.errors import ConfigError, LayerSpecError
from diffguide.guidance import REGISTRY
from diffguide.pipeline import GenerateConfig
from diffguide.repro.determinism import BATCH_TOLERANCE
from diffguide.testing import tiny_sdxl

TOL = 1e-4  # model space, as the other ComfyUI parity tests
STEPS, SEED, W = 6, 0, 3.0
SDXL_SCALE = 0.13025  # ComfyUI's SDXL latent scale: LATENT -> model space
PROMPTS, NEGATIVES = ["a cat", "a dog"], ["", "ugly"]


@pytest.fixture(scope="module")
def comfy():
    try:
        return comfy_support.load_comfy()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")


@pytest.fixture(scope="module")
def sdxl(comfy):
    gp = GuidedPipeline(tiny_sdxl())
    cfg = GenerateConfig.create(PROMPTS, NEGATIVES, guidance=[CFG(W)], steps=STEPS, seed=SEED, noise="comfy")
    cond, uncond = gp.encode(cfg, 32, 32)
    conds = (
        sdxl_cond(cond.embeds, cond.tensors["pooled"], 32),
        sdxl_cond(uncond.embeds, uncond.tensors["pooled"], 32),
    )
    return gp, sdxl_twin(gp.unet), conds


def node(name):
    return NODE_CLASS_MAPPINGS[f"Diffguide{name}"]


def sample(patcher, conds, cfg=W):
    return ksample(patcher, *conds, torch.zeros(2, 4, 16, 16), seed=SEED, steps=STEPS, cfg=cfg) * SDXL_SCALE


def diffguide_run(gp, *terms):
    cfg = GenerateConfig.create(
        PROMPTS,
        NEGATIVES,
        guidance=[CFG(W), *terms],
        steps=STEPS,
        seed=SEED,
        noise="comfy",
        schedule="normal",
    )
    return gp.generate(cfg, decode=False)


def err(a, b):
    return (a - b).abs().max().item()


def test_pag_node_vs_comfyui_pag_node_sdxl_one_call(sdxl):
    gp, twin, conds = sdxl
    theirs_model = run_io_node(
        import_comfy_extra("nodes_pag").PerturbedAttentionGuidance, model=twin, scale=2.0
    )
    with counting(twin) as theirs_calls:
        theirs = sample(theirs_model, conds)
    ours_model, listing = run_node(node("PAG"), twin, scale=2.0)
    with counting(twin) as ours_calls:
        ours = sample(ours_model, conds)
    d = err(ours, theirs)
    print(f"SDXL PAG node vs ComfyUI PAG: {d:.3g}; calls {len(ours_calls)} vs {len(theirs_calls)}")
    assert d <= TOL
    assert err(theirs, sample(twin, conds)) > 0.1  # PAG really acts
    assert ours_calls == [6] * STEPS  # [cond, uncond, pag] x 2 images in one call per step
    assert theirs_calls == [4, 2] * STEPS
    assert (
        "mid_block.attentions.0.transformer_blocks.0.attn1 -> middle_block.1.transformer_blocks.0.attn1"
        in listing
    )
    # and it is diffguide's own PAG (comfy noise policy), one batched forward per step either way
    ref = diffguide_run(gp, PAG(2.0))
    print(f"SDXL PAG node vs diffguide comfy policy: {err(ours, ref.latents):.3g}")
    assert err(ours, ref.latents) <= TOL and ref.forward_calls == STEPS


def test_tpg_node_equals_diffguide_comfy_policy_sdxl(sdxl):
    gp, twin, conds = sdxl
    model, listing = run_node(node("TPG"), twin, scale=2.0)
    with counting(twin) as calls:
        ours = sample(model, conds)
    ref = diffguide_run(gp, TPG(2.0))
    d = err(ours, ref.latents)
    print(f"SDXL TPG node vs diffguide comfy policy: {d:.3g} (values up to {ref.latents.abs().max():.3g})")
    assert d <= TOL
    assert calls == [6] * STEPS
    assert err(ours, sample(twin, conds)) > 0.1
    assert listing.startswith("# tpg (shuffle): down_blocks.1: 4 module(s)")


def test_slg_node_vs_comfyui_skip_layer_guidance_sd3(comfy):
    patcher = tiny_sd3_comfy()
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(2, 8, 32, generator=g), {"pooled_output": torch.randn(2, 32, generator=g)}]]
    neg = [[torch.randn(2, 8, 32, generator=g), {"pooled_output": torch.randn(2, 32, generator=g)}]]
    kw = dict(seed=5, steps=STEPS, cfg=4.0)
    latent = torch.zeros(2, 16, 8, 8)
    theirs_model, ours_model, listing = slg_models(
        patcher, end_percent=0.5, double_layers="1", single_layers="", layers="b1"
    )
    with counting(patcher) as theirs_calls:
        theirs = ksample(theirs_model, pos, neg, latent, **kw)
    with counting(patcher) as ours_calls:
        ours = ksample(ours_model, pos, neg, latent, **kw)
    d = err(ours, theirs)
    print(f"SD3 SLG node vs SkipLayerGuidanceDiT: {d:.3g}; calls {ours_calls} vs {theirs_calls}")
    assert d <= TOL
    assert err(theirs, ksample(patcher, pos, neg, latent, **kw)) > 1e-2
    assert len(ours_calls) == STEPS and sorted(set(ours_calls)) == [4, 6]  # 6 rows while SLG is on
    assert len(theirs_calls) == STEPS + ours_calls.count(6)  # ComfyUI: one extra call per SLG step
    assert listing.endswith("transformer_blocks.1 -> double_block.1")


def _recorder(seen):
    def post_cfg(args):
        seen.append(args["denoised"].clone())
        return args["denoised"]

    return post_cfg


def test_stack_pag_tpg_and_foreign_patches_in_order(sdxl):
    gp, twin, conds = sdxl
    nodes_cfg = import_comfy_extra("nodes_cfg")
    pag, _ = run_node(node("PAG"), twin, scale=2.0)
    chain, _ = run_node(node("TPG"), pag, scale=1.0)
    stack, listing = run_node(
        NODE_CLASS_MAPPINGS["DiffguideGuidanceStack"], twin, guides="pag:scale=2\ntpg:scale=1"
    )
    assert (
        listing.startswith("# pag (identity): mid: 2 module(s)")
        and "# tpg (shuffle): down_blocks.1" in listing
    )
    with counting(twin) as calls:
        chained = sample(chain, conds)
    assert calls == [8] * STEPS  # cond, uncond, pag, tpg in one call per step
    assert err(chained, sample(stack, conds)) <= TOL  # the same sum, added in another order
    ref = diffguide_run(gp, PAG(2.0), TPG(1.0))
    print(f"SDXL PAG+TPG chain vs diffguide [CFG, PAG, TPG]: {err(chained, ref.latents):.3g}")
    assert err(chained, ref.latents) <= TOL
    # a foreign post-CFG function between PAG and TPG sees the result after PAG, before TPG
    seen_mid, seen_end = [], []
    mid = pag.clone()
    mid.set_model_sampler_post_cfg_function(_recorder(seen_mid))
    mid, _ = run_node(node("TPG"), mid, scale=1.0)
    after_pag = pag.clone()
    after_pag.set_model_sampler_post_cfg_function(_recorder(seen_end))
    sample(mid, conds)
    sample(after_pag, conds)
    assert torch.equal(seen_mid[0], seen_end[0])
    # CFGNorm after the pack's terms differs from CFGNorm before them: the order is kept
    norm_after = run_io_node(nodes_cfg.CFGNorm, model=chain, strength=0.5)
    norm_first = run_io_node(nodes_cfg.CFGNorm, model=twin, strength=0.5)
    norm_first, _ = run_node(node("TPG"), run_node(node("PAG"), norm_first, scale=2.0)[0], scale=1.0)
    a, b = sample(norm_after, conds), sample(norm_first, conds)
    assert err(a, chained) > 1e-2 and err(b, chained) > 1e-2 and err(a, b) > 1e-3
    # RescaleCFG (a sampler_cfg_function) stays in place and still acts under the pack's terms
    rescale = import_comfy_extra("nodes_model_advanced").RescaleCFG
    resc = (
        rescale().patch(twin, 0.7)[0]
        if hasattr(rescale, "patch")
        else run_io_node(rescale, model=twin, multiplier=0.7)
    )
    fn = resc.model_options["sampler_cfg_function"]
    both, _ = run_node(node("PAG"), resc, scale=2.0)
    assert both.model_options["sampler_cfg_function"] is fn
    assert err(sample(both, conds), sample(pag, conds)) > 1e-2


def test_bypass_leaves_no_patch_behind(sdxl):
    _, twin, conds = sdxl
    before = sample(twin, conds)
    options = repr(sorted(twin.model_options))
    patched, _ = run_node(node("PAG"), twin, scale=2.0)
    patched, _ = run_node(node("TPG"), patched, scale=1.0)
    sample(patched, conds)
    assert repr(sorted(twin.model_options)) == options
    assert "diffguide" not in twin.model_options.get("transformer_options", {})
    assert not twin.get_wrappers("calc_cond_batch", "diffguide")
    assert "sampler_post_cfg_function" not in twin.model_options
    assert torch.equal(sample(twin, conds), before)  # the input model samples as before, bit for bit


def test_forced_sub_batch_split_equals_unsplit(sdxl):
    _, twin, conds = sdxl
    model, _ = run_node(
        NODE_CLASS_MAPPINGS["DiffguideGuidanceStack"], twin, guides="pag:scale=2\ntpg:scale=1"
    )
    whole = sample(model, conds)
    with (
        mock.patch.object(type(twin), "get_free_memory", lambda self, device=None: 1.0),
        counting(twin) as calls,
    ):
        split = sample(model, conds)
    print(f"forced split (calls of {sorted(set(calls))} rows) vs one call: {err(split, whole):.3g}")
    assert calls == [2] * (4 * STEPS)  # each branch alone
    # 2-row vs 8-row kernels round differently: diffguide's batch-vs-single bound (docs/reproducibility.md)
    bound = (BATCH_TOLERANCE * (1 + whole.abs())).min().item()
    assert err(split, whole) <= bound
    # a wrong row assignment would be far off: PAG and TPG rows swapped or unperturbed differ by > 0.1
    assert err(whole, sample(twin, conds)) > 0.1


def test_fallback_extra_call_when_calc_cond_batch_is_replaced(sdxl):
    """A foreign sampler_calc_cond_batch_function that evaluates conds one by one: the pack's rows
    cannot join it, so the PAG node makes one extra call per step, with the same result."""
    import comfy.samplers

    _, twin, conds = sdxl
    model, _ = run_node(node("PAG"), twin, scale=2.0)
    whole = sample(model, conds)

    def one_by_one(args):
        return [comfy.samplers.calc_cond_batch(args["model"], [c], args["input"], args["sigma"], args["model_options"])[0]
                if c is not None else None for c in args["conds"]]  # fmt: skip

    foreign = model.clone()
    foreign.set_model_sampler_calc_cond_batch_function(one_by_one)
    with counting(twin) as calls:
        out = sample(foreign, conds)
    assert calls == [2, 2, 2] * STEPS
    assert err(out, whole) <= TOL


def test_node_errors_are_one_line(sdxl, comfy):
    _, twin, _ = sdxl
    with pytest.raises(LayerSpecError, match=r"^layer 'd7': no attention unit d7\. Valid: down, mid, up"):
        run_node(node("PAG"), twin, layers="d7")
    with pytest.raises(
        LayerSpecError, match=r"^the SD3 PAG preset 'b13' needs block b13, but this model has 1 joint"
    ):
        run_node(node("PAG"), tiny_sd3_comfy(depth=1))
    with pytest.raises(ConfigError, match=r"^PAG scale must be in \[0, 100\], got -1.0$"):
        run_node(node("PAG"), twin, scale=-1.0)
    with pytest.raises(ConfigError, match=r"^--guide 'nope': unknown guidance method 'nope'; known: cfg, "):
        run_node(NODE_CLASS_MAPPINGS["DiffguideGuidanceStack"], twin, guides="nope")


def test_nodes_come_from_the_registry():
    classes, names = mappings()
    expected = {f"Diffguide{cls.__name__}" for m, cls in REGISTRY.items() if supported(cls)}
    assert {"DiffguidePAG", "DiffguideTPG", "DiffguideSLG", "DiffguideCFG"} <= expected
    assert "DiffguideEmbeddedGuidance" not in classes
    assert set(classes) == (expected - {"DiffguideEmbeddedGuidance"}) | {"DiffguideGuidanceStack"}
    assert names["DiffguidePAG"] == "diffguide PAG"
    spec = classes["DiffguidePAG"].INPUT_TYPES()["required"]
    assert list(spec) == [
        "model", "scale", "layers", "adaptive_scale", "window_sigma_min", "window_sigma_max", "window_start",
        "window_end", "semantics",
    ]  # fmt: skip
    fdg = [c for c in classes.values() if c.__name__ == "DiffguideFDG"]
    if fdg:  # a tuple parameter is a STRING of comma-separated numbers
        assert fdg[0].INPUT_TYPES()["required"]["scales"][0] == "STRING"
    assert spec["semantics"][0] == ["diagonal", "value"]
    assert "one model call per step" in classes["DiffguideTPG"].DESCRIPTION


def test_importing_the_pack_imports_no_comfyui():
    code = (
        f"import sys; sys.path.insert(0, {str(comfy_support.REPO_ROOT)!r}); import importlib; "
        "m = importlib.import_module('comfyui'); assert 'DiffguidePAG' in m.NODE_CLASS_MAPPINGS; "
        "bad = [k for k in sys.modules if k == 'comfy' or k.startswith(('comfy.', 'comfy_extras'))]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cfg_node_at_ksampler_cfg1_equals_comfyui_cfg(sdxl):
    """The generated CFG node with KSampler cfg 1: u is still evaluated (the node turns off
    ComfyUI's cfg-1 shortcut) in the same call, and g = c + (w - 1)(c - u) is ComfyUI's CFG w."""
    _, twin, conds = sdxl
    model, listing = run_node(node("CFG"), twin, scale=W)
    with counting(twin) as calls:
        ours = sample(model, conds, cfg=1.0)
    theirs = sample(twin, conds, cfg=W)
    print(f"CFG node at cfg 1 vs ComfyUI cfg {W}: {err(ours, theirs):.3g}")
    assert calls == [4] * STEPS and listing == "# no perturbed branch"
    assert err(ours, theirs) <= TOL
    assert err(sample(twin, conds, cfg=1.0), theirs) > 0.1


MORE_CASES = {  # node inputs, the diffguide term; every one on its preset layers (SDXL)
    "SEG (blur sigma inf, mid)": ("SEG", {"scale": 2.0}, "seg:scale=2"),
    "SEG (blur sigma 1)": ("SEG", {"scale": 2.0, "blur_sigma": 1.0}, "seg:scale=2,blur_sigma=1"),
    "LayerSkip (mid blocks)": ("LayerSkip", {"scale": 2.0}, "layer_skip:scale=2"),
    "PromptShuffle": ("PromptShuffle", {"scale": 2.0}, "prompt_shuffle:scale=2"),
    "LayerSkip (mid blocks, attn)": (
        "LayerSkip",
        {"scale": 2.0, "mode": "attn"},
        "layer_skip:scale=2,mode=attn",
    ),
    "LayerSkip (mid blocks, ff)": ("LayerSkip", {"scale": 2.0, "mode": "ff"}, "layer_skip:scale=2,mode=ff"),
    "TPG (permutation shared)": (
        "TPG",
        {"scale": 2.0, "permutation": "shared"},
        "tpg:scale=2,permutation=shared",
    ),
    "UncondQueryShuffle (down, 0.7)": (
        "UncondQueryShuffle",
        {"strength": 0.7},
        "uncond_query_shuffle:strength=0.7",
    ),
}


@pytest.mark.parametrize("case", list(MORE_CASES))
def test_more_nodes_equal_diffguide_engine_sdxl(sdxl, case):
    """SEG, LayerSkip and the two TPG variants in ComfyUI's KSampler equal diffguide's engine
    (comfy policy) on the same tiny SDXL; one model call per step (the uncond query shuffle adds
    no rows: it perturbs ComfyUI's own uncond rows)."""
    from diffguide.cli.guide import parse_guide

    gp, twin, conds = sdxl
    name, inputs, guide = MORE_CASES[case]
    model, _ = run_node(node(name), twin, **inputs)
    with counting(twin) as calls:
        ours = sample(model, conds)
    ref = diffguide_run(gp, parse_guide(guide))
    d = err(ours, ref.latents)
    print(f"SDXL {case} node vs diffguide comfy policy: {d:.3g}; calls {calls}")
    assert d <= TOL
    assert calls == [4 if name == "UncondQueryShuffle" else 6] * STEPS
    effect = err(ours, sample(twin, conds))
    if name == "PromptShuffle":  # cross-attention is equivariant in its keys/values and a UNet adds
        assert effect < 1e-3  # no position to text tokens: no effect (tests/test_tpg_variants.py);
    else:  # tests/test_comfy_nodes_dit.py shows it acting on Qwen-Image (rotary text positions)
        assert effect > 1e-2


def test_pag_node_with_a_combined_prompt_vs_comfyui_pag(sdxl):
    """A positive with two entries (ConditioningCombine): ComfyUI evaluates each entry as its own
    chunk of the batch, so the PAG branch has two chunks; both are perturbed (ComfyUI's PAG node
    is the reference) in one call of 10 rows per step."""
    _, twin, (pos, neg) = sdxl
    embeds, meta = pos[0]
    combined = ([*pos, [embeds.flip(0), {**meta, "pooled_output": meta["pooled_output"].flip(0)}]], neg)
    theirs = sample(
        run_io_node(import_comfy_extra("nodes_pag").PerturbedAttentionGuidance, model=twin, scale=2.0),
        combined,
    )
    model, _ = run_node(node("PAG"), twin, scale=2.0)
    with counting(twin) as calls:
        ours = sample(model, combined)
    d = err(ours, theirs)
    print(f"SDXL PAG node vs ComfyUI PAG, two-entry positive: {d:.3g}; calls {calls}")
    assert d <= TOL
    assert calls == [10] * STEPS  # cond x2 entries, uncond, pag x2 entries; 2 images each
    assert err(ours, sample(model, (pos, neg))) > 0.1  # the second entry matters
    tpg, _ = run_node(node("TPG"), twin, scale=2.0)  # a random perturbation: one draw per image
    assert err(sample(tpg, combined), sample(twin, combined)) > 0.1
