"""Bad inputs at the API level raise a DiffguideError (ConfigError, LayerSpecError) that says
what is wrong; nothing fails later with a raw torch/diffusers/safetensors error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffguide import (
    CFG,
    PAG,
    TPG,
    Conditioning,
    ConfigError,
    DiffguideError,
    GenerateConfig,
    GuidedModel,
    GuidedPipeline,
    UNetDenoiser,
    Window,
)
from diffguide.models.loading import load_pipeline
from diffguide.sampling.schedulers import make_scheduler

# --- numbers out of range ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_steps_out_of_range(steps):
    with pytest.raises(ConfigError, match=f"steps must be between 1 and 1000, got {steps}"):
        GenerateConfig.create("a cat", steps=steps)


def test_steps_out_of_range_through_generate(sd15):
    with pytest.raises(ConfigError, match="steps must be between"):
        sd15.generate("a cat", steps=0, decode=False)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: CFG(-1.0), r"CFG scale must be in \[0, 100\], got -1.0"),
        (lambda: CFG(101.0), r"CFG scale must be in \[0, 100\]"),
        (lambda: PAG(-0.5), r"PAG scale must be in \[0, 100\]"),
        (lambda: PAG(3.0, adaptive_scale=-0.1), "PAG adaptive_scale must be >= 0"),
        (lambda: TPG(200.0), r"TPG scale must be in \[0, 100\], got 200.0"),
    ],
)
def test_scale_out_of_range(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


@pytest.mark.parametrize("phi", [-0.1, 1.5])
def test_rescale_out_of_range(phi):
    with pytest.raises(ConfigError, match=r"CFG rescale must be in \[0, 1\]"):
        CFG(5.0, rescale=phi)


@pytest.mark.parametrize(("start", "end"), [(0.5, 0.5), (0.8, 0.2)])
def test_window_start_not_below_end(start, end):
    with pytest.raises(ConfigError, match=rf"window start \({start}\) must be below its end \({end}\)"):
        Window(start=start, end=end)


def test_window_bounds():
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        Window(end=1.5)
    with pytest.raises(ConfigError, match="sigma_min <= sigma_max"):
        Window(sigma_min=3.0, sigma_max=1.0)


@pytest.mark.parametrize(("side", "value"), [("width", 33), ("height", 30), ("width", 0), ("height", -8)])
def test_size_not_a_multiple_of_8(side, value):
    with pytest.raises(ConfigError, match=f"{side} must be a positive multiple of 8, got {value}"):
        GenerateConfig.create("a cat", **{side: value})


def test_size_through_generate(sd15):
    with pytest.raises(ConfigError, match="width must be a positive multiple of 8, got 36"):
        sd15.generate("a cat", width=36, steps=1, decode=False)


def test_max_rows_must_be_positive(sd15):
    with pytest.raises(ConfigError, match="max_rows must be >= 1, got 0"):
        sd15.generate("a cat", max_rows=0, steps=1, decode=False)


def test_eta_out_of_range():
    with pytest.raises(ConfigError, match=r"eta must be in \[0, 1\]"):
        GenerateConfig.create("a cat", eta=2.0)


# --- prompts ----------------------------------------------------------------------------------


def test_negative_list_length_mismatch():
    with pytest.raises(
        ConfigError, match="2 negative prompts for 3 images: give one negative prompt, or one per image"
    ):
        GenerateConfig.create(["a", "b", "c"], ["x", "y"])


def test_prompt_count_mismatch_with_num_images():
    with pytest.raises(ConfigError, match="3 prompts for 2 images"):
        GenerateConfig.create(["a", "b", "c"], num_images=2)


def test_zero_images():
    with pytest.raises(ConfigError, match="number of images must be >= 1"):
        GenerateConfig.create("a", num_images=0)
    with pytest.raises(ConfigError, match="number of images must be >= 1, got 0"):
        GenerateConfig.create([])


def test_one_prompt_and_one_negative_broadcast():
    cfg = GenerateConfig.create("a", "b", num_images=3)
    assert cfg.prompts == ("a",) * 3 and cfg.negative_prompts == ("b",) * 3


# --- schedulers, branches, conditioning -------------------------------------------------------


def test_unknown_scheduler(sd15):
    with pytest.raises(ConfigError, match="unknown scheduler 'dpm_fancy'; choose one of: euler, euler_a"):
        sd15.generate("a cat", scheduler="dpm_fancy", steps=1, decode=False)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        make_scheduler("EULER", sd15.pipe.scheduler.config)


def test_duplicate_branch_names(sd15):
    # two different PAG terms under one name
    with pytest.raises(
        ConfigError, match="two guidance terms define a branch named 'pag'; give one of them another name="
    ):
        sd15.generate("a cat", guidance=[PAG(3.0), PAG(2.0, layers="d0")], steps=1, decode=False)
    # even two identical ones (the second would silently double the branch's rows)
    with pytest.raises(ConfigError, match="branch named 'pag'"):
        sd15.generate("a cat", guidance=[PAG(3.0), PAG(3.0)], steps=1, decode=False)
    # a TPG named like a PAG
    with pytest.raises(ConfigError, match="branch named 'x'"):
        sd15.generate("a cat", guidance=[PAG(3.0, name="x"), TPG(3.0, name="x")], steps=1, decode=False)


def test_distinct_names_are_fine(sd15, unet_calls):
    terms = [PAG(3.0, name="pag_mid"), PAG(2.0, layers="d0", name="pag_down")]
    with unet_calls(sd15.unet) as log:
        sd15.generate("a cat", guidance=terms, steps=1, decode=False)
    assert log.rows == [3]


def test_two_cfg_terms_share_the_uncond_branch(sd15, unet_calls):
    with unet_calls(sd15.unet) as log:
        sd15.generate("a cat", guidance=[CFG(3.0), CFG(2.0, name="cfg2")], steps=1, decode=False)
    assert log.rows == [2]


def sdxl_rows(pipe, batch=1):
    unet = pipe.unet
    embeds = torch.zeros(batch, 77, unet.config.cross_attention_dim)
    pooled = torch.zeros(batch, pipe.text_encoder_2.config.projection_dim)
    ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)
    return embeds, pooled, ids


def test_sdxl_unet_without_pooled_or_time_ids(sdxl_pipe):
    den = UNetDenoiser(sdxl_pipe.unet)
    embeds, pooled, ids = sdxl_rows(sdxl_pipe)
    with pytest.raises(ConfigError, match="needs pooled and time_ids conditioning"):
        GuidedModel(den, [CFG(5.0)], Conditioning(embeds), Conditioning(embeds), [0])
    with pytest.raises(ConfigError, match="needs time_ids conditioning"):
        GuidedModel(den, [], Conditioning(embeds, pooled), None, [0])
    with pytest.raises(ConfigError, match="needs pooled conditioning"):
        GuidedModel(den, [CFG(5.0)], Conditioning(embeds, pooled, ids), Conditioning(embeds, None, ids), [0])
    with pytest.raises(ConfigError, match="addition_embed_type='text_time'"):
        den.check(Conditioning(embeds))
    GuidedModel(den, [CFG(5.0)], Conditioning(embeds, pooled, ids), Conditioning(embeds, pooled, ids), [0])


def test_sd15_unet_needs_no_pooled(sd15_pipe):
    den = UNetDenoiser(sd15_pipe.unet)
    den.check(Conditioning(torch.zeros(1, 77, 32)))  # no error


def test_unsupported_prediction_type(sd15_pipe):
    with pytest.raises(ConfigError, match="unsupported prediction type 'sample'"):
        UNetDenoiser(sd15_pipe.unet, "sample")


def test_uncond_needed_but_missing(sd15_pipe):
    den = UNetDenoiser(sd15_pipe.unet)
    c = Conditioning(torch.zeros(1, 77, 32))
    with pytest.raises(ConfigError, match="needs the unconditional branch but no negative conditioning"):
        GuidedModel(den, [CFG(5.0)], c, None, [0])


# --- model files ------------------------------------------------------------------------------


def test_missing_model_path(tmp_path):
    with pytest.raises(DiffguideError, match="does not exist"):
        GuidedPipeline.from_pretrained(tmp_path / "no-such-model")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(DiffguideError, match=r"not a diffusers model \(no model_index\.json\)"):
        GuidedPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoint_is_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(DiffguideError, match=r"is a pickle file.*loads only \.safetensors"):
        GuidedPipeline.from_pretrained(path)


def test_pickle_lora_is_refused(tmp_path, sd15):
    path = tmp_path / "lora.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(DiffguideError, match="safetensors"):
        sd15.load_lora(path)
    assert sd15.loras == []


def test_other_file_type(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(DiffguideError, match=r"not a \.safetensors file or a diffusers model folder"):
        load_pipeline(path)


@pytest.mark.parametrize("keep", [0, 5, 20, "half", "minus1"])
def test_truncated_safetensors(tmp_path, keep):
    full = tmp_path / "full.safetensors"
    save_file({"a": torch.randn(64, 8), "b": torch.randn(3)}, str(full))
    data = full.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:n])
    for config in (None, str(tmp_path)):
        with pytest.raises(
            DiffguideError, match="not a valid safetensors file \\(truncated or wrong format\\)"
        ):
            load_pipeline(cut, config=config)


def test_garbage_safetensors_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(DiffguideError, match="not a valid safetensors file"):
        load_pipeline(path)


def test_complete_single_file_needs_config(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(DiffguideError, match="needs --config"):
        load_pipeline(path)
