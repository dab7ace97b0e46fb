"""diffguide.validation: a real mini training loop is left alone; output equals `diffguide generate`;
prompt files and their errors; memory options; the out-of-memory escalation; the CLI."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from diffguide import GuidedPipeline, app, testing
from diffguide.cli.main import app as cli
from diffguide.engine import OutOfMemory
from diffguide.errors import ConfigError, DiffguideError
from diffguide.guidance.cfg import CFG
from diffguide.manifest import tensor_hash
from diffguide.pipeline import GenerateConfig
from diffguide.validation import (
    FAMILY_DEFAULTS,
    MemoryOptions,
    family_defaults,
    load_prompts,
    sample_validation,
)
from diffguide.validation.components import plain_forward, unwrap
from diffguide.validation.presets import markdown_table

PROMPTS = ["a cat", {"prompt": "a dog", "negative": "blurry", "seeds": [3, 4]}]


def components(pipe, attr="unet"):
    return {k: v for k, v in pipe.components.items() if k != attr}


def train(validate_dir=None, steps=4):
    """diffusers' text-to-image training recipe on the tiny SD1.5 UNet: noise, timesteps, MSE."""
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    pipe = testing.tiny_sd15(0)
    unet = pipe.unet.train()
    parts = components(pipe)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ids = pipe.tokenizer(
        ["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    latents = torch.randn(2, 4, 4, 4)
    losses, changes = [], []
    for step in range(steps):
        if validate_dir is not None and step in (0, steps - 1):
            before = {k: v.clone() for k, v in unet.state_dict().items()}
            sample_validation(
                unet, PROMPTS, step=step, out_dir=validate_dir, components=parts, seeds=7, family=None
            )
            changes.append(max((before[k] - v).abs().max().item() for k, v in unet.state_dict().items()))
        noise = torch.randn_like(latents)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,))
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3  # numpy and Python RNG too
        noisy = pipe.scheduler.add_noise(latents, noise, t) + jitter
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=embeds).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, changes, unet


def test_training_loop_is_left_alone(tmp_path):
    plain, _, _ = train()
    with_val, changes, unet = train(tmp_path, steps=4)
    print(f"losses {plain} / with validation {with_val}")
    assert with_val == plain  # bit for bit: RNG states and modes untouched
    assert changes == [0.0, 0.0]  # validation changes no parameter
    assert unet.training and all(m.training for m in unet.modules())
    for step in (0, 3):
        folder = tmp_path / f"step-{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["0-7.png", "0-7.json", "1-3.png", "1-3.json", "1-4.png", "1-4.json", "grid.png", "index.json"]
        )
        index = json.loads((folder / "index.json").read_text())
        assert [(e["prompt_index"], e["seed"], e["file"]) for e in index["images"]] == [
            (0, 7, "0-7.png"), (1, 3, "1-3.png"), (1, 4, "1-4.png"),
        ]  # fmt: skip
        assert index["defaults"] == "sd15" and index["images"][0]["settings"]["steps"] == 30
        assert Image.open(folder / "grid.png").size == (64, 64)  # 2 prompts x up to 2 seeds of 32 px
    assert Image.open(tmp_path / "steps-1.png").size == (64, 64)  # 2 steps x 2 seeds
    a = np.asarray(Image.open(tmp_path / "step-000000" / "1-3.png"))
    b = np.asarray(Image.open(tmp_path / "step-000003" / "1-3.png"))
    assert np.abs(a.astype(int) - b).max() > 0  # the model changed between the checkpoints
    assert not list(tmp_path.glob(".step-*"))  # no temporary folder left


def rng_states():
    return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())


def test_state_restored_under_autocast_and_mixed_modes(tmp_path, sdxl_pipe):
    unet = sdxl_pipe.unet
    unet.train()
    unet.mid_block.eval()
    frozen = unet.conv_in.weight
    frozen.requires_grad_(False)
    modes = [m.training for m in unet.modules()]
    flags = [p.requires_grad for p in unet.parameters()]
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    before = rng_states()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.enable_grad():
            r = sample_validation(
                unet, {"prompt": "a cat", "steps": 2}, step=0, out_dir=tmp_path,
                components=components(sdxl_pipe), threads=2, seeds=1,
            )  # fmt: skip
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_grad_enabled()
        after = rng_states()
        assert (
            torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
        )
        assert [m.training for m in unet.modules()] == modes
        assert [p.requires_grad for p in unet.parameters()] == flags
        assert torch.get_num_threads() == threads
        assert r.images[0].size == (32, 32) and r.images[0].mode == "RGB"
    finally:
        frozen.requires_grad_(True)
        unet.eval()


def test_failure_restores_state_and_writes_nothing(tmp_path, sd15_pipe):
    unet = sd15_pipe.unet.train()

    def boom(module, args):
        raise RuntimeError("boom")

    handle = unet.register_forward_pre_hook(boom)
    before = rng_states()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sample_validation(unet, "a cat", step=2, out_dir=tmp_path, components=components(sd15_pipe))
    finally:
        handle.remove()
        after = rng_states()
        training = unet.training
        unet.eval()
    assert training and torch.equal(before[0], after[0])
    assert list(tmp_path.iterdir()) == []


def test_existing_step_is_refused(tmp_path, sd15):
    sample_validation(sd15, {"prompt": "x", "steps": 1}, step=1, out_dir=tmp_path)
    with pytest.raises(DiffguideError, match="already exists; validation never overwrites a step"):
        sample_validation(sd15, {"prompt": "x", "steps": 1}, step=1, out_dir=tmp_path)


# -- the same output as `diffguide generate` -------------------------------------------------------
def latents_hash(png) -> str:
    return json.loads(png.with_suffix(".json").read_text())["output"]["latents_hash"]


def test_equals_cli_generate_sdxl(tmp_path):
    from families_support import save_tiny

    pipe = testing.tiny_sdxl(0)
    folder = save_tiny(pipe, tmp_path / "model")
    prompt = {"prompt": "a red cube", "negative": "blue", "seeds": [5], "steps": 3, "cfg": 7.0}
    r = sample_validation(
        pipe.unet, [prompt], step=9, out_dir=tmp_path / "val", components=components(pipe), threads=1
    )
    res = CliRunner().invoke(
        cli,
        ["generate", "-m", str(folder), "-p", "a red cube", "--negative-prompt", "blue", "--seed", "5", "--steps", "3",
         "--cfg", "7", "--threads", "1", "-q", "-o", str(tmp_path / "gen")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    gen = next((tmp_path / "gen").glob("*.png"))
    ours = r.folder / "0-5.png"
    assert latents_hash(ours) == latents_hash(gen)
    assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(gen)))


def generate_latents(pipe, config, threads=1):
    req = app.GenerateRequest(app.ModelRequest("unused"), config, threads=threads)
    return app.generate(req, GuidedPipeline(pipe)).latents


def run_one(model, parts, prompt, tmp_path, **kw):
    r = sample_validation(model, [prompt], step=0, out_dir=tmp_path, components=parts, threads=1, **kw)
    m = json.loads((r.folder / f"0-{prompt['seeds'][0]}.json").read_text())
    return r, m


def same_as_generate(pipe, attr, prompt, config, tmp_path, model=None):
    model = model if model is not None else getattr(pipe, attr)
    _, m = run_one(model, components(pipe, attr), prompt, tmp_path)
    assert m["output"]["latents_hash"] == tensor_hash(generate_latents(pipe, config))
    return m


def test_equals_generate_sd35(tmp_path):
    from families_support import tiny_sd3

    from diffguide.guidance.slg import SLG

    pipe = tiny_sd3(0, layers=4, sd35=True)
    slg = {"method": "slg", "scale": 2.8, "layers": "b1-2", "start": 0.0, "stop": 1.0}
    prompt = {"prompt": "a cat", "seeds": [2], "steps": 3, "guidance": [{"method": "cfg", "scale": 4.5}, slg]}
    terms = [CFG(4.5), SLG(2.8, layers="b1-2", start=0.0, stop=1.0)]
    cfg = GenerateConfig.create("a cat", steps=3, seed=2, guidance=terms, num_images=1)
    same_as_generate(pipe, "transformer", prompt, cfg, tmp_path)


def test_equals_generate_flux_dev_defaults(tmp_path):
    from diffguide.testing_dit import tiny_flux

    pipe = tiny_flux(0)
    pipe.set_progress_bar_config(disable=True)
    # the flux-dev row: embedded guidance 3.5, no true CFG: the same as generate's Flux dev default
    cfg = GenerateConfig.create("a cat", steps=2, seed=4, num_images=1)
    m = same_as_generate(pipe, "transformer", {"prompt": "a cat", "seeds": [4], "steps": 2}, cfg, tmp_path)
    assert m["parameters"]["guidance"] == [{"method": "embedded_guidance", "scale": 3.5}]


def test_equals_generate_with_peft_wrapped_unet(tmp_path):
    from peft import LoraConfig, get_peft_model

    pipe = testing.tiny_sdxl(0)
    torch.manual_seed(1)
    wrapped = get_peft_model(
        pipe.unet, LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    assert unwrap(wrapped) is pipe.unet  # the same module, LoRA layers injected
    cfg = GenerateConfig.create("a cat", steps=3, seed=1, guidance=[CFG(7.0)], num_images=1)
    same_as_generate(
        pipe, "unet", {"prompt": "a cat", "seeds": [1], "steps": 3}, cfg, tmp_path, model=wrapped
    )
    with wrapped.disable_adapter():
        without = generate_latents(pipe, cfg)
    assert not torch.equal(without, generate_latents(pipe, cfg))  # the adapter takes part


def test_unwrap_compile_ddp_and_accelerate_forward(sd15_pipe, tmp_path):
    unet = sd15_pipe.unet
    assert unwrap(torch.compile(unet)) is unet  # not run: only unwrapped
    ddp = type("DistributedDataParallel", (), {})()
    ddp.module = unet
    assert unwrap(ddp) is unet
    original = unet.forward

    def autocast_forward(*a, **k):  # accelerate's mixed-precision wrapper, an instance attribute
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*a, **k)

    unet._original_forward = original
    unet.forward = autocast_forward
    try:
        with plain_forward(unet):
            assert "forward" not in unet.__dict__
        assert unet.forward is autocast_forward
        _, m = run_one(unet, components(sd15_pipe), {"prompt": "a", "seeds": [0], "steps": 2}, tmp_path)
        assert unet.forward is autocast_forward
    finally:
        del unet.__dict__["forward"], unet.__dict__["_original_forward"]
    ref = generate_latents(sd15_pipe, GenerateConfig.create("a", steps=2, guidance=[CFG(7.5)], num_images=1))
    assert m["output"]["latents_hash"] == tensor_hash(ref)  # float32, not bfloat16
    assert isinstance(types.SimpleNamespace(), object)


# -- prompt files -----------------------------------------------------------------------------------
def test_prompt_files(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(
        "family: sdxl\nseeds: [1, 2]\ndefaults: {steps: 5}\nprompts:\n"
        "  - a cat\n  - prompt: a dog\n    negative: blurry\n    size: [64, 32]\n    cfg: 3\n"
    )
    pset = load_prompts(y)
    assert pset.family == "sdxl"
    assert [(p.prompt, p.seeds, p.steps) for p in pset.prompts] == [("a cat", (1,), 5), ("a dog", (2,), 5)]
    assert (pset.prompts[1].width, pset.prompts[1].height, pset.prompts[1].guidance) == (64, 32, (CFG(3.0),))
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "a", "seeds": [4, 5], "scheduler": "ddim"}]))
    assert load_prompts(j).prompts[0].seeds == (4, 5)
    t = tmp_path / "p.txt"
    t.write_text("# comment\na cat\n\na dog\n")
    assert [(p.prompt, p.where) for p in load_prompts(t).prompts] == [
        ("a cat", f"{t}:2"),
        ("a dog", f"{t}:4"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompts:\n  - a\n  - prompt: b\n    cfgg: 3\n", ":3: unknown key 'cfgg'; known: prompt, negative"),
        ("seeds: [1]\nprompts:\n  - a\n  - b\n", ":1: 1 seeds for 2 prompts: give one seed per prompt"),
        ("prompts:\n  - a\nfamily: sdxxl\n", ":3: unknown family default 'sdxxl'; one of: sd15, sdxl"),
        ("prompts:\n  - prompt: a\n    steps: many\n", ":2: 'steps' must be an integer, got 'many'"),
        ("prompts: [a\n", ":2: not valid YAML/JSON"),
        ("promts: [a]\n", ":1: unknown key 'promts'; known: prompts, family, seeds, defaults"),
    ],
)
def test_prompt_file_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}{message}")
    assert "\n" not in str(err.value)


def test_bad_settings_fail_before_sampling_with_the_line(tmp_path, sd15):
    path = tmp_path / "p.yaml"
    path.write_text("prompts:\n  - a\n  - prompt: b\n    steps: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: steps must be between 1 and 1000, got 0$"):
        sample_validation(sd15, path, step=0, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"^seeds: 1 seeds for 2 prompts"):
        sample_validation(sd15, ["a", "b"], seeds=[1], step=0, out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match=r"^unknown family default 'sd9'; one of: sd15, sdxl"):
        sample_validation(sd15, "a", family="sd9", step=0, out_dir=tmp_path / "o")


def test_defaults_table():
    assert [t.describe()["method"] for t in family_defaults("sd3.5").guidance()] == ["cfg", "slg"]
    assert family_defaults("sd3.5").guidance()[1].describe()["scale"] == 2.8
    assert family_defaults("flux-dev").guidance()[0].describe() == {
        "method": "embedded_guidance",
        "scale": 3.5,
    }
    assert family_defaults("flux-schnell").guidance() == () and family_defaults("flux-schnell").steps == 4
    assert (FAMILY_DEFAULTS["sdxl"].cfg, FAMILY_DEFAULTS["sdxl"].steps) == (7.0, 30)
    assert family_defaults("qwen-image").guidance() == (CFG(4.0, renorm=True),)
    assert all(d.source for d in FAMILY_DEFAULTS.values())
    assert markdown_table().count("\n") == len(FAMILY_DEFAULTS) + 1
    docs = Path(__file__).resolve().parents[1] / "docs" / "validation.md"
    assert markdown_table() in docs.read_text()  # the docs print the one table as it is


# -- memory options and the out-of-memory escalation ------------------------------------------------
def pixels(r) -> np.ndarray:
    return np.asarray(r.images[0], dtype=np.float64) / 255.0


@pytest.mark.parametrize(
    "opts",
    [
        MemoryOptions(attention_slicing=1),
        MemoryOptions(attention_slicing="max"),
        MemoryOptions(vae_slicing=True),
        MemoryOptions(vae_tiling=True),
        MemoryOptions(model_cpu_offload=True),
    ],
)
def test_memory_options_same_image(tmp_path, sd15_pipe, opts):
    gp = GuidedPipeline(sd15_pipe)
    prompt = {"prompt": "a cat", "seeds": [3], "steps": 3}
    processors = {k: type(v) for k, v in sd15_pipe.unet.attn_processors.items()}
    base, _ = run_one(gp, None, prompt, tmp_path / "a")
    got, m1 = run_one(gp, None, prompt, tmp_path / "b", memory=opts)
    diff = np.abs(pixels(base) - pixels(got)).max()
    lat = (base.latents[0] - got.latents[0]).abs().max().item()
    print(f"{opts}: max latent diff {lat:.3g}, max pixel diff {diff}")
    assert lat <= 1e-4 and diff <= 1e-4
    assert m1["validation"]["memory"]["options"] == opts.describe()
    assert {k: type(v) for k, v in sd15_pipe.unet.attn_processors.items()} == processors  # undone
    assert not sd15_pipe.vae.use_slicing and not sd15_pipe.vae.use_tiling
    assert not hasattr(sd15_pipe.unet, "_hf_hook")


def test_sequential_offload_on_the_cpu_same_image_and_weights_back(tmp_path):
    """Sequential offload runs on a CPU-only machine (accelerate's cpu_offload with the CPU as the
    execution device: weights on the meta device, loaded per forward) and gives the same image; the
    parameter objects (those an optimizer holds) are back in the modules after, values unchanged."""
    pipe = testing.tiny_sd15(0)
    params = {n: (p, p.detach().clone()) for n, p in pipe.unet.named_parameters()}
    gp = GuidedPipeline(pipe)
    prompt = {"prompt": "a cat", "seeds": [3], "steps": 3}
    base, _ = run_one(gp, None, prompt, tmp_path / "a")
    seen: list[str] = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(m.weight.device.type))
    try:
        got, m = run_one(gp, None, prompt, tmp_path / "b", memory=MemoryOptions(sequential_cpu_offload=True))
    finally:
        hook.remove()
    lat = (base.latents[0] - got.latents[0]).abs().max().item()
    diff = np.abs(pixels(base) - pixels(got)).max()
    print(f"sequential CPU offload: max latent diff {lat:.3g}, max pixel diff {diff}")
    assert lat <= 1e-4 and diff <= 1e-4
    assert seen and set(seen) == {"meta"}  # offloaded: the weights were on the meta device
    assert m["validation"]["memory"]["options"]["sequential_cpu_offload"] is True
    for n, p in pipe.unet.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1])
    hooked = [
        m for c in (pipe.unet, pipe.vae, pipe.text_encoder) for m in c.modules() if hasattr(m, "_hf_hook")
    ]
    assert hooked == []
    assert all(
        p.device.type == "cpu" for c in (pipe.unet, pipe.vae, pipe.text_encoder) for p in c.parameters()
    )


def test_diffusers_sequential_offload_fails_on_the_cpu():
    """Why diffguide does not call diffusers' method on a CPU-only machine (documented): it turns
    "cpu" into "cpu:0" and accelerate's hooks then fail on the first forward."""
    pipe = testing.tiny_sd15(0)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe._offload_device == torch.device("cpu:0")
    with pytest.raises(TypeError, match="invalid combination of arguments"), torch.no_grad():
        pipe.unet(torch.zeros(1, 4, 4, 4), 1, torch.zeros(1, 77, 32))


def oom_hook(unet, when):
    def hook(module, args):
        if when(args[0]):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    return unet.register_forward_pre_hook(hook)


def test_oom_level_1_halves_rows(tmp_path, sd15_pipe):
    with (
        oom_hook(sd15_pipe.unet, lambda x: x.shape[0] > 1),
        pytest.warns(RuntimeWarning, match="ran out of memory"),
    ):
        _, m = run_one(GuidedPipeline(sd15_pipe), None, {"prompt": "a", "seeds": [0], "steps": 2}, tmp_path)
    assert m["validation"]["memory"]["escalation"] == ["rows halved to 1"]
    assert m["engine"]["out_of_memory_fallbacks"] == {"0": 1}
    ref = GenerateConfig.create("a", steps=2, guidance=[CFG(7.5)], max_rows=1, num_images=1)
    assert m["output"]["latents_hash"] == tensor_hash(generate_latents(sd15_pipe, ref))


def test_oom_level_2_offloads(tmp_path, sd15_pipe):
    unet = sd15_pipe.unet
    with oom_hook(unet, lambda x: not hasattr(unet, "_hf_hook")):
        _, m = run_one(
            GuidedPipeline(sd15_pipe),
            None,
            {"prompt": "a", "seeds": [0], "steps": 2},
            tmp_path,
            offload_on_oom=True,
        )
    mem = m["validation"]["memory"]
    assert mem["escalation"] == ["rows halved to 1", "model_cpu_offload"]
    assert mem["options"]["model_cpu_offload"] is True
    assert not hasattr(unet, "_hf_hook")


@pytest.mark.parametrize("offload", [False, True])
def test_oom_level_3_reports(tmp_path, sd15_pipe, offload):
    unet = sd15_pipe.unet.train()
    try:
        with oom_hook(unet, lambda x: True), pytest.raises(OutOfMemory) as err:
            run_one(GuidedPipeline(sd15_pipe), None, {"prompt": "a", "seeds": [6], "steps": 2}, tmp_path,
                    offload_on_oom=offload)  # fmt: skip
        tried = "one row per forward and model CPU offload" if offload else "one row per forward: lower"
        assert f"out of memory sampling prompt 0 seed 6 even with {tried}" in str(err.value)
        assert unet.training and list(tmp_path.iterdir()) == []
    finally:
        unet.eval()


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_validate(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("prompts:\n  - prompt: a handwritten digit 7\n    seeds: [1, 2]\n    steps: 2\n")
    res = CliRunner().invoke(
        cli, ["validate", "--prompts", str(p), "--out", str(tmp_path / "o"), "--step", "12"]
    )
    assert res.exit_code == 0, res.output
    folder = tmp_path / "o" / "step-000012"
    assert sorted(x.name for x in folder.glob("*.png")) == ["0-1.png", "0-2.png", "grid.png"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  - a\n  - prompt: b\n    seed: [1, x]\n")
    res = CliRunner().invoke(cli, ["validate", "--prompts", str(bad), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {bad}:3: 'seeds' must be an integer, got 'x'"


def test_pipeline_or_components_from_a_base_pipeline(tmp_path, sd15_pipe):
    prompt = {"prompt": "a", "seeds": [2], "steps": 2}
    _, a = run_one(sd15_pipe, None, prompt, tmp_path / "a")  # a diffusers pipeline
    _, b = run_one(
        sd15_pipe.unet, sd15_pipe, prompt, tmp_path / "b"
    )  # the denoiser + a base pipeline's parts
    assert a["output"]["latents_hash"] == b["output"]["latents_hash"]
    assert a["model"]["hashes"] == b["model"]["hashes"]
    with pytest.raises(ConfigError, match=r"^a bare model needs components="):
        sample_validation(sd15_pipe.unet, "a", step=0, out_dir=tmp_path / "c")
    with pytest.raises(
        ConfigError, match=r"^StableDiffusionPipeline needs the component 'vae': pass it in components=$"
    ):
        sample_validation(sd15_pipe.unet, "a", step=0, out_dir=tmp_path / "c", components={"tokenizer": 1})


def test_frees_its_pipeline_and_refuses_meta_weights(tmp_path, sd15_pipe, monkeypatch):
    import gc
    import weakref

    import diffguide.validation.sample as sample_module

    refs = []

    def assemble(denoiser, parts):
        pipe = real(denoiser, parts)
        refs.append(weakref.ref(pipe))
        return pipe

    real = sample_module.assemble
    monkeypatch.setattr(sample_module, "assemble", assemble)
    r = sample_validation(
        sd15_pipe.unet,
        {"prompt": "a", "steps": 1},
        step=0,
        out_dir=tmp_path,
        components=components(sd15_pipe),
    )
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None  # the assembled pipeline is gone; the images stay
    assert r.images[0].size == (32, 32)
    with torch.device("meta"):
        lazy = testing.sd15_unet(0)
    with pytest.raises(ConfigError, match=r"^the UNet2DConditionModel has weights on the meta device"):
        sample_validation(lazy, "a", step=1, out_dir=tmp_path, components=components(sd15_pipe))


def test_unknown_guidance_method_in_a_prompt_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prompts:\n  - prompt: a\n    guidance: [{method: cfx, scale: 2}]\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}:2: unknown guidance method 'cfx' in 'guidance'; known: .*cfg"
    ):
        load_prompts(path)
