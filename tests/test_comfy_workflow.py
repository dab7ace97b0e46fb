"""diffguide.comfy_workflow without ComfyUI: reading and checking workflows (one-line errors naming
node id and class), the run they map to, ComfyUI-form conditioning files, the loader that reads a
transformer's sizes from its weights, and the workflow run = the same run built by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from comfy_workflow_support import (
    QWEN_CONFIG,
    conditioning,
    make_models_dir,
    qwen_workflow,
    tiny_qwen_transformer,
)
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffguide import CFG, CFGNorm, GenerateConfig, GuidedPipeline
from diffguide.cli.main import app
from diffguide.comfy_workflow import (
    WorkflowError,
    comfy_latent_out,
    execute,
    explain,
    load,
    load_comfy_conditioning,
    save_comfy_conditioning,
)
from diffguide.comfy_workflow.conditioning import to_diffguide
from diffguide.comfy_workflow.graph import parse_workflow
from diffguide.comfy_workflow.models import load_diffusion_model
from diffguide.conditioning import ConditioningFile
from diffguide.errors import DiffguideError
from diffguide.guidance import EmbeddedGuidance, RescaleCFG
from diffguide.sampling.comfy import ComfyShift

STEPS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


def write(tmp_path: Path, wf: dict) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    return path


def test_explain_names_terms_schedule_shift_seed_and_noise(models, tmp_path):
    run = load(write(tmp_path, qwen_workflow(models)), models)
    text = "\n".join(explain(run))
    assert "node 3 (ModelSamplingAuraFlow): ModelSamplingDiscreteFlow shift 3.1, multiplier 1" in text
    assert "node 2 (LoraLoaderModelOnly): LoRA tiny_lora.safetensors at strength 0.8" in text
    assert "guidance terms: cfg(scale=4.0, rescale=0.0), cfg_norm(strength=1.0, pre_cfg=False)" in text
    assert "sampler: node 8 (KSampler): euler / simple, 8 steps, cfg 4, seed 12345" in text
    # simple schedule of ModelSamplingDiscreteFlow(3.1): sigma(t) = 3.1 t / (1 + 2.1 t) at t = 1, 7/8, ...
    assert (
        "sigmas (after the shift): 1, 0.955947, 0.902913, 0.837838, 0.756098, 0.65035, 0.508197, 0.306931, 0"
        in text
    )
    assert (
        "noise: comfy policy: one CPU generator seeded 12345 draws the whole [1, 16, 1, 8, 8] batch" in text
    )
    assert '"attention_mask": "tensor[1, 7]", "pooled_output": null' in text
    cfg = run.config
    assert (
        cfg.noise == "comfy" and cfg.scheduler == "euler" and cfg.schedule == "simple" and cfg.seed == 12345
    )
    assert cfg.guidance == (CFG(4.0), CFGNorm(1.0))
    assert cfg.comfy_sampling == ComfyShift("flow", 3.1, 1.0)
    assert run.model.loras == ((models / "loras" / "tiny_lora.safetensors", 0.8),)


def test_ui_format_maps_widgets_like_the_api_format(models, tmp_path):
    api = qwen_workflow(models)
    nodes, links = [], []
    link_id = 0
    for nid, node in api.items():
        inputs, widgets = [], []
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id += 1
                links.append([link_id, int(value[0]), value[1], int(nid), len(inputs), "X"])
                inputs.append({"name": name, "type": "X", "link": link_id})
            else:
                widgets.append(value)
                if name == "seed":
                    widgets.append("fixed")  # control_after_generate
        nodes.append(
            {"id": int(nid), "type": node["class_type"], "inputs": inputs, "widgets_values": widgets}
        )
    nodes.append({"id": 99, "type": "Note", "widgets_values": ["hello"]})
    ui = load(write(tmp_path, {"nodes": nodes, "links": links}), models)
    assert ui.config == load(write(tmp_path, api), models).config


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda wf: wf.update({"9": {"class_type": "FancyUpscale", "inputs": {}}}),
         r"^node 9 \(FancyUpscale\): unsupported node class; diffguide runs CFGNorm, CLIPLoader, .*"),
        (lambda wf: wf["3"]["inputs"].update(model=["42", 0]),
         r"^node 3 \(ModelSamplingAuraFlow\): input 'model' links to node 42, which does not exist$"),
        (lambda wf: wf["2"]["inputs"].update(model=["4", 0]),
         r"^node \d \([A-Za-z]+\): the workflow has a cycle: (\d -> ){3}\d$"),
        (lambda wf: wf["8"]["inputs"].update(positive=["1", 0]),
         r"^node 8 \(KSampler\): input 'positive' expects CONDITIONING, but output 0 of node 1 \(UNETLoader\) is MODEL$"),
        (lambda wf: wf["8"]["inputs"].update(steps="eight"),
         r"^node 8 \(KSampler\): input 'steps' must be an integer, got 'eight'$"),
        (lambda wf: wf["1"]["inputs"].update(unet_name="missing.safetensors"),
         r"^node 1 \(UNETLoader\): model file 'missing.safetensors' not found in .*diffusion_models or .*unet$"),
        (lambda wf: wf["8"]["inputs"].update(sampler_name="lcm"),
         r"^node 8 \(KSampler\): sampler 'lcm' is not supported; one of euler, euler_ancestral, dpmpp_2m, heun$"),
        (lambda wf: wf["8"]["inputs"].update(denoise=1.5),
         r"^node 8 \(KSampler\): denoise must be in \(0, 1\], got 1.5$"),
        (lambda wf: wf["8"]["inputs"].pop("negative"),
         r"^node 8 \(KSampler\): required input 'negative' \(CONDITIONING\) is missing$"),
        (lambda wf: wf["2"]["inputs"].update(model=["1", 3]),
         r"^node 2 \(LoraLoaderModelOnly\): input 'model' links to output 3 of node 1 \(UNETLoader\), which has 1 output\(s\)$"),
    ],
)  # fmt: skip
def test_bad_workflows_are_one_line_errors_naming_node_and_class(models, tmp_path, edit, message):
    wf = qwen_workflow(models)
    edit(wf)
    with pytest.raises(WorkflowError, match=message) as info:
        load(write(tmp_path, wf), models)
    assert "\n" not in str(info.value)


def test_cli_errors_are_one_line_exit_2(models, tmp_path):
    wf = qwen_workflow(models)
    wf["9"] = {"class_type": "FancyUpscale", "inputs": {}}
    res = CliRunner().invoke(app, ["comfy", "explain", str(write(tmp_path, wf)), "--models", str(models)])
    assert res.exit_code == 2
    assert res.output.startswith("error: node 9 (FancyUpscale): unsupported node class")
    assert res.output.count("\n") == 1


def test_not_a_workflow():
    with pytest.raises(WorkflowError, match=r"^not a ComfyUI workflow"):
        parse_workflow({"foo": 1})


def test_comfy_conditioning_keeps_its_metadata(tmp_path):
    cond = conditioning(1, mask_tail=2)
    cond[0][1]["note"] = "from the workflow"
    path = save_comfy_conditioning(tmp_path / "c.safetensors", cond, {"prompt": "a cat"})
    back, meta = load_comfy_conditioning(path)
    assert meta == {"prompt": "a cat"}
    assert torch.equal(back[0][0], cond[0][0])
    assert torch.equal(back[0][1]["attention_mask"], cond[0][1]["attention_mask"])
    assert back[0][1]["pooled_output"] is None and back[0][1]["note"] == "from the workflow"
    c = to_diffguide(back, "test")
    assert torch.equal(c.get("mask"), cond[0][1]["attention_mask"])


def test_comfy_conditioning_pt_only_with_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(conditioning(1), good)
    assert torch.equal(load_comfy_conditioning(good)[0][0][0], conditioning(1)[0][0])

    bad = tmp_path / "bad.pt"
    torch.save([[torch.zeros(1), {"x": Fraction(1, 3)}]], bad)
    with pytest.raises(DiffguideError, match=r"holds arbitrary Python objects; .* weights_only=True$"):
        load_comfy_conditioning(bad)
    with pytest.raises(DiffguideError, match=r"only tensors and JSON values can be saved$"):
        save_comfy_conditioning(tmp_path / "x.safetensors", [[torch.zeros(1), {"x": Fraction(1, 3)}]])
    assert not (tmp_path / "x.safetensors").exists()


def test_loader_reads_the_sizes_from_the_weights(tmp_path):
    t = tiny_qwen_transformer()
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in t.state_dict().items()}
    path = tmp_path / "q.safetensors"
    save_file(sd, str(path), metadata={"config": json.dumps({"axes_dims_rope": [8, 12, 12]})})
    pipe = load_diffusion_model(path, torch.float32)
    cfg = pipe.transformer.config
    assert {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in QWEN_CONFIG
    } == QWEN_CONFIG
    assert all(
        torch.equal(a, b)
        for a, b in zip(pipe.transformer.state_dict().values(), t.state_dict().values(), strict=True)
    )
    save_file(sd, str(path))  # head size 32 without a config: no known rotary axes
    with pytest.raises(DiffguideError, match=r"attention head size 32 has no known rotary axes"):
        load_diffusion_model(path, torch.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"config": json.dumps({"num_layers": 5})})
    with pytest.raises(DiffguideError, match=r"its config says num_layers=5, its weights 2$"):
        load_diffusion_model(bad, torch.float32)


def test_workflow_run_equals_the_run_built_by_hand(models, tmp_path):
    """The workflow is only a front end: the same run through the Python API gives the same tensors."""
    run = load(write(tmp_path, qwen_workflow(models, steps=STEPS)), models)
    ours = execute(run)
    pipe = load_diffusion_model(models / "diffusion_models" / "tiny_qwen.safetensors", torch.float32)
    gp = GuidedPipeline(pipe)
    gp.load_lora(models / "loras" / "tiny_lora.safetensors", 0.8)
    pos, _ = load_comfy_conditioning(models / "positive.safetensors")
    neg, _ = load_comfy_conditioning(models / "negative.safetensors")
    cfg = GenerateConfig.create(
        "a cat", guidance=[CFG(4.0), CFGNorm(1.0)], steps=STEPS, seed=12345, scheduler="euler",
        noise="comfy", schedule="simple", width=64, height=64, comfy_sampling=ComfyShift("flow", 3.1, 1.0),
    )  # fmt: skip
    by_hand = gp.generate(
        cfg, decode=False, conditioning=ConditioningFile(to_diffguide(pos, "p"), to_diffguide(neg, "n"))
    )
    assert torch.equal(ours.result.latents, by_hand.latents)
    assert torch.equal(ours.latents, comfy_latent_out(gp, by_hand.latents, (1, 16, 1, 8, 8)))
    # and the pieces matter: without CFGNorm, or with the LoRA at 1.0, the tensors differ
    plain = gp.generate(
        GenerateConfig.create("a cat", guidance=[CFG(4.0)], **_same(cfg)), decode=False,
        conditioning=ConditioningFile(to_diffguide(pos, "p"), to_diffguide(neg, "n")),
    )  # fmt: skip
    assert (plain.latents - by_hand.latents).abs().max() > 1e-3


def _same(cfg: GenerateConfig) -> dict:
    keys = ("steps", "seed", "scheduler", "noise", "schedule", "width", "height", "comfy_sampling")
    return {k: getattr(cfg, k) for k in keys}


def test_cli_run_writes_comfy_latents_and_manifest(models, tmp_path):
    wf = write(tmp_path, qwen_workflow(models, steps=2))
    out = tmp_path / "o" / "lat.safetensors"
    res = CliRunner().invoke(app, ["comfy", "run", str(wf), "--models", str(models), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"latents [1, 16, 1, 8, 8] -> {out} (2 model forward calls)")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("samples").shape == (1, 16, 1, 8, 8)
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["scheduler"]["config"] == {"prediction_type": "flow", "shift": 3.1, "multiplier": 1.0}
    assert manifest["comfy_workflow"]["sampler_node"] == "8"
    assert manifest["model"]["loras"][0]["scale"] == 0.8


def test_clip_text_encode_needs_conditioning_files_for_unet_workflows(models, tmp_path):
    wf = qwen_workflow(models)
    (models / "text_encoders").mkdir(exist_ok=True)
    (models / "text_encoders" / "qwen_2.5_vl.safetensors").write_bytes(b"")
    wf["9"] = {
        "class_type": "CLIPLoader",
        "inputs": {"clip_name": "qwen_2.5_vl.safetensors", "type": "qwen_image"},
    }
    wf["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["9", 0]}}
    wf["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["9", 0]}}
    path = write(tmp_path, wf)
    with pytest.raises(
        WorkflowError,
        match=r"^node 5 \(CLIPTextEncode\): diffguide cannot run this text encoder \(node 9\); .*--conditioning 5=FILE",
    ):
        load(path, models)
    pos, neg = models / "positive.safetensors", models / "negative.safetensors"
    res = CliRunner().invoke(
        app,
        [
            "comfy",
            "explain",
            str(path),
            "--models",
            str(models),
            "--conditioning",
            f"5={pos}",
            "--conditioning",
            f"6={neg}",
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"positive: {pos} via node 5 (CLIPTextEncode) metadata" in res.output
    a, b = load(path, models, {"5": pos, "6": neg}), load(write(tmp_path, qwen_workflow(models)), models)
    assert replace(a.config, prompts=b.config.prompts, negative_prompts=b.config.negative_prompts) == b.config
    assert a.conditioning is not None and b.conditioning is not None
    assert torch.equal(a.conditioning.cond.get("mask"), b.conditioning.cond.get("mask"))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"pre_cfg": True, "sampler": "dpmpp_2m"}, {"cfgnorm": None, "lora": 1.0}, {"rescale": 0.7}],
)
def test_a_run_written_as_a_workflow_loads_back_to_the_same_run(models, tmp_path, kwargs):
    from diffguide.comfy_workflow import to_workflow

    run = load(write(tmp_path, qwen_workflow(models, **kwargs)), models)
    files = (str(models / "positive.safetensors"), str(models / "negative.safetensors"))
    again = load(write(tmp_path, to_workflow(run, files)), models)
    # the prompts are placeholders naming the conditioning nodes, whose ids differ
    assert (
        replace(again.config, prompts=run.config.prompts, negative_prompts=run.config.negative_prompts)
        == run.config
    )
    assert again.conditioning is not None and run.conditioning is not None
    assert torch.equal(again.conditioning.cond.embeds, run.conditioning.cond.embeds)
    assert again.model == replace(run.model, node=again.model.node)
    assert again.latent_shape == run.latent_shape
    with pytest.raises(WorkflowError, match=r"^only comfy-noise-policy runs can be written"):
        to_workflow(
            replace(run, config=replace(run.config, noise="diffusers", schedule=None, comfy_sampling=None))
        )


def test_manifest_of_a_workflow_run_rebuilds_its_config(models, tmp_path):
    """Replay reads the ModelSampling override back from the manifest."""
    from diffguide.repro.schema import config_from_manifest

    run = load(write(tmp_path, qwen_workflow(models, steps=1)), models)
    manifest = json.loads(json.dumps(execute(run).result.manifests[0]))
    assert config_from_manifest(manifest).comfy_sampling == ComfyShift("flow", 3.1, 1.0)
    assert config_from_manifest(manifest).guidance == run.config.guidance


def test_auraflow_loader_reads_the_sizes_from_the_weights(tmp_path):
    from comfy_workflow_support import make_aura_models_dir

    from diffguide.testing_dit import tiny_auraflow

    root = make_aura_models_dir(tmp_path / "aura")
    pipe = load_diffusion_model(root / "diffusion_models" / "tiny_aura.safetensors", torch.float32)
    want = dict(tiny_auraflow(0).transformer.config)
    got = dict(pipe.transformer.config)
    assert {k: got[k] for k in want if not k.startswith("_")} == {
        k: v for k, v in want.items() if not k.startswith("_")
    }
    sd = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(sd, str(tmp_path / "bare.safetensors"))
    with pytest.raises(
        DiffguideError, match=r"the attention heads of a width-32 AuraFlow are not in its weights"
    ):
        load_diffusion_model(tmp_path / "bare.safetensors", torch.float32)


def test_rescale_cfg_is_comfyuis_cfg_function_right_after_cfg(models, tmp_path):
    """RescaleCFG replaces ComfyUI's CFG function: it comes right after CFG, before post-CFG patches,
    wherever the node sits; on the 5-D video latent its std is per column (columns = latent width)."""
    wf = qwen_workflow(models, rescale=0.7)
    run = load(write(tmp_path, wf), models)
    assert run.config.guidance == (CFG(4.0), RescaleCFG(0.7, columns=8), CFGNorm(1.0))
    assert "node 9 (RescaleCFG): RescaleCFG multiplier 0.7" in "\n".join(explain(run))
    wf["9"]["inputs"]["model"] = ["4", 0]  # after CFGNorm in the graph: still ComfyUI's CFG function
    wf["4"]["inputs"]["model"] = ["3", 0]
    wf["8"]["inputs"]["model"] = ["9", 0]
    assert load(write(tmp_path, wf), models).config.guidance == run.config.guidance
    wf["7"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    assert load(write(tmp_path, wf), models).config.guidance[1] == RescaleCFG(0.7)  # 4-D: per image


def test_the_last_cfg_function_wins_as_in_comfyui(models, tmp_path):
    """RescaleCFG and CFGNorm pre_cfg both set ComfyUI's sampler CFG function: the node applied last
    replaces the other (explain says so), and it comes right after CFG wherever the node sits."""
    wf = qwen_workflow(models, rescale=0.7, pre_cfg=True)  # RescaleCFG (9) -> CFGNorm pre_cfg (4)
    run = load(write(tmp_path, wf), models)
    assert run.config.guidance == (CFG(4.0), CFGNorm(1.0, pre_cfg=True))
    assert "(replaces the CFG function rescale_cfg(multiplier=0.7, columns=0) set before it" in "\n".join(
        explain(run)
    )
    wf["9"]["inputs"]["model"], wf["4"]["inputs"]["model"], wf["8"]["inputs"]["model"] = (
        ["4", 0],
        ["3", 0],
        ["9", 0],
    )
    assert load(write(tmp_path, wf), models).config.guidance == (CFG(4.0), RescaleCFG(0.7, columns=8))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda wf: wf["9"]["inputs"].update(multiplier=1.5),
         r"^node 9 \(RescaleCFG\): multiplier must be in \[0.0, 1.0\], got 1.5$"),
    ],
)  # fmt: skip
def test_rescale_cfg_errors(models, tmp_path, edit, message):
    wf = qwen_workflow(models, rescale=0.7)
    edit(wf)
    with pytest.raises(WorkflowError, match=message):
        load(write(tmp_path, wf), models)


def _flux_guidance(wf: dict, pos: float, neg: float | None) -> dict:
    wf["10"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": pos}}
    wf["8"]["inputs"]["positive"] = ["10", 0]
    if neg is not None:
        wf["11"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": neg}}
        wf["8"]["inputs"]["negative"] = ["11", 0]
    return wf


def test_flux_guidance_is_the_embedded_guidance(models, tmp_path):
    from diffguide.comfy_workflow import to_workflow

    run = load(write(tmp_path, _flux_guidance(qwen_workflow(models), 3.5, 3.5)), models)
    assert run.config.guidance == (CFG(4.0), CFGNorm(1.0), EmbeddedGuidance(3.5))
    text = "\n".join(explain(run))
    assert "embedded guidance 3.5 via node 10 (FluxGuidance)" in text
    assert '"guidance": 3.5' in text  # the conditioning's dict carries it, as ComfyUI's node sets it
    files = (str(models / "positive.safetensors"), str(models / "negative.safetensors"))
    again = load(write(tmp_path, to_workflow(run, files)), models)
    assert again.config.guidance == run.config.guidance
    cfg1 = load(write(tmp_path, _flux_guidance(qwen_workflow(models, cfg=1.0), 2.0, None)), models)
    assert cfg1.config.guidance[-1] == EmbeddedGuidance(2.0)  # cfg 1: the negative is never run
    with pytest.raises(
        WorkflowError,
        match=r"^node 8 \(KSampler\): positive and negative carry different FluxGuidance scales \(3.5, 2.0\); ",
    ):
        load(write(tmp_path, _flux_guidance(qwen_workflow(models), 3.5, 2.0)), models)
    with pytest.raises(DiffguideError) as info:  # Qwen-Image has no guidance embedding
        execute(replace(run, config=replace(run.config, steps=1)))
    assert "\n" not in str(info.value)
    print(f"FluxGuidance on Qwen-Image: {info.value}")


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory) -> Path:
    from comfy_workflow_support import make_sd3_models_dir

    return make_sd3_models_dir(tmp_path_factory.mktemp("sd3"))


def test_skip_layer_guidance_maps_to_slg_comfy_with_the_nodes_sigma_window(sd3_models, tmp_path):
    from comfy_workflow_support import as_dit_node, sd3_workflow

    from diffguide.guidance import Window
    from diffguide.guidance.slg_comfy import SLGComfy

    run = load(write(tmp_path, sd3_workflow(sd3_models, layers="7, 8", start=0.0, end=0.5)), sd3_models)
    # percent_to_sigma of ModelSamplingDiscreteFlow(shift 3): 0 -> 1, 0.5 -> 3 * 0.5 / (1 + 2 * 0.5)
    assert run.config.guidance == (
        CFG(4.0),
        SLGComfy(3.0, "b7,b8", window=Window(sigma_min=0.75, sigma_max=1.0)),
    )
    wf = as_dit_node(sd3_workflow(sd3_models), 0.5)
    wf["4"]["inputs"]["single_layers"] = "2"
    (term,) = load(write(tmp_path, wf), sd3_models).config.guidance[1:]
    assert (term.layers, term.rescaling_scale) == ("b1,s2", 0.5)
    assert load(write(tmp_path, sd3_workflow(sd3_models, layers="")), sd3_models).config.guidance == (
        CFG(4.0),
    )


def _cfgnorm_before_slg(wf: dict) -> dict:
    wf["9"] = {"class_type": "CFGNorm", "inputs": {"model": wf["4"]["inputs"]["model"], "strength": 1.0}}
    wf["4"]["inputs"]["model"] = ["9", 0]
    return wf


def _rescale_before_slg(wf: dict) -> dict:
    wf["9"] = {"class_type": "RescaleCFG", "inputs": {"model": ["3", 0], "multiplier": 0.7}}
    wf["4"]["inputs"]["model"] = ["9", 0]
    return wf


def _dit_without_sampling(wf: dict) -> dict:
    from comfy_workflow_support import as_dit_node

    wf = as_dit_node(wf, 0.0)
    wf["4"]["inputs"]["model"] = ["1", 0]
    return wf


def test_patches_after_a_correction_are_post_cfg_as_in_comfyui(sd3_models, tmp_path):
    """ComfyUI runs post-CFG functions in node order on the running result: an SLG after CFGNorm or
    RescaleCFG (or after an SLG with rescaling) adds its term after their correction (post_cfg);
    an SLG before CFGNorm stays an additive delta that CFGNorm then sees."""
    from comfy_workflow_support import as_dit_node, sd3_workflow

    from diffguide.guidance.slg_comfy import SLGComfy

    def terms(wf):
        return load(write(tmp_path, wf), sd3_models).config.guidance

    window = terms(sd3_workflow(sd3_models))[1].window
    slg = SLGComfy(3.0, "b1", window=window)
    assert terms(_cfgnorm_before_slg(sd3_workflow(sd3_models))) == (
        CFG(4.0), CFGNorm(1.0), replace(slg, post_cfg=True))  # fmt: skip
    assert terms(_rescale_before_slg(sd3_workflow(sd3_models))) == (
        CFG(4.0), RescaleCFG(0.7), replace(slg, post_cfg=True))  # fmt: skip
    wf = sd3_workflow(sd3_models)
    wf["9"] = {"class_type": "CFGNorm", "inputs": {"model": ["4", 0], "strength": 1.0}}
    wf["8"]["inputs"]["model"] = ["9", 0]
    assert terms(wf) == (CFG(4.0), slg, CFGNorm(1.0))  # SLG first: a delta CFGNorm corrects
    wf = as_dit_node(sd3_workflow(sd3_models), 0.5)
    wf["9"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": {**wf["4"]["inputs"], "layers": "0"}}
    del (
        wf["9"]["inputs"]["double_layers"],
        wf["9"]["inputs"]["single_layers"],
        wf["9"]["inputs"]["rescaling_scale"],
    )
    wf["9"]["inputs"]["model"] = ["4", 0]
    wf["8"]["inputs"]["model"] = ["9", 0]
    first, second = terms(wf)[1:]
    assert (first.rescaling_scale, first.post_cfg, second.layers, second.post_cfg) == (0.5, False, "b0", True)
    assert "post_cfg" not in first.describe() and second.describe()["post_cfg"] is True
    assert SLGComfy.from_dict(second.describe()) == second  # manifests rebuild the term


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda wf: wf["4"]["inputs"].update(start_percent=0.6, end_percent=0.2),
         r"^node 4 \(SkipLayerGuidanceSD3\): end_percent 0.2 is before start_percent 0.6$"),
        (lambda wf: wf["4"]["inputs"].update(scale=-1.0),
         r"^node 4 \(SkipLayerGuidanceSD3\): scale must be in \[0.0, 100.0\], got -1$"),
        (_dit_without_sampling,
         r"^node 4 \(SkipLayerGuidanceDiT\): needs a ModelSamplingSD3 or ModelSamplingAuraFlow node before it "),
    ],
)  # fmt: skip
def test_skip_layer_guidance_errors(sd3_models, tmp_path, edit, message):
    from comfy_workflow_support import sd3_workflow

    wf = sd3_workflow(sd3_models)
    edit(wf)
    with pytest.raises(WorkflowError, match=message) as info:
        load(write(tmp_path, wf), sd3_models)
    assert "\n" not in str(info.value)


def test_sd3_loader_reads_the_sizes_from_the_weights(sd3_models):
    pipe = load_diffusion_model(sd3_models / "diffusion_models" / "tiny_sd3.safetensors", torch.float32)
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.joint_attention_dim) == (
        2,
        2,
        64,
        32,
    )
    assert (cfg.pooled_projection_dim, cfg.pos_embed_max_size, cfg.patch_size) == (32, 8, 2)


def test_sdxl_size_keys_become_time_ids_as_comfyui_builds_them():
    pooled = torch.zeros(2, 32)
    cond = to_diffguide([[torch.zeros(2, 7, 32), {"pooled_output": pooled, "width": 96, "crop_h": 8}]], "x")
    assert cond.time_ids.tolist() == [[768.0, 96.0, 8.0, 0.0, 768.0, 96.0]] * 2  # ComfyUI's 768 default
    assert to_diffguide([[torch.zeros(1, 7, 32), {"pooled_output": pooled[:1]}]], "x").time_ids is None


def test_tiny_sd_checkpoint_workflow_runs_with_the_models_own_latent_size(tmp_path):
    """The bundled tiny-sd's VAE downsamples by 4, not ComfyUI's 8: `execute` used to fail with a raw
    reshape error; the run keeps the workflow's pixel size and the model's latent (4 x 8 x 8)."""
    from diffguide import GuidedPipeline
    from diffguide.comfy_workflow import execute
    from diffguide.comfy_workflow import load as load_workflow

    wf = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 3", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 7,
                "steps": 2,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
    }
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "tiny-sd.safetensors").touch()
    (tmp_path / "wf.json").write_text(json.dumps({"prompt": wf}))
    run = load_workflow(tmp_path / "wf.json", tmp_path / "models")
    gp = GuidedPipeline.from_pretrained("tiny-sd")
    out = execute(run, gp)
    assert out.latents.shape == (2, 4, 8, 8)
    ref = gp.generate(run.config, decode=False)
    from diffguide.sampling.comfy import SD_SCALE_FACTOR

    assert torch.equal(out.latents, ref.latents.float() / SD_SCALE_FACTOR)


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory) -> Path:
    from comfy_workflow_support import make_flux_models_dir

    return make_flux_models_dir(tmp_path_factory.mktemp("flux"))


@pytest.mark.parametrize("layout", ["comfy", "diffusers"])
def test_flux_loader_reads_comfyuis_key_layout_and_the_sizes_from_the_weights(tmp_path, layout):
    """A FLUX.1 file in BFL/ComfyUI's names (``.scale`` norms, stacked q/k/v, (shift, scale) final
    modulation) or diffusers' names loads into the same diffusers model (not misread as SD3)."""
    from comfy_workflow_support import FLUX_CONFIG, diffusers_flux_to_bfl, tiny_flux_transformer

    ref = tiny_flux_transformer()
    sd = ref.state_dict()
    if layout == "comfy":
        sd = diffusers_flux_to_bfl(sd, "model.diffusion_model.")
        assert "double_blocks.0.img_attn.norm.query_norm.scale" in "".join(sd)
    path = tmp_path / "flux.safetensors"
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"config": json.dumps(FLUX_CONFIG)}
    )
    pipe = load_diffusion_model(path, torch.float32)
    assert type(pipe).__name__ == "FluxPipeline" and pipe.vae_scale_factor == 8
    config = dict(pipe.transformer.config)
    assert {k: config[k] for k in ("in_channels", "num_layers", "num_single_layers", "num_attention_heads",
                                   "attention_head_dim", "joint_attention_dim", "guidance_embeds")} == {
        "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2,
        "attention_head_dim": 16, "joint_attention_dim": 32, "guidance_embeds": True}  # fmt: skip
    ours = pipe.transformer.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in ref.state_dict().items())


def test_flux_loader_errors(tmp_path):
    from comfy_workflow_support import diffusers_flux_to_bfl, tiny_flux_transformer

    sd = diffusers_flux_to_bfl(tiny_flux_transformer().state_dict())
    path = tmp_path / "flux.safetensors"
    save_file(sd, str(path))  # head size 16 and no config: the rotary axes are unknown
    with pytest.raises(DiffguideError, match=r"attention head size 16 has no known rotary axes"):
        load_diffusion_model(path, torch.float32)
    save_file({**sd, "img_in_extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(
        DiffguideError,
        match=r"^'flux.safetensors': keys a FLUX.1 transformer does not have: \['img_in_extra.weight'\]$",
    ):
        load_diffusion_model(path, torch.float32)
    del sd["single_blocks.1.linear2.bias"]
    save_file(sd, str(path))
    with pytest.raises(
        DiffguideError,
        match=r"^'flux.safetensors': not a FLUX.1 transformer: it lacks single_blocks.1.linear2.bias$",
    ):
        load_diffusion_model(path, torch.float32)


def test_flux_workflow_explain_and_comfy_latent_format(flux_models, tmp_path):
    """ModelSamplingFlux's mu from its width x height; FluxGuidance as the embedded guidance; the
    CLIPTextEncode outputs from --conditioning files; ComfyUI's Flux LATENT is x / 0.3611 + 0.1159;
    without a ModelSamplingFlux node the run samples with ComfyUI's Flux default shift 1.15."""
    from comfy_workflow_support import flux_conditioning_files, flux_workflow

    files = flux_conditioning_files(flux_models)
    run = load(write(tmp_path, flux_workflow(flux_models, steps=2)), flux_models, files)
    assert run.config.comfy_sampling == ComfyShift("flux", 0.5 + 0.65 * (64 * 64 / 256 - 256) / 3840)
    assert run.config.guidance == (CFG(1.0), EmbeddedGuidance(3.5))
    text = "\n".join(explain(run))
    assert "node 3 (ModelSamplingFlux): ModelSamplingFlux, flux time shift mu 0.459375" in text
    result = execute(run)
    assert result.latents.shape == (1, 16, 8, 8)
    assert torch.allclose(result.latents, result.result.latents / 0.3611 + 0.1159)
    plain = load(write(tmp_path, flux_workflow(flux_models, steps=2, node_shift=False)), flux_models, files)
    assert plain.config.comfy_sampling == ComfyShift("flux", 1.15)
    assert (
        "node 1 (UNETLoader): FLUX.1 dev: ComfyUI's default model sampling, flux time shift mu 1.15"
        in "\n".join(explain(plain))
    )
    sampled = execute(plain).result.manifests[0]["parameters"]["comfy_sampling"]
    assert sampled == {"kind": "flux", "shift": 1.15, "multiplier": 1.0}
    with pytest.raises(
        WorkflowError, match=r"^node 5 \(CLIPTextEncode\): diffguide cannot run this text encoder \(node 9\)"
    ):
        load(write(tmp_path, flux_workflow(flux_models)), flux_models)


@pytest.fixture(scope="module")
def sd15_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(models folder, its checkpoints/tiny_sd15.safetensors in the A1111 layout, the diffusers
    folder of the same tiny SD1.5 for --config)."""
    import ldm_export

    from diffguide import testing

    root = tmp_path_factory.mktemp("sd15-file")
    pipe = testing.tiny_sd15(seed=0)
    (root / "checkpoints").mkdir()
    path = root / "checkpoints" / "tiny_sd15.safetensors"
    save_file(ldm_export.sd15_to_ldm(pipe), str(path))
    pipe.save_pretrained(root / "config")
    return root, path, root / "config"


GENERATE = ["--prompt", "a red cat", "--negative-prompt", "blurry", "--steps", "3", "--width", "64",
            "--height", "64", "--noise", "comfy", "--seed", "9"]  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        ["--cfg", "4", "--pag", "2", "--pag-layers", "mid", "--scheduler", "euler_a", "--batch", "2"],
        ["--cfg", "3", "--guide", "rescale_cfg:multiplier=0.5", "--guide", "cfg_norm:strength=0.9",
         "--scheduler", "dpmpp_2m", "--schedule", "karras"],
    ],
    ids=["pag-euler_a-batch2", "rescale-cfgnorm-dpmpp_2m"],
)  # fmt: skip
def test_generate_save_workflow_runs_back_bit_for_bit(sd15_checkpoint, tmp_path, extra):
    """``generate --save-workflow`` writes the comfy-policy run as a workflow; ``comfy run`` on it
    gives the same latents bit for bit (ComfyUI's LATENT = generate's latents / 0.18215)."""
    from diffguide.io import load_latents
    from diffguide.sampling.comfy import SD_SCALE_FACTOR

    models, path, config = sd15_checkpoint
    wf_path, out = tmp_path / "wf.json", tmp_path / "out"
    args = ["generate", "--model", str(path), "--config", str(config), *GENERATE, *extra]
    res = CliRunner().invoke(app, [*args, "-o", str(out), "--save-latents", "--save-workflow", str(wf_path)])
    assert res.exit_code == 0, res.output
    assert str(wf_path) in res.output.splitlines()
    wf = json.loads(wf_path.read_text())
    assert wf["1"] == {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "tiny_sd15.safetensors"},
    }
    patches = {"--pag": "PerturbedAttentionGuidance", "rescale_cfg:multiplier=0.5": "RescaleCFG"}
    classes = {n["class_type"] for n in wf.values()}
    assert {c for flag, c in patches.items() if flag in extra} <= classes and "CLIPTextEncode" in classes
    ours = torch.cat([load_latents(p)[0] for p in sorted(out.glob("*.safetensors"))])
    lat = tmp_path / "comfy.safetensors"
    res = CliRunner().invoke(
        app, ["comfy", "run", str(wf_path), "--models", str(models), "--config", str(config), "-o", str(lat)]
    )
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    samples = load_file(str(lat))["samples"]
    assert samples.shape == ours.shape
    assert torch.equal(samples, ours.float() / SD_SCALE_FACTOR)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--noise", "diffusers"], "only comfy-noise-policy runs can be written as a ComfyUI workflow"),
        (["--ancestral-eta", "0.5", "--scheduler", "euler_a"], "ancestral_eta=0.5 has no ComfyUI KSampler input"),
        (["--pag", "2", "--pag-layers", "m0.0"], "has no ComfyUI node equivalent at this place"),
        (["--prompt", "a dog"], "needs one prompt and one negative prompt for the whole batch"),
        (["--no-prefix-sharing", "--pag", "2"], "prefix_sharing=False has no ComfyUI KSampler input"),
        (["--no-compact-text"], "compact_text=False has no ComfyUI KSampler input"),
    ],
)  # fmt: skip
def test_generate_save_workflow_refuses_what_a_workflow_cannot_express(
    sd15_checkpoint, tmp_path, extra, message
):
    _, path, config = sd15_checkpoint
    wf_path, out = tmp_path / "wf.json", tmp_path / "out"
    args = ["generate", "--model", str(path), "--config", str(config), *GENERATE, *extra, "-o", str(out)]
    res = CliRunner().invoke(app, [*args, "--save-workflow", str(wf_path)])
    assert res.exit_code == 2, res.output
    (error,) = (line for line in res.output.splitlines() if line.startswith("error:"))
    assert message in error, res.output
    assert not wf_path.exists() and not out.exists()  # refused before sampling: nothing written


def test_generate_save_workflow_needs_a_single_file(sd15_checkpoint, tmp_path):
    _, _, config = sd15_checkpoint
    wf_path = tmp_path / "wf.json"
    args = [
        "generate",
        "--model",
        str(config),
        *GENERATE,
        "-o",
        str(tmp_path / "out"),
        "--save-workflow",
        str(wf_path),
    ]
    res = CliRunner().invoke(app, args)
    assert (
        res.exit_code == 2
        and "is a diffusers folder; a ComfyUI workflow loads a single-file checkpoint" in res.output
    )
    assert not wf_path.exists()
    res = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "wf.txt")])
    assert res.exit_code == 2 and "--save-workflow must end in .json" in res.output
