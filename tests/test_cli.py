"""The diffguide CLI on tiny saved models: generate (files, manifests, equality with the Python
API, PAG/TPG), one-line errors with exit code 2, and the layers command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffguide import CFG, GuidedPipeline, testing
from diffguide.cli import common
from diffguide.cli.common import parse_lora, parse_window
from diffguide.cli.main import app
from diffguide.defaults import DEFAULTS
from diffguide.errors import ConfigError
from diffguide.io import load_latents, read_manifest

BASE = [
    "--prompt",
    "a cat",
    "--prompt",
    "a dog",
    "--steps",
    "2",
    "--seed",
    "5",
    "--cfg",
    "4",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd15")
    testing.tiny_sd15(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    testing.tiny_sdxl(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cfg_run(runner, sd15_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    res = invoke(runner, "generate", "--model", sd15_dir, *BASE, "--out", out, "--save-latents", "--quiet")
    assert res.exit_code == 0, res.output
    return out, res


def test_generate_files_and_manifest(cfg_run, sd15_dir):
    out, res = cfg_run
    stems = ["diffguide-000-5", "diffguide-001-6"]
    assert res.stdout.split() == [
        str(out / f"{s}{e}") for s in stems for e in (".png", ".json", ".safetensors")
    ]
    for i, stem in enumerate(stems):
        png = out / f"{stem}.png"
        m = read_manifest(png)
        assert m == json.loads((out / f"{stem}.json").read_text())
        assert m["image"] == {
            "index": i,
            "seed": 5 + i,
            "prompt": ["a cat", "a dog"][i],
            "negative_prompt": "",
        }
        assert m["parameters"]["steps"] == 2 and m["parameters"]["scheduler"] == "euler"
        assert m["parameters"]["guidance"] == [CFG(4.0).describe()]
        assert set(m["model"]["hashes"]) == {"unet", "vae", "text_encoder"}
        assert m["model"]["source"] == str(sd15_dir)
        assert m["environment"]["threads"] == 1
        with Image.open(png) as im:
            assert im.size == (32, 32)
            params = im.text["parameters"]
        assert params.startswith(
            f"{['a cat', 'a dog'][i]}\nSteps: 2, Sampler: Euler, CFG scale: 4, Seed: {5 + i}"
        )
        assert f"Size: 32x32, Model hash: {m['model']['hashes']['unet']}" in params


def test_latents_equal_python_api(cfg_run, sd15_dir):
    out, _ = cfg_run
    pipe = GuidedPipeline.from_pretrained(sd15_dir)
    expected = pipe.generate(["a cat", "a dog"], steps=2, seed=5, guidance=[CFG(4.0)], decode=False).latents
    for i in range(2):
        latents, meta = load_latents(out / f"diffguide-00{i}-{5 + i}.safetensors")
        assert latents.shape == (1, 4, 16, 16)
        assert torch.equal(latents, expected[i : i + 1])
        assert meta["image"]["seed"] == 5 + i


@pytest.mark.parametrize(
    ("option", "window", "layers"),
    [("--pag", "0:0.5", "mid"), ("--tpg", "sigma:1:", "d0.0")],
)
def test_pag_tpg_change_latents(runner, cfg_run, sd15_dir, tmp_path, option, window, layers):
    base_out, _ = cfg_run
    res = invoke(
        runner, "generate", "--model", sd15_dir, *BASE, "--out", tmp_path, "--save-latents",
        option, "3", f"{option}-window", window, f"{option}-layers", layers,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for i in range(2):
        name = f"diffguide-00{i}-{5 + i}.safetensors"
        guided, meta = load_latents(tmp_path / name)
        assert not torch.allclose(guided, load_latents(base_out / name)[0])
        term = meta["parameters"]["guidance"][1]
        assert term["method"] == option[2:] and term["scale"] == 3.0 and term["layers"] == layers
    assert f"{option[2:]} layers: {layers} -> 1 " in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "-1"], "steps must be between 1 and 1000, got -1"),
        (["--cfg", "-1"], "CFG scale must be in [0, 100], got -1.0"),
        (["--pag", "1000"], "PAG scale must be in [0, 100], got 1000.0"),
        (["--scheduler", "nope"], "'nope' is not one of 'euler'"),
        (["--prompt", "b", "-N", "x", "-N", "y", "-N", "z"], "3 negative prompts for 2 images"),
        (
            ["--pag-window", "0.5:0.2", "--pag", "2"],
            "--pag-window '0.5:0.2': window start (0.5) must be below",
        ),
        (["--tpg-layers", "mid"], "--tpg is 0 (TPG off)"),
        (["--schedule", "karras"], "--schedule applies to the comfy noise policy only"),
        (
            ["--noise", "comfy", "--scheduler", "unipc"],
            "comfy noise policy supports the samplers euler, euler_a, dpmpp_2m, heun",
        ),
        (
            ["--noise", "comfy", "--scheduler", "dpmpp_2m_karras"],
            "pass --scheduler dpmpp_2m --schedule karras",
        ),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "{tmp}/missing"], "does not exist"),
        (["--model", "{tmp}/model.ckpt"], "is a pickle file (.ckpt)"),
        (["--model", "{tmp}/model.txt"], "is not a .safetensors file or a diffusers model folder"),
    ],
)
def test_bad_inputs_one_line(runner, tmp_path, args, message):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "model.txt").write_text("hello")
    args = [a.format(tmp=tmp_path) for a in args]
    res = invoke(runner, "generate", "--prompt", "a", *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.output and not list(tmp_path.glob("*.png"))


def test_unknown_layer(runner, sd15_dir, tmp_path):
    res = invoke(
        runner, "generate", "-m", sd15_dir, "-p", "a", "--pag", "2", "--pag-layers", "mid,d7", "-o", tmp_path
    )
    assert res.exit_code == 2
    assert res.stderr.startswith("error: layer 'd7': no attention unit d7.") and res.stderr.count("\n") == 1
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_no_default_model(runner, monkeypatch):
    monkeypatch.delenv(common.MODEL_ENVVAR, raising=False)
    monkeypatch.setattr(common, "default_model_path", lambda: None)
    res = invoke(runner, "generate", "--prompt", "a")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: no default model yet: pass --model")


def test_help_shows_defaults(runner):
    res = invoke(runner, "generate", "--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for needle in (
        f"[default: {DEFAULTS.steps}]",
        f"[default: {DEFAULTS.scheduler}]",
        f"[default: ({DEFAULTS.cfg})]",  # not given: the family default (4, Flux off)
        "[default: outputs]",
        "sigma:LO:HI",
    ):
        assert needle in text, needle


def test_layers_table_and_presets(runner, sdxl_dir):
    res = invoke(runner, "layers", "--model", sdxl_dir)
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()]
    assert ["d0", "down_blocks.1.attentions.0", "2"] in rows
    assert ["m0", "mid_block.attentions.0", "2"] in rows
    assert ["u2", "up_blocks.0.attentions.2", "2"] in rows
    assert ["pag", "mid", "2", "self-attention", "modules"] in rows
    assert ["tpg", "down_blocks.1", "4", "transformer", "blocks"] in rows


def test_layers_specs(runner, sdxl_dir):
    unit = "down_blocks.1.attentions.0.transformer_blocks"
    res = invoke(runner, "layers", "-m", sdxl_dir, "--pag", "d0.0-1")
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [f"{unit}.0.attn1", f"{unit}.1.attn1"]
    assert "# pag 'd0.0-1': 2 self-attention modules" in res.stderr
    exact = f"{unit}.1.attn1"
    res = invoke(runner, "layers", "-m", sdxl_dir, "--pag", exact, "--tpg", "d0.0-1")
    assert res.stdout.split() == [exact, f"{unit}.0", f"{unit}.1"]
    res = invoke(runner, "layers", "-m", sdxl_dir, "--tpg", "mid_block.attentions.0.transformer_blocks.1")
    assert res.stdout.split() == ["mid_block.attentions.0.transformer_blocks.1"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("d0.5", "has transformer blocks 0..1"),
        ("down_blocks.1.attentions.0.transformer_blocks.12", "is not a module of this model"),
        ("", "empty layer spec"),
    ],
)
def test_layers_errors(runner, sdxl_dir, spec, message):
    res = invoke(runner, "layers", "-m", sdxl_dir, "--pag", spec)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and message in res.stderr


def test_parse_window_and_lora():
    w = parse_window("0.25:0.75, sigma:1:14")
    assert (w.start, w.end, w.sigma_min, w.sigma_max) == (0.25, 0.75, 1.0, 14.0)
    w = parse_window(":0.5")
    assert (w.start, w.end, w.sigma_min, w.sigma_max) == (0.0, 0.5, 0.0, math.inf)
    w = parse_window("sigma:2:")
    assert (w.start, w.end, w.sigma_min, w.sigma_max) == (0.0, 1.0, 2.0, math.inf)
    for bad in ("", "0.5", "a:b", "sigma:1", "0:1,0:0.5", "0.5:0.5", "sigma:5:1"):
        with pytest.raises(ConfigError):
            parse_window(bad, "--cfg-window")
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
