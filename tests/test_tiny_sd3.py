"""The second bundled model (src/diffguide/assets/tiny-sd3, an SD3-architecture flow-matching
transformer): selectable by name, loads in plain diffusers, CFG matches diffusers'
StableDiffusion3Pipeline, and its images are recognizable for their prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from families_support import max_diff
from typer.testing import CliRunner

from diffguide import CFG, DiffguideError, GuidedPipeline
from diffguide.cli.main import app
from diffguide.defaults import BUNDLED_MODELS, bundled_model, model_path

NAME = "tiny-sd3"
#: components the folder saves as absent; plain diffusers loads it only when they are passed as None
ABSENT = {"text_encoder_3": None, "tokenizer_3": None, "image_encoder": None, "feature_extractor": None}


def test_ships_with_the_package_under_30_mb():
    folder = bundled_model(NAME)
    assert folder.parts[-2:] == ("assets", NAME)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 30e6, f"{size / 1e6:.1f} MB"


def test_names_resolve_to_bundled_folders_unless_a_path_of_that_name_exists(tmp_path, monkeypatch):
    assert BUNDLED_MODELS == ("tiny-sd", "tiny-sd3")
    assert model_path("tiny-sd3") == bundled_model("tiny-sd3")
    assert model_path(Path("tiny-sd")) == bundled_model("tiny-sd")
    assert model_path("some/folder") == "some/folder"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-sd3").mkdir()
    assert model_path("tiny-sd3") == "tiny-sd3"  # a local folder of that name wins
    with pytest.raises(DiffguideError, match=r"^no bundled model 'tiny-sd4' \(bundled: tiny-sd, tiny-sd3\)$"):
        bundled_model("tiny-sd4")


@pytest.fixture(scope="module")
def gp() -> GuidedPipeline:
    return GuidedPipeline.from_pretrained(NAME, device="cpu")  # by name, as --model tiny-sd3


def test_loads_with_plain_diffusers():
    pipe = StableDiffusion3Pipeline.from_pretrained(bundled_model(NAME), **ABSENT)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert (
        type(pipe.text_encoder).__name__
        == type(pipe.text_encoder_2).__name__
        == "CLIPTextModelWithProjection"
    )
    assert pipe.text_encoder_3 is None
    assert pipe.scheduler.config.shift == 1.0
    # float16 on disk, float32 as loaded (config.json's dtype), like the transformer
    assert pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == pipe.transformer.dtype == torch.float32
    # the real CLIP BPE tokenizer: "a photo of" is CLIP's [49406, 320, 1125, 539, 49407]
    assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert pipe.tokenizer_2("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert pipe.vae.config.shift_factor is not None


def test_source_is_the_bundled_folder(gp):
    assert gp.family.name == "sd3" and gp.source == str(bundled_model(NAME))


def test_cfg_matches_diffusers_pipeline(gp):
    """Same folder, seeds (one CPU generator per image) and schedule: final latents <= 1e-4, with
    diffguide's text compaction on (the default) and diffusers running all 333 text tokens."""
    prompts, negatives, steps = ["a handwritten digit 4", "a photo of a sneaker"], ["", "a photo of a bag"], 8
    ref = StableDiffusion3Pipeline.from_pretrained(bundled_model(NAME), **ABSENT)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    want = ref(
        prompts, negative_prompt=negatives, generator=gens, num_inference_steps=steps, guidance_scale=4.0,
        output_type="latent", height=32, width=32,
    ).images  # fmt: skip
    out = gp.generate(prompts, negatives, guidance=[CFG(4.0)], steps=steps, seed=5, decode=False)
    got = out.latents
    assert got.shape == want.shape == (2, 4, 8, 8)
    # the default run collapses the 256 zero "T5" tokens into one (text compaction), diffusers does not
    assert out.manifests[0]["engine"]["compact_text"]["text_tokens"] == [333, 78]
    assert max_diff(got, want) <= 1e-4
    assert (got[0] - got[1]).abs().max().item() > 0.1  # the prompts matter


def test_prompts_are_recognizable_with_cfg(gp):
    """All 20 class prompts, CFG 4, 20 steps, judged by independent classifiers: ccexam's MNIST
    net, the project's Fashion-MNIST CNN (docs/tiny-sd3.md has the figures on more samples)."""
    pytest.importorskip("ccexam")
    from diffguide.bench.classifiers import PromptClassifiers
    from diffguide.bench.reference import captions, to_gray28

    names = captions()
    result = gp.generate(names, guidance=[CFG(4.0)], steps=20, seed=0)
    rgb = np.stack([np.asarray(im.convert("RGB")) for im in result.images])
    acc = PromptClassifiers().accuracy(to_gray28(rgb), np.arange(len(names)))
    print(f"tiny-sd3 CFG 4, 20 steps, 20 images: {acc}")
    assert acc["digit_accuracy"] is not None and acc["digit_accuracy"] >= 0.9, acc
    assert acc["garment_accuracy"] is not None and acc["garment_accuracy"] >= 0.8, acc


def test_cli_generate_by_name(tmp_path):
    res = CliRunner().invoke(
        app,
        ["generate", "-m", NAME, "-p", "a handwritten digit 2", "--steps", "2", "-o", str(tmp_path / "out")],
    )
    assert res.exit_code == 0, res.output
    manifests = list((tmp_path / "out").glob("*.json"))
    assert manifests, list((tmp_path / "out").iterdir())
    assert json.loads(manifests[0].read_text())["model"]["source"] == str(bundled_model(NAME))
