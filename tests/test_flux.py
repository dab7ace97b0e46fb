"""Flux family: diffguide vs diffusers' FluxPipeline on tiny models (diffguide.testing_dit).

Same components, seeds (one CPU generator per image, ``seed + i``) and schedule (linspace
sigmas, dynamic shift from the packed sequence length); final latents (before the VAE,
unpacked) must agree to 1e-4. Embedded guidance is a model input (no branch); true CFG runs
the negative rows in the same forward as the conditional rows (diffusers: two calls).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from families_support import max_diff, save_tiny
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffguide import (
    CFG,
    PAG,
    SLG,
    TPG,
    ConfigError,
    DiffguideError,
    EmbeddedGuidance,
    GuidedPipeline,
    testing,
)
from diffguide.conditioning import load_conditioning, save_conditioning
from diffguide.errors import BlockIndexError
from diffguide.models.families.flux import FluxFamily, flux_sigmas, pack, unpack
from diffguide.pipeline import GenerateConfig
from diffguide.testing_dit import tiny_flux

TOL = 1e-4
STEPS = 4
SEED = 7
SIZE = 32  # pixels: VAE x2, packed 2x2 -> 8x8 = 64 tokens
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["ugly", "blurry"]


@pytest.fixture(scope="module")
def dev():
    pipe = tiny_flux(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def schnell():
    pipe = tiny_flux(seed=1, guidance_embeds=False, dynamic_shift=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_calls(model):
    """A list that fills with the row count of every forward of ``model``, and the hook handle."""
    rows: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: rows.append(int(k["hidden_states"].shape[0])), with_kwargs=True
    )
    return rows, handle


def reference(pipe, prompts, steps=STEPS, height=SIZE, width=SIZE, **kwargs):
    """diffusers' final latents, unpacked to (B, C, H, W), and its forwards' row counts."""
    ref = FluxPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(prompts))]
    rows, handle = count_calls(pipe.transformer)
    try:
        out = ref(
            prompts,
            height=height,
            width=width,
            generator=gens,
            num_inference_steps=steps,
            output_type="latent",
            **kwargs,
        ).images
    finally:
        handle.remove()
    return FluxPipeline._unpack_latents(out, height, width, ref.vae_scale_factor), rows, ref


def ours(pipe, guidance, prompts, negatives="", steps=STEPS, height=SIZE, width=SIZE, **kwargs):
    gp = GuidedPipeline(pipe)
    rows, handle = count_calls(pipe.transformer)
    try:
        out = gp.generate(
            prompts,
            negatives,
            guidance=guidance,
            steps=steps,
            seed=SEED,
            width=width,
            height=height,
            decode=False,
            **kwargs,
        )
    finally:
        handle.remove()
    assert out.forward_calls == steps == len(rows)
    return out, rows


@pytest.mark.parametrize("batch", [1, 2])
def test_embedded_guidance_matches_pipeline(dev, batch):
    ref, ref_rows, _ = reference(dev, PROMPTS[:batch], guidance_scale=2.5)
    out, rows = ours(dev, [EmbeddedGuidance(2.5)], PROMPTS[:batch])
    assert out.latents.shape == ref.shape == (batch, 4, 16, 16)
    assert rows == ref_rows == [batch] * STEPS  # no branch: the conditional rows only
    assert max_diff(out.latents, ref) <= TOL
    other, _ = ours(dev, [EmbeddedGuidance(6.0)], PROMPTS[:batch])
    assert (other.latents - ref).abs().max().item() > 100 * TOL  # the scale reaches the model


@pytest.mark.parametrize("batch", [1, 2])
def test_true_cfg_matches_pipeline_in_one_forward(dev, batch):
    prompts, negatives = PROMPTS[:batch], NEGATIVES[:batch]
    ref, ref_rows, _ = reference(
        dev, prompts, negative_prompt=negatives, true_cfg_scale=4.0, guidance_scale=2.0
    )
    out, rows = ours(dev, [CFG(4.0), EmbeddedGuidance(2.0)], prompts, negatives)
    assert ref_rows == [batch] * (2 * STEPS)  # diffusers: cond and negative as two calls
    assert rows == [2 * batch] * STEPS  # diffguide: [negative, cond] in one forward
    assert max_diff(out.latents, ref) <= TOL


def test_non_square_matches_pipeline(dev):
    """48x32 pixels: 12x8 packed tokens, img_ids rows/columns and unpacking follow the sides."""
    ref, _, _ = reference(dev, PROMPTS, height=48, width=32, guidance_scale=3.0)
    out, _ = ours(dev, [EmbeddedGuidance(3.0)], PROMPTS, height=48, width=32)
    assert out.latents.shape == ref.shape == (2, 4, 24, 16)
    assert max_diff(out.latents, ref) <= TOL


def test_slg_on_flux_blocks(dev):
    """SLG skipping joint block 1 and single block 0 adds its rows inside the pipeline-style window."""
    terms = [CFG(4.0), EmbeddedGuidance(2.0)]
    base, _ = ours(dev, terms, PROMPTS, NEGATIVES)
    slg = SLG(2.8, layers="b1,s0", start=0.0, stop=0.6)
    out, rows = ours(dev, [*terms, slg], PROMPTS, NEGATIVES)
    assert rows == [4, 6, 6, 4]  # steps 1 and 2 of 4 (0 < i < 2.4)
    assert (out.latents - base.latents).abs().max().item() > 100 * TOL


def test_default_embedded_guidance_is_recorded(dev):
    """Without the term a dev-like model runs at diffusers' default 3.5, recorded in the manifest."""
    ref, _, _ = reference(dev, PROMPTS[:1])
    out, _ = ours(dev, [], PROMPTS[:1])
    assert max_diff(out.latents, ref) <= TOL
    assert out.manifests[0]["parameters"]["guidance"] == [{"method": "embedded_guidance", "scale": 3.5}]
    assert out.manifests[0]["model"]["architecture"] == "flux-dev"


@pytest.mark.parametrize("batch", [1, 2])
def test_schnell_like_without_guidance_embedding(schnell, batch):
    """guidance_embeds=False and a static-shift scheduler (3.0): plain runs and true CFG."""
    prompts, negatives = PROMPTS[:batch], NEGATIVES[:batch]
    ref, _, ref_pipe = reference(schnell, prompts)
    out, rows = ours(schnell, [], prompts)
    assert rows == [batch] * STEPS
    assert max_diff(out.latents, ref) <= TOL
    sigmas = ref_pipe.scheduler.sigmas[:-1].tolist()
    assert out.manifests[0]["scheduler"]["sigmas"] == sigmas
    assert out.manifests[0]["model"]["architecture"] == "flux-schnell"
    ref, _, _ = reference(schnell, prompts, negative_prompt=negatives, true_cfg_scale=3.0)
    out, rows = ours(schnell, [CFG(3.0)], prompts, negatives)
    assert rows == [2 * batch] * STEPS
    assert max_diff(out.latents, ref) <= TOL


def test_schedule_is_fluxpipelines(dev):
    """linspace(1, 1/N, N) sigmas, shifted with mu from the packed sequence length (64 tokens)."""
    _, _, ref_pipe = reference(dev, PROMPTS[:1], steps=5)
    out, _ = ours(dev, [], PROMPTS[:1], steps=5)
    sched = out.manifests[0]["scheduler"]
    assert sched["sigmas"] == ref_pipe.scheduler.sigmas[:-1].tolist()
    assert sched["timesteps"] == ref_pipe.scheduler.timesteps.tolist()
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    expected = [torch.e**mu / (torch.e**mu + (1 / s - 1)) for s in flux_sigmas(5)]
    assert sched["sigmas"] == pytest.approx(expected, abs=1e-6)
    assert flux_sigmas(5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_pack_unpack_round_trip():
    x = torch.randn(2, 4, 6, 10)
    packed = pack(x)
    assert packed.shape == (2, 15, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), x)
    assert torch.equal(FluxFamily().unpack(packed, 24, 40), x)  # pixel sides, VAE x4


def test_true_cfg_pag_tpg_one_forward_per_step(dev):
    """True CFG + PAG on joint block 1 + TPG on single blocks 0-1: 4 branches, one forward a step;
    the model computes what it did before afterwards."""
    batch = 2
    prompts, negatives = PROMPTS, NEGATIVES
    before, _ = ours(dev, [CFG(4.0), EmbeddedGuidance(2.0)], prompts, negatives)
    terms = [CFG(4.0), EmbeddedGuidance(2.0), PAG(2.0, layers="b1"), TPG(2.0, layers="s0-1")]
    out, rows = ours(dev, terms, prompts, negatives)
    assert rows == [4 * batch] * STEPS
    assert (out.latents - before.latents).abs().max().item() > 100 * TOL  # the perturbations act
    guidance = out.manifests[0]["parameters"]["guidance"]
    assert [g["method"] for g in guidance] == ["cfg", "embedded_guidance", "pag", "tpg"]
    again, _ = ours(dev, [CFG(4.0), EmbeddedGuidance(2.0)], prompts, negatives)
    assert torch.equal(again.latents, before.latents)


def test_decode_matches_pipeline_images(dev):
    """Unpacked latents / scaling_factor + shift_factor through the VAE: the pipeline's image."""
    ref = FluxPipeline(**dev.components)
    ref.set_progress_bar_config(disable=True)
    image = ref(
        PROMPTS[0],
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(SEED),
    ).images[0]
    out = GuidedPipeline(dev).generate(PROMPTS[0], guidance=[], steps=2, seed=SEED, width=SIZE, height=SIZE)
    assert dev.vae.config.shift_factor != 0
    assert list(out.images[0].getdata()) == list(image.getdata())


def test_conditioning_file_run_is_bit_identical(dev, tmp_path):
    gp = GuidedPipeline(dev)
    terms = [CFG(3.0), EmbeddedGuidance(2.0)]
    out = gp.generate(
        PROMPTS, NEGATIVES, guidance=terms, steps=2, seed=SEED, width=SIZE, height=SIZE, decode=False
    )
    cond, uncond = gp.encode(GenerateConfig.create(PROMPTS, NEGATIVES, guidance=terms), SIZE, SIZE)
    path = save_conditioning(tmp_path / "c.safetensors", cond, uncond)
    again = gp.generate(
        PROMPTS,
        guidance=terms,
        steps=2,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        decode=False,
        conditioning=load_conditioning(path),
    )
    assert torch.equal(again.latents, out.latents)
    model = out.manifests[0]["model"]
    assert (model["family"], model["prediction_type"]) == ("flux", "flow")
    assert set(model["hashes"]) == {"transformer", "vae", "text_encoder", "text_encoder_2"}


def test_bad_inputs_are_one_line_errors(dev, schnell):
    gp = GuidedPipeline(dev)
    with pytest.raises(
        ConfigError,
        match=r"^cfg on this guidance-distilled Flux model is true CFG and needs a negative prompt "
        r"\(as diffusers' true_cfg_scale\): give one, or set the CFG scale to 1 \(--cfg 1\) for "
        r"embedded guidance alone$",
    ):
        gp.generate("a cat", guidance=[CFG(4.0)], steps=2, width=SIZE, height=SIZE)
    with pytest.raises(
        ConfigError,
        match=r"^this Flux model has no guidance embedding \(guidance_embeds=False, schnell-like\): "
        r"drop the embedded guidance$",
    ):
        GuidedPipeline(schnell).generate("a cat", guidance=[EmbeddedGuidance(3.5)], steps=2)
    with pytest.raises(
        BlockIndexError, match=r"^layer 'b5': block 5 is past the last block; transformer_blocks"
    ):
        gp.generate("a cat", guidance=[PAG(2.0, layers="b5")], steps=2, width=SIZE, height=SIZE)
    with pytest.raises(ConfigError, match=r"^give embedded guidance once \(it is one model input\)$"):
        gp.generate("a cat", guidance=[EmbeddedGuidance(), EmbeddedGuidance(2.0)], steps=2)
    with pytest.raises(
        ConfigError, match=r"^--shift does not apply to this Flux model: its shift is dynamic"
    ):
        gp.generate("a cat", guidance=[], steps=2, width=SIZE, height=SIZE, shift=2.0)
    # a VAE with x8 downsampling (as real Flux): sides must be multiples of 16
    torch.manual_seed(0)
    vae8 = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
    )
    big = GuidedPipeline(FluxPipeline(**{**dev.components, "vae": vae8}))
    with pytest.raises(ConfigError, match=r"^height must be a multiple of 16 for this flux model, got 24$"):
        big.generate("a cat", guidance=[], steps=2, width=32, height=24)
    real = SimpleNamespace(
        vae_scale_factor=8, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=1))
    )
    with pytest.raises(ConfigError, match=r"^width must be a multiple of 16 for this flux model, got 1000$"):
        FluxFamily().check_size(real, 1024, 1000)


def test_embedded_guidance_on_other_families_is_an_error():
    from diffguide.models.families.sd3 import SD3Family

    with pytest.raises(
        ConfigError,
        match=r"^embedded guidance is an input of guidance-distilled models \(Flux dev\); "
        r"this sd3 model has no guidance embedding$",
    ):
        SD3Family().guidance_terms(None, (EmbeddedGuidance(),), True)


def test_cli_generate_replay(dev, tmp_path):
    from typer.testing import CliRunner

    from diffguide.cli.main import app

    folder = save_tiny(dev, tmp_path / "tiny-flux")
    run = ["generate", "-m", str(folder), "-p", "a cat", "-p", "a dog", "-N", "ugly", "-W", "32", "-H", "32"]
    run += ["--cfg", "3", "--embedded-guidance", "2.5", "--pag", "2", "--pag-layers", "b1", "--steps", "3"]
    res = CliRunner().invoke(app, [*run, "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    png = next(line for line in res.output.splitlines() if line.endswith("-001-1.png"))
    res = CliRunner().invoke(app, ["replay", png])
    assert res.exit_code == 0 and "bit-identical" in res.output and "NOT" not in res.output
    plain = ["generate", "-m", str(folder), "-p", "a cat", "-W", "32", "-H", "32", "--steps", "2"]
    res = CliRunner().invoke(app, [*plain, "-o", str(tmp_path / "plain"), "-q"])
    assert res.exit_code == 0, res.output  # no --cfg: FluxPipeline's defaults, embedded guidance 3.5
    manifest = json.loads(next((tmp_path / "plain").glob("*.json")).read_text())
    assert manifest["parameters"]["guidance"] == [{"method": "embedded_guidance", "scale": 3.5}]
    assert manifest["parameters"]["default_cfg"] is False  # resolved: replay needs no defaults
    res = CliRunner().invoke(app, [*plain, "--cfg", "4"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: cfg on this guidance-distilled Flux model")


def test_api_defaults_are_fluxpipelines(dev):
    """No guidance given: no true CFG and embedded guidance 3.5, as FluxPipeline's defaults."""
    ref, _, _ = reference(dev, PROMPTS[:1])
    out = GuidedPipeline(dev).generate(
        PROMPTS[0], steps=STEPS, seed=SEED, height=SIZE, width=SIZE, decode=False
    )
    assert out.manifests[0]["parameters"]["guidance"] == [{"method": "embedded_guidance", "scale": 3.5}]
    assert max_diff(out.latents, ref) <= TOL


def _lora(pipe, folder, attr):
    """A random LoRA (r 4) on ``pipe``'s ``attr`` network's attention projections, diffusers' format."""
    torch.manual_seed(7)
    net = getattr(pipe, attr)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in net.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    type(pipe).save_lora_weights(folder, **{f"{attr}_lora_layers": get_peft_model_state_dict(net)})
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_matches_pipeline(tmp_path):
    """A LoRA at scale 0.7 through diffusers' loader, true CFG, batch 2; an SD LoRA is refused."""
    path = _lora(tiny_flux(seed=0), tmp_path, "transformer")
    ref_pipe = tiny_flux(seed=0)
    ref_pipe.load_lora_weights(str(path), adapter_name="x")
    ref_pipe.set_adapters(["x"], adapter_weights=[0.7])
    kwargs = {"negative_prompt": NEGATIVES, "true_cfg_scale": 4.0, "guidance_scale": 2.0}
    ref, _, _ = reference(ref_pipe, PROMPTS, **kwargs)
    pipe = tiny_flux(seed=0)
    GuidedPipeline(pipe).load_lora(path, 0.7)
    out, rows = ours(pipe, [CFG(4.0), EmbeddedGuidance(2.0)], PROMPTS, NEGATIVES)
    assert rows == [4] * STEPS
    assert max_diff(out.latents, ref) <= TOL
    plain, _ = ours(tiny_flux(seed=0), [CFG(4.0), EmbeddedGuidance(2.0)], PROMPTS, NEGATIVES)
    assert (plain.latents - ref).abs().max().item() > 100 * TOL  # the LoRA acts
    sd_lora = _lora(testing.tiny_sd15(seed=0), tmp_path / "sd", "unet")
    with pytest.raises(
        DiffguideError, match=r"^LoRA '.*' has no weights that fit this FluxPipeline \(a LoRA"
    ):
        GuidedPipeline(tiny_flux(seed=0)).load_lora(sd_lora, 0.7)
