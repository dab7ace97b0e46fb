"""The reproducibility commands end to end: generate --trace, diff of traces, replay,
check-determinism, --conditioning."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffguide import GuidedPipeline, testing
from diffguide.cli.main import app
from diffguide.conditioning import save_conditioning
from diffguide.pipeline import GenerateConfig

BASE = ["--prompt", "a cat", "--steps", "4", "--seed", "3", "--cfg", "4", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd15")
    testing.tiny_sd15(seed=0).save_pretrained(path)
    return path


def _run(runner, args):
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def test_trace_diff_names_the_first_divergent_step(runner, model, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = [
        "generate",
        "--model",
        str(model),
        *BASE,
        "--pag",
        "2",
        "--trace-modules",
        "mid_block.attentions.0",
    ]
    assert _run(runner, [*common, "--trace", str(a), "-o", str(tmp_path / "oa")])[0] == 0
    assert (
        _run(runner, [*common, "--pag-window", "0:0.5", "--trace", str(b), "-o", str(tmp_path / "ob")])[0]
        == 0
    )
    code, out = _run(runner, ["diff", str(b), str(a)])
    assert code == 1
    assert "first divergence: step 2, tensor guided" in out
    code, out = _run(runner, ["diff", str(a), str(a), "--json"])
    assert code == 0 and json.loads(out)["ok"] is True


def test_replay_and_check_determinism(runner, model, tmp_path):
    code, out = _run(
        runner, ["generate", "--model", str(model), *BASE, "--tpg", "2", "-n", "2", "-o", str(tmp_path)]
    )
    assert code == 0
    png = next(line for line in out.splitlines() if line.endswith("-001-4.png"))
    code, out = _run(runner, ["replay", png])
    assert code == 0 and "bit-identical" in out and "NOT" not in out
    code, out = _run(
        runner, ["check-determinism", "--model", str(model), *BASE, "-n", "2", "--batch-vs-single"]
    )
    assert code == 0, out
    assert "image 1 alone (seed 4)" in out


def test_batch_invariant_generate_replay_and_check(runner, model, tmp_path):
    args = ["--model", str(model), *BASE, "--pag", "2", "-n", "2", "--batch-invariant"]
    code, out = _run(runner, ["generate", *args, "-o", str(tmp_path)])
    assert code == 0, out
    png = next(line for line in out.splitlines() if line.endswith("-001-4.png"))
    code, out = _run(runner, ["replay", png])
    assert code == 0 and "bit-identical" in out and "NOT" not in out
    code, out = _run(runner, ["check-determinism", *args, "--batch-vs-single", "--json"])
    assert code == 0, out
    checks = json.loads(out)
    assert [c["expect"] for c in checks] == ["bit-identical"] * 3
    assert all(c["ok"] for c in checks)


def test_generate_from_conditioning_file(runner, model, tmp_path):
    gp = GuidedPipeline.from_pretrained(model)
    cfg = GenerateConfig.create("a cat", steps=4, seed=3)
    cond, uncond = gp.encode(cfg, 32, 32)
    path = save_conditioning(tmp_path / "c.safetensors", cond, uncond, {"prompt": "a cat"})
    args = [
        "generate",
        "--model",
        str(model),
        "--steps",
        "4",
        "--seed",
        "3",
        "--cfg",
        "4",
        "--threads",
        "1",
        "-q",
    ]
    code, _ = _run(runner, [*args, "--conditioning", str(path), "--save-latents", "-o", str(tmp_path / "f")])
    assert code == 0
    code, _ = _run(runner, [*args, "--prompt", "a cat", "--save-latents", "-o", str(tmp_path / "p")])
    assert code == 0
    from diffguide.io import load_latents

    lf, _ = load_latents(next((tmp_path / "f").glob("*.safetensors")))
    lp, _ = load_latents(next((tmp_path / "p").glob("*.safetensors")))
    assert torch.equal(lf, lp)
    torch.save([[cond.embeds, {}]], tmp_path / "wrapped.pt")
    code, out = _run(runner, [*args, "--conditioning", str(tmp_path / "wrapped.pt")])
    assert code == 2 and "drops the metadata" in out
