"""Single-file checkpoints in the original (LDM / "CompVis", A1111-style) format, SD1.5 and SDXL.

The tiny models are exported to one LDM-format .safetensors (tests/ldm_export.py, the inverse of
diffusers' single-file converters) next to the same weights saved as a diffusers folder, which
serves as --config. Loading the file must give back every weight exactly, and sampling from it
must give the same latents and images as sampling from the folder, through the API and the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ldm_export
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffguide import CFG, PAG, DiffguideError, GuidedPipeline, testing
from diffguide.cli.main import app
from diffguide.io import load_latents
from diffguide.models.loading import load_pipeline

COMPONENTS = {
    "sd15": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}


def tiny_sdxl_real_widths(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL with text encoders of different widths (32 and 48), as in SDXL (768, 1280).

    diffusers picks the weights of each CLIP text encoder in a single file by its width; with
    the equal widths of ``testing.tiny_sdxl`` it would read ``conditioner.embedders.0`` for
    both encoders (see test_equal_text_encoder_widths_are_refused).
    """
    base = testing.tiny_sdxl(seed)
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=testing._text(seed + 3, 48, projection=True),
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=testing.sdxl_unet(seed, cross_dim=32 + 48, pooled_dim=48),
        scheduler=base.scheduler,
    )


def export(pipe: Any, folder: Path) -> Path:
    """Save ``pipe`` as a diffusers folder and as an LDM single file beside it."""
    pipe.save_pretrained(folder)
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    path = folder.parent / f"{folder.name}.safetensors"
    save_file(ldm_export.sdxl_to_ldm(pipe) if is_xl else ldm_export.sd15_to_ldm(pipe), str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[Any, Path, Path]]:
    """arch -> (original pipeline, diffusers folder, LDM single file)."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for arch, pipe in (("sd15", testing.tiny_sd15(seed=0)), ("sdxl", tiny_sdxl_real_widths(seed=0))):
        out[arch] = (pipe, root / arch, export(pipe, root / arch))
    return out


@pytest.fixture(params=["sd15", "sdxl"])
def arch(request) -> str:
    return request.param


# --- the export is the exact inverse of diffusers' converters --------------------------------


def tensors_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, bad[:5]


# Keys of the LDM layout that diffusers' converters accept in more than one form (the upsampler
# after an up block's transformer is ``.2.conv``, after a plain resnet ``.1.conv``), or that pin
# the block numbering: named as in real SD1.5 / SDXL checkpoints for these tiny configs.
ANCHORS = {
    "sd15": [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.3.1.proj_out.weight",
        "model.diffusion_model.output_blocks.2.0.skip_connection.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ],
    "sdxl": [
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.2.1.transformer_blocks.1.ff.net.2.weight",
        "model.diffusion_model.label_emb.0.2.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.out_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.ln_2.bias",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.ln_final.bias",
    ],
}


@pytest.mark.parametrize("make", [testing.tiny_sd15, testing.tiny_sdxl, tiny_sdxl_real_widths])
def test_export_inverts_diffusers_converters(make):
    """For the tiny configs of testing.py (and the wider SDXL variant): each diffusers converter
    maps the export back to the original state dict, key for key, bit for bit."""
    pipe = make(0)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    ckpt = ldm_export.sdxl_to_ldm(pipe) if xl else ldm_export.sd15_to_ldm(pipe)
    missing = [k for k in ANCHORS["sdxl" if xl else "sd15"] if k not in ckpt]
    assert not missing
    if xl:
        assert not any(
            ".1.conv." in k for k in ckpt if k.startswith("model.diffusion_model.output_blocks.2.")
        )
    # the keys diffusers uses to recognise the format and the components
    assert sfu.CHECKPOINT_KEY_NAMES["clip_sdxl" if xl else "clip"] in ckpt
    assert (sfu.CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in ckpt) == xl
    assert ckpt["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM

    tensors_equal(sfu.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)), pipe.unet.state_dict())
    tensors_equal(sfu.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)), pipe.vae.state_dict())
    clip = sfu.convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if "embedders.1" not in k})
    te = pipe.text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in te):  # CLIPTextModel is flat in transformers >= 5.6
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    tensors_equal(clip, te)
    if xl:
        te2 = pipe.text_encoder_2
        open_clip = sfu.convert_open_clip_checkpoint(te2, ckpt, prefix=ldm_export.SDXL_OPENCLIP_PREFIX)
        expected = {k: v for k, v in te2.state_dict().items() if not k.endswith("position_ids")}
        tensors_equal(open_clip, expected)
        assert ckpt["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (
            3 * te2.config.hidden_size,
            te2.config.hidden_size,
        )


# --- loading ----------------------------------------------------------------------------------


def test_single_file_loads_every_weight(cases, arch):
    pipe, folder, path = cases[arch]
    loaded = load_pipeline(path, config=str(folder))
    assert type(loaded) is (StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline)
    for name in COMPONENTS[arch]:
        original, got = getattr(pipe, name), getattr(loaded, name)
        want = {**dict(original.named_parameters()), **dict(original.named_buffers())}
        have = {**dict(got.named_parameters()), **dict(got.named_buffers())}
        assert sorted(have) == sorted(want), name
        bad = [k for k, v in want.items() if have[k].is_meta or not torch.equal(have[k], v)]
        assert not bad, (name, bad[:5])
        assert all(v.dtype == torch.float32 for v in dict(got.named_parameters()).values())


def test_folder_weights_are_copied_out_of_the_mapped_files(cases, arch):
    """A folder's weights would be views into memory-mapped files at unaligned offsets; the
    loader copies them, so folder and single file round alike (see loading.own_memory)."""
    _, folder, _ = cases[arch]
    gp = GuidedPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.data_ptr() % 64 == 0 for p in getattr(gp.pipe, name).parameters()), name


def test_single_file_generates_like_folder(cases, arch):
    _, folder, path = cases[arch]
    from_file = GuidedPipeline.from_pretrained(path, config=str(folder))
    from_folder = GuidedPipeline.from_pretrained(folder)
    assert from_file.is_xl == from_folder.is_xl == (arch == "sdxl")
    kwargs: dict[str, Any] = dict(steps=2, seed=3, guidance=[CFG(4.0), PAG(2.0)])
    for prompts, negative in [("a cat", ""), (["a cat", "a dog"], "blurry")]:
        a = from_file.generate(prompts, negative, **kwargs)
        b = from_folder.generate(prompts, negative, **kwargs)
        assert torch.equal(a.latents, b.latents)
        assert all(
            np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True)
        )
        assert a.manifests[0]["model"]["hashes"] == b.manifests[0]["model"]["hashes"]


def test_cli_generate_from_single_file(cases, arch, tmp_path):
    _, folder, path = cases[arch]
    runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    res = runner.invoke(
        app,
        ["generate", "--model", str(path), "--config", str(folder), "--prompt", "a cat", "--steps", "2",
         "--seed", "5", "--cfg", "4", "--threads", "1", "--out", str(tmp_path), "--save-latents", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    latents, meta = load_latents(tmp_path / "diffguide-000-5.safetensors")
    assert meta["model"]["source"] == str(path)
    assert meta["model"]["architecture"] == arch
    # the same file through the API (which test_single_file_generates_like_folder ties to the folder)
    expected = GuidedPipeline.from_pretrained(path, config=str(folder)).generate(
        "a cat", steps=2, seed=5, guidance=[CFG(4.0)], decode=False
    )
    assert torch.equal(latents, expected.latents)


# --- what the loader refuses, with a clear message ---------------------------------------------


def test_equal_text_encoder_widths_are_refused(tmp_path):
    """diffusers reads ``conditioner.embedders.0`` for text_encoder_2 when both CLIP encoders have
    the same width (only tiny test models do), leaving text_projection unloaded ("meta"); the
    loader says so instead of failing at sampling time."""
    path = export(testing.tiny_sdxl(0), tmp_path / "tiny-sdxl")
    with pytest.raises(DiffguideError, match=r"no weights for 1 parameter\(s\) of the text_encoder_2"):
        load_pipeline(path, config=str(tmp_path / "tiny-sdxl"))


def test_config_of_the_other_architecture(cases):
    (_, sd15_folder, sd15_file), (_, sdxl_folder, sdxl_file) = cases["sd15"], cases["sdxl"]
    with pytest.raises(DiffguideError, match=r"is SD1\.5 but --config .* is an SDXL model"):
        load_pipeline(sd15_file, config=str(sdxl_folder))
    with pytest.raises(DiffguideError, match=r"is SDXL but --config .* is an SD1\.5 model"):
        load_pipeline(sdxl_file, config=str(sd15_folder))


def test_config_not_a_diffusers_folder(cases, tmp_path):
    _, _, path = cases["sd15"]
    for config in (tmp_path, tmp_path / "missing"):
        with pytest.raises(DiffguideError, match="is not a diffusers model folder"):
            load_pipeline(path, config=str(config))


def test_checkpoint_without_vae(cases, tmp_path):
    pipe, folder, _ = cases["sd15"]
    path = tmp_path / "no-vae.safetensors"
    ckpt = ldm_export.sd15_to_ldm(pipe)
    save_file({k: v for k, v in ckpt.items() if not k.startswith(ldm_export.VAE_PREFIX)}, str(path))
    with pytest.raises(DiffguideError, match=r"could not load single-file checkpoint .*AutoencoderKL") as err:
        load_pipeline(path, config=str(folder))
    assert "\n" not in str(err.value)
