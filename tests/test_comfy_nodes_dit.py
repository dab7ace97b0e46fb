"""The node pack's PAG, TPG and SLG inside ComfyUI's DiT blocks (Flux, Qwen-Image), in real ComfyUI.

* Tiny Flux (an explicit config, random weights; 2 double + 2 single blocks, batch 2): the PAG
  (both identity readings) and TPG nodes vs an independent reference that makes one extra model
  call per step with the perturbation installed on all its rows (tests/comfy_dit_nodes_support.py);
  the SLG node vs ComfyUI's SkipLayerGuidanceDiT. One model call per step for the nodes.
* Tiny FLUX.1 dev file in ComfyUI's key layout (UNETLoader -> ModelSamplingFlux -> KSampler, batch
  2, FluxGuidance at cfg 1 and on both prompts at cfg 2.5): the PAG (both readings) and TPG nodes
  in ComfyUI vs diffguide's engine on the same weights (converted to diffusers' Flux), comfy noise
  policy, the same explicit blocks ``b1,s0`` on both sides.
* Tiny Qwen-Image (5-D latents [2, 16, 1, 8, 8], with a LoRA): the PAG and TPG nodes in ComfyUI
  vs diffguide's own engine on the diffusers twin (the same weights), comfy noise policy.

Skipped only when ComfyUI cannot be imported (failed instead when DIFFGUIDE_REQUIRE_COMFY=1).
``pytest -s`` prints the measured differences and call counts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from unittest import mock

import comfy_support
import comfy_workflow_support as cws
import pytest
import torch
from comfy_dit_nodes_support import flux_conds, reference_model, tiny_flux_comfy
from comfy_nodes_support import counting, ksample, run_node, slg_models

from diffguide import PAG, TPG
from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS
from diffguide.comfy_workflow import execute, load
from diffguide.errors import ConfigError
from diffguide.guidance import SEG, LayerSkip, PromptShuffle, UncondQueryShuffle
from diffguide.repro.determinism import BATCH_TOLERANCE

TOL = 1e-4
STEPS = 6
KW = dict(seed=3, steps=STEPS, cfg=3.0)


@pytest.fixture(scope="module")
def flux():
    try:
        comfy_support.load_comfy()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    return tiny_flux_comfy(), *flux_conds()


def node(name):
    return NODE_CLASS_MAPPINGS[f"Diffguide{name}"]


def err(a, b):
    return (a - b).abs().max().item()


LATENT = torch.zeros(2, 16, 8, 8)
BLOCKS = {("double", 1), ("single", 0)}  # the nodes' "b1,s0"
FLUX_CASES = {
    "PAG diagonal": ("PAG", "identity", {"semantics": "diagonal"}),
    "PAG value": ("PAG", "identity", {"semantics": "value"}),
    "TPG": ("TPG", "shuffle", {}),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_node_vs_extra_call_reference(flux, case):
    patcher, pos, neg = flux
    name, kind, extra = FLUX_CASES[case]
    model, listing = run_node(node(name), patcher, scale=2.0, layers="b1,s0", **extra)
    with counting(patcher) as calls:
        ours = ksample(model, pos, neg, LATENT, **KW)
    ref_model = reference_model(patcher, 2.0, BLOCKS, kind, semantics=extra.get("semantics", ""), seed=3)
    with counting(patcher) as ref_calls:
        ref = ksample(ref_model, pos, neg, LATENT, **KW)
    d = err(ours, ref)
    print(f"Flux {case} node vs extra-call reference: {d:.3g} (|x| up to {ref.abs().max():.3g}); "
          f"calls {calls} vs {ref_calls}")  # fmt: skip
    assert d <= TOL
    assert calls == [6] * STEPS  # cond, uncond and the perturbed branch, 2 images each, one call
    assert ref_calls == [4, 2] * STEPS
    assert err(ours, ksample(patcher, pos, neg, LATENT, **KW)) > 1e-2  # the perturbation acts
    assert listing.endswith(
        "transformer_blocks.1 -> double_block.1\nsingle_transformer_blocks.0 -> single_block.0"
    )


def test_flux_slg_node_vs_comfyui_skip_layer_guidance(flux):
    """Flux's blocks add to their inputs in place: the skipped rows are kept from before the block."""
    patcher, pos, neg = flux
    theirs_model, ours_model, _ = slg_models(
        patcher, end_percent=0.6, double_layers="1", single_layers="0", layers="b1,s0"
    )
    theirs = ksample(theirs_model, pos, neg, LATENT, **KW)
    with counting(patcher) as calls:
        ours = ksample(ours_model, pos, neg, LATENT, **KW)
    d = err(ours, theirs)
    print(f"Flux SLG node vs SkipLayerGuidanceDiT: {d:.3g}; calls {calls}")
    assert d <= TOL
    assert len(calls) == STEPS and 6 in calls
    assert err(theirs, ksample(patcher, pos, neg, LATENT, **KW)) > 1e-2


SPLIT_STACKS = [
    "pag:scale=2,layers=b1\ntpg:scale=1,layers=s0-1",
    "seg:scale=2,blur_sigma=1,layers=b1,s0\ntpg:scale=1,layers=s0-1,permutation=shared",
]


@pytest.mark.parametrize("guides", SPLIT_STACKS)
def test_flux_forced_sub_batch_split_equals_unsplit(flux, guides):
    """One chunk (2 rows) per call: each branch's perturbation finds its rows (SEG's blur also its
    grid, a shared TPG permutation its generator) in the call that holds them."""
    patcher, pos, neg = flux
    model, _ = run_node(NODE_CLASS_MAPPINGS["DiffguideGuidanceStack"], patcher, guides=guides)
    with counting(patcher) as whole_calls:
        whole = ksample(model, pos, neg, LATENT, **KW)
    with (
        mock.patch.object(type(patcher), "get_free_memory", lambda self, device=None: 1.0),
        counting(patcher) as calls,
    ):
        split = ksample(model, pos, neg, LATENT, **KW)
    print(
        f"Flux forced split ({len(calls)} calls of {sorted(set(calls))} rows) vs one call: {err(split, whole):.3g}"
    )
    assert whole_calls == [8] * STEPS and calls == [2] * (4 * STEPS)
    assert err(split, whole) <= (BATCH_TOLERANCE * (1 + whole.abs())).min().item()
    assert err(whole, ksample(patcher, pos, neg, LATENT, **KW)) > 1e-2


# ------------------------------------------------------------------------------------------------
# Qwen-Image: the nodes in ComfyUI vs diffguide's engine on the same weights
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    try:
        cws.load_comfy_nodes()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    models = cws.make_models_dir(tmp_path_factory.mktemp("qwen-models"))
    wf = cws.qwen_workflow(
        models, cfgnorm=None, steps=STEPS
    )  # UNETLoader -> LoRA 0.8 -> shift 3.1 -> KSampler
    wf["7"]["inputs"]["batch_size"] = 2
    return models, wf


def case(node_name: str, term: type, **inputs):
    """(node, the diffguide term, the node's inputs): the node's inputs are the term's own fields."""
    return node_name, term(**inputs), inputs


def shared_cases(layers: str) -> dict:
    """The perturbations every DiT family runs alike, on the blocks ``layers``."""
    return {
        f"TPG {layers} shared": case("TPG", TPG, scale=2.0, layers=layers, permutation="shared"),
        f"LayerSkip {layers} attn": case("LayerSkip", LayerSkip, scale=2.0, layers=layers, mode="attn"),
        f"SEG {layers} sigma 1": case("SEG", SEG, scale=2.0, blur_sigma=1.0, layers=layers),
        f"UncondQueryShuffle {layers} 0.7": case(
            "UncondQueryShuffle", UncondQueryShuffle, strength=0.7, layers=layers
        ),
    }


QWEN_CASES = {  # node, the diffguide term, the node's inputs
    "PAG diagonal b1": case("PAG", PAG, scale=2.0, layers="b1"),
    "PAG value b0": case("PAG", PAG, scale=2.0, layers="b0", semantics="value"),
    "TPG b0-1": case("TPG", TPG, scale=2.0, layers="b0-1"),
    "PromptShuffle": case("PromptShuffle", PromptShuffle, scale=2.0),
    "LayerSkip b1": case("LayerSkip", LayerSkip, scale=2.0, layers="b1"),
    "LayerSkip b0-1 ff": case("LayerSkip", LayerSkip, scale=2.0, layers="b0-1", mode="ff"),
    **shared_cases("b0-1"),
}


def rows_per_call(name):
    """cond + uncond (+ the perturbed branch), 2 images each; the uncond query shuffle acts on
    ComfyUI's own uncond rows and adds none."""
    return 4 if name == "UncondQueryShuffle" else 6


def node_vs_engine(models, wf, name, term, inputs, tmp_path, files=None):
    """The workflow ``wf`` + the pack's node before KSampler, in ComfyUI, vs diffguide's engine
    running the same workflow with ``term`` added; also ComfyUI's model-call rows per step.
    ``files``: the conditioning files standing for text-encode nodes on diffguide's side."""
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    run = load(path, models, files)
    run = replace(run, config=replace(run.config, guidance=(*run.config.guidance, term)))
    ours = execute(run)
    assert ours.result.forward_calls == STEPS
    calls: list[int] = []

    def apply(linked):
        patcher = linked["model"]
        patcher.model.diffusion_model.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
        return run_node(node(name), patcher, **inputs)[:1]

    with_node = json.loads(json.dumps(wf))
    with_node["90"] = {"class_type": f"Diffguide{name}", "inputs": {"model": wf["8"]["inputs"]["model"]}}
    with_node["8"]["inputs"]["model"] = ["90", 0]
    cws.EXTRA_NODES[f"Diffguide{name}"] = apply
    try:
        theirs = cws.comfy_execute(with_node, models)
    finally:
        del cws.EXTRA_NODES[f"Diffguide{name}"]
    assert theirs.shape == ours.latents.shape
    assert err(cws.comfy_execute(wf, models), theirs) > 1e-2  # the node changes ComfyUI's result
    return err(ours.latents, theirs), theirs, calls


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen_image_node_equals_diffguide_engine(qwen, tmp_path, case):
    models, wf = qwen
    name, term, inputs = QWEN_CASES[case]
    d, theirs, calls = node_vs_engine(models, wf, name, term, inputs, tmp_path)
    print(f"Qwen-Image {case}: node in ComfyUI vs diffguide engine {d:.3g} (|latent| up to "
          f"{theirs.abs().max():.3g}); ComfyUI calls {calls}")  # fmt: skip
    assert theirs.shape == (2, 16, 1, 8, 8)
    assert d <= TOL
    assert calls == [rows_per_call(name)] * STEPS


@pytest.fixture(scope="module")
def sd3(qwen, tmp_path_factory):
    models = cws.make_sd3_models_dir(tmp_path_factory.mktemp("sd3-models"))
    wf = cws.sd3_workflow(models, slg=False, steps=STEPS)  # UNETLoader -> ModelSamplingSD3 -> KSampler
    wf["7"]["inputs"]["batch_size"] = 2
    return models, wf


SD3_CASES = {
    "PAG diagonal b0": case("PAG", PAG, scale=2.0, layers="b0"),
    "PAG value b1": case("PAG", PAG, scale=2.0, layers="b1", semantics="value"),
    "TPG b0-1": case("TPG", TPG, scale=2.0, layers="b0-1"),
    "SEG b1 sigma inf": case("SEG", SEG, scale=2.0, layers="b1"),
    "LayerSkip b0-1 ff": case("LayerSkip", LayerSkip, scale=2.0, layers="b0-1", mode="ff"),
    **shared_cases("b0-1"),
}


@pytest.mark.parametrize("case", list(SD3_CASES))
def test_sd3_node_equals_diffguide_engine(sd3, tmp_path, case):
    """SD3's MMDiT orders its joint sequence [text, image] in ComfyUI, [image, text] in diffusers:
    the identity attention finds the image tokens on each side."""
    models, wf = sd3
    name, term, inputs = SD3_CASES[case]
    d, theirs, calls = node_vs_engine(models, wf, name, term, inputs, tmp_path)
    print(f"SD3 {case}: node in ComfyUI vs diffguide engine {d:.3g} (|latent| up to "
          f"{theirs.abs().max():.3g}); ComfyUI calls {calls}")  # fmt: skip
    assert theirs.shape == (2, 16, 16, 16)
    assert d <= TOL
    assert calls == [rows_per_call(name)] * STEPS


# ------------------------------------------------------------------------------------------------
# Flux: the nodes in ComfyUI vs diffguide's engine on the same weights (a ComfyUI-layout file that
# diffguide converts to diffusers' FluxTransformer2DModel)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    """A tiny FLUX.1 dev file in ComfyUI's key layout; ComfyUI's CLIPTextEncode returns the
    conditioning file of its text (the DualCLIPLoader stand-in's CLIP), diffguide reads the same
    files by node id."""
    from diffguide.comfy_workflow import load_comfy_conditioning

    try:
        cws.load_comfy_nodes()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    root = cws.make_flux_models_dir(tmp_path_factory.mktemp("flux-models"))
    files = {"a cat": root / "positive.safetensors", "": root / "negative.safetensors"}
    cws.EXTRA_NODES["DualCLIPLoader"] = lambda i: (lambda text: load_comfy_conditioning(files[text])[0],)
    yield root
    cws.EXTRA_NODES.pop("DualCLIPLoader", None)


FLUX_ENGINE_TERMS = {  # node, the diffguide term, the node's inputs; the same explicit blocks
    "PAG diagonal": case("PAG", PAG, scale=2.0, layers="b1,s0"),
    "PAG value": case("PAG", PAG, scale=2.0, layers="b1,s0", semantics="value"),
    "TPG": case("TPG", TPG, scale=2.0, layers="b1,s0"),
}
FLUX_ENGINE_SAMPLING = {  # FluxGuidance on the positive, cfg 1 (no uncond) / on both, cfg 2.5
    "cfg 1": ({"cfg": 1.0}, 4),
    "cfg 2.5 + negative": ({"cfg": 2.5, "guidance": 2.0}, 6),
}


@pytest.mark.parametrize("sampling", list(FLUX_ENGINE_SAMPLING))
@pytest.mark.parametrize("case", list(FLUX_ENGINE_TERMS))
def test_flux_node_equals_diffguide_engine(flux_file, tmp_path, case, sampling):
    """UNETLoader -> ModelSamplingFlux -> the pack's node -> KSampler (batch 2) in ComfyUI vs
    diffguide's engine (comfy noise policy) on the diffusers twin of the same file."""
    name, term, inputs = FLUX_ENGINE_TERMS[case]
    change, rows = FLUX_ENGINE_SAMPLING[sampling]
    wf = cws.flux_workflow(flux_file, steps=STEPS, **change)
    wf["7"]["inputs"]["batch_size"] = 2
    files = cws.flux_conditioning_files(flux_file)
    d, theirs, calls = node_vs_engine(flux_file, wf, name, term, inputs, tmp_path, files)
    print(f"Flux {case}, {sampling}: node in ComfyUI vs diffguide engine {d:.3g} (|latent| up to "
          f"{theirs.abs().max():.3g}); ComfyUI calls {calls}")  # fmt: skip
    assert theirs.shape == (2, 16, 8, 8)
    assert d <= TOL
    assert calls == [rows] * STEPS  # cond (+ uncond) + the perturbed branch, 2 images each, one call


@pytest.fixture(scope="module")
def flux_wf(flux_file):
    """``flux_file`` in a workflow with CFG 2.5 and FluxGuidance on both prompts, batch 2."""
    wf = cws.flux_workflow(flux_file, cfg=2.5, guidance=2.0, steps=STEPS)
    wf["7"]["inputs"]["batch_size"] = 2
    return flux_file, wf


FLUX_ENGINE_CASES = {  # a double and a single block: the single block's queries span [text, image]
    **shared_cases("b1,s0"),
    "LayerSkip b0,s1 ff": case("LayerSkip", LayerSkip, scale=2.0, layers="b0,s1", mode="ff"),
}


@pytest.mark.parametrize("case", list(FLUX_ENGINE_CASES))
def test_flux_nodes_equal_diffguide_engine(flux_wf, tmp_path, case):
    models, wf = flux_wf
    name, term, inputs = FLUX_ENGINE_CASES[case]
    files = cws.flux_conditioning_files(models)
    d, theirs, calls = node_vs_engine(models, wf, name, term, inputs, tmp_path, files)
    print(f"Flux {case}: node in ComfyUI vs diffguide engine {d:.3g} (|latent| up to "
          f"{theirs.abs().max():.3g}); ComfyUI calls {calls}")  # fmt: skip
    assert theirs.shape == (2, 16, 8, 8)
    assert d <= TOL
    assert calls == [rows_per_call(name)] * STEPS


def test_query_shuffle_on_a_dit_needs_layers(flux):
    patcher, _, _ = flux
    with pytest.raises(
        ConfigError, match=r"^query shuffle has no preset for transformers; give its layers \(e\.g\. b7-9\)$"
    ):
        run_node(node("UncondQueryShuffle"), patcher)
