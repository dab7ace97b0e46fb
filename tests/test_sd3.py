"""SD3 / SD3.5 family: diffguide vs diffusers' StableDiffusion3Pipeline on tiny models.

Same components, seeds (one CPU generator per image, ``seed + i``) and schedule; final
latents (before the VAE) must agree to 1e-4. Every step is one transformer forward for all
branches (uncond, cond, SLG), counted with a hook.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from families_support import (
    check_generate_and_replay,
    guided_latents,
    max_diff,
    pipeline_latents,
    save_tiny,
    tiny_sd3,
)

from diffguide import CFG, SLG, Conditioning, ConfigError, GenerateConfig, GuidedPipeline
from diffguide.conditioning import load_conditioning, save_conditioning
from diffguide.guidance.base import StepInfo
from diffguide.models.families import family_of
from diffguide.models.families.sd3 import SD3Family

TOL = 1e-4
STEPS = 4
SEED = 7
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["ugly", ""]


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def sd35_pipe():
    return tiny_sd3(seed=1, sd35=True)


def reference(pipe, prompts, negatives, steps=STEPS, **kwargs):
    """The diffusers pipeline's final latents (a new pipeline object over the same components)."""
    return pipeline_latents(pipe, prompts, negatives, steps=steps, seed=SEED, **kwargs)


def ours(pipe, guidance, prompts, negatives, steps=STEPS):
    return guided_latents(pipe, guidance, prompts, negatives, steps=steps, seed=SEED)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_cfg_matches_pipeline(arch, batch, request):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    prompts, negatives = PROMPTS[:batch], NEGATIVES[:batch]
    ref = reference(pipe, prompts, negatives, guidance_scale=5.0)
    got, rows = ours(pipe, [CFG(5.0)], prompts, negatives)
    assert got.shape == ref.shape == (batch, 16, 16, 16)
    assert rows == [2 * batch] * STEPS  # [uncond, cond] in one forward per step
    assert max_diff(got, ref) <= TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_slg_matches_pipeline_skip_guidance_layers(sd3_pipe, batch):
    """SLG on block 1 from 0.1 to 0.6 of 8 steps: the pipeline's strict window is steps 1..4."""
    steps, prompts, negatives = 8, PROMPTS[:batch], NEGATIVES[:batch]
    ref = reference(
        sd3_pipe,
        prompts,
        negatives,
        steps=steps,
        guidance_scale=5.0,
        skip_guidance_layers=[1],
        skip_layer_guidance_scale=2.8,
        skip_layer_guidance_start=0.1,
        skip_layer_guidance_stop=0.6,
    )
    slg = SLG(2.8, layers="transformer_blocks.1", start=0.1, stop=0.6)
    got, rows = ours(sd3_pipe, [CFG(5.0), slg], prompts, negatives, steps=steps)
    assert rows == [2 * batch] + [3 * batch] * 4 + [2 * batch] * 3  # SLG rows only inside its window
    assert max_diff(got, ref) <= TOL
    plain = reference(sd3_pipe, prompts, negatives, steps=steps, guidance_scale=5.0)
    assert (got - plain).abs().max().item() > 100 * TOL  # SLG changed the result
    assert all(not m._forward_hooks for m in sd3_pipe.transformer.modules())


def test_slg_window_is_the_pipelines_strict_rule():
    """Defaults 0.01..0.2 of 28 steps: the pipeline's steps 1..5 (the modular guider's int() rule
    would give 1..4)."""
    slg = SLG(layers="transformer_blocks.7-9")
    on = [i for i in range(28) if slg.active(StepInfo(i, 28, 0.5, 500.0))]
    assert on == [1, 2, 3, 4, 5]
    modular = [i for i in range(28) if int(0.01 * 28) < i < int(0.2 * 28)]
    assert modular == [1, 2, 3, 4]


def test_last_step_x0_is_the_final_latents(sd3_pipe):
    """StepInfo.to_x0 on a flow model: an Euler step to sigma 0 lands on x0 of the guided prediction."""
    seen = []
    gp = GuidedPipeline(sd3_pipe)
    out = gp.generate(
        PROMPTS, NEGATIVES, guidance=[CFG(4.0)], steps=3, seed=SEED, decode=False, callback=seen.append
    )
    last = seen[-1]
    assert last.step.prediction == "flow" and last.step.sigma == pytest.approx(
        out.manifests[0]["scheduler"]["sigmas"][-1]
    )
    assert (last.step.to_x0(last.guided) - out.latents).abs().max().item() <= 1e-5
    assert (last.step.to_x0(last.preds["cond"]) - out.latents).abs().max().item() > 1e-3


def test_decode_uses_scaling_and_shift_factor(sd3_pipe):
    captured = {}

    def grab(pipe, i, t, kw):
        captured["latents"] = kw["latents"]
        return {}

    ref = StableDiffusion3Pipeline(**sd3_pipe.components)
    ref.set_progress_bar_config(disable=True)
    images = ref(
        "a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=2, callback_on_step_end=grab
    ).images
    gp = GuidedPipeline(sd3_pipe)
    mine = gp.decode(captured["latents"])
    assert sd3_pipe.vae.config.shift_factor != 0
    assert list(mine[0].getdata()) == list(images[0].getdata())


def test_folder_load_manifest_and_conditioning_file(sd3_pipe, tmp_path):
    folder = save_tiny(sd3_pipe, tmp_path / "tiny-sd3")
    gp = GuidedPipeline.from_pretrained(folder)
    assert isinstance(gp.family, SD3Family) and gp.default_size() == 32
    out = gp.generate(PROMPTS, NEGATIVES, guidance=[CFG(3.0)], steps=2, seed=SEED, decode=False)
    model = out.manifests[0]["model"]
    assert (model["family"], model["architecture"], model["prediction_type"]) == ("sd3", "sd3", "flow")
    assert set(model["hashes"]) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    # the same run from a conditioning file of the encoded prompts is bit-identical
    cond, uncond = gp.encode(gp_config(PROMPTS, NEGATIVES), 32, 32)
    path = save_conditioning(tmp_path / "c.safetensors", cond, uncond)
    again = gp.generate(
        PROMPTS, guidance=[CFG(3.0)], steps=2, seed=SEED, decode=False, conditioning=load_conditioning(path)
    )
    assert torch.equal(again.latents, out.latents)


def gp_config(prompts, negatives):
    return GenerateConfig.create(prompts, negatives, guidance=[CFG(3.0)])


def test_family_errors(sd3_pipe):
    gp = GuidedPipeline(sd3_pipe)
    assert family_of(sd3_pipe).name == "sd3"
    with pytest.raises(
        ConfigError, match=r"^scheduler 'ddim' does not run sd3 models; choose one of: euler$"
    ):
        gp.generate("a", guidance=[CFG(2.0)], steps=2, scheduler="ddim")
    real = SimpleNamespace(
        vae_scale_factor=8, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2))
    )
    with pytest.raises(ConfigError, match=r"^height must be a multiple of 16 for this sd3 model, got 24$"):
        SD3Family().check_size(real, 24, 32)
    with pytest.raises(ConfigError, match="needs pooled conditioning"):
        SD3Family().check(sd3_pipe.transformer, Conditioning(torch.zeros(1, 3, 64)))


def test_cli_generate_replay(sd3_pipe, tmp_path):
    folder = save_tiny(sd3_pipe, tmp_path / "tiny-sd3")
    run = ["generate", "-m", str(folder), "-p", "a cat", "-p", "a dog", "--cfg", "5", "--steps", "3"]
    check_generate_and_replay(run, tmp_path / "out")


@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory):
    """A random LoRA on the tiny SD3 transformer's attention projections, in diffusers' format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd3(seed=0)
    torch.manual_seed(3)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("sd3-lora")
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_matches_pipeline(sd3_lora):
    gp = GuidedPipeline(tiny_sd3(seed=0))
    before = gp.component_hashes()["transformer"]
    gp.load_lora(sd3_lora, 0.7)
    out = gp.generate(PROMPTS, NEGATIVES, guidance=[CFG(5.0)], steps=3, seed=SEED, decode=False)
    lora = out.manifests[0]["model"]["loras"][0]
    assert lora["scale"] == 0.7 and out.manifests[0]["model"]["hashes"]["transformer"] != before
    ref_pipe = tiny_sd3(seed=0)
    ref_pipe.load_lora_weights(str(sd3_lora), adapter_name="x")
    ref_pipe.set_adapters(["x"], adapter_weights=[0.7])
    ref = reference(ref_pipe, PROMPTS, NEGATIVES, steps=3, guidance_scale=5.0)
    assert max_diff(out.latents, ref) <= TOL
    plain = reference(tiny_sd3(seed=0), PROMPTS, NEGATIVES, steps=3, guidance_scale=5.0)
    assert (out.latents - plain).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_pag_matches_sd3_pag_pipeline(sd3_pipe, batch):
    """PAG on block 1's joint attention (diagonal image->image map, as diffusers' SD3 PAG processor)
    vs StableDiffusion3PAGPipeline with pag_applied_layers 'blocks.1' (4 blocks: only block 1)."""
    from diffusers import StableDiffusion3PAGPipeline

    from diffguide import PAG

    prompts, negatives = PROMPTS[:batch], NEGATIVES[:batch]
    parts = {k: v for k, v in sd3_pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    ref_pipe = StableDiffusion3PAGPipeline(**parts, pag_applied_layers="blocks.1")
    ref_pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(batch)]
    ref = ref_pipe(
        prompts, negative_prompt=negatives, generator=gens, num_inference_steps=STEPS, guidance_scale=5.0,
        pag_scale=3.0, output_type="latent",
    ).images  # fmt: skip
    got, rows = ours(sd3_pipe, [CFG(5.0), PAG(3.0, layers="transformer_blocks.1")], prompts, negatives)
    assert rows == [3 * batch] * STEPS
    print(f"sd3 cfg+pag batch {batch}: max abs diff {(got - ref).abs().max().item():.3g}")
    assert max_diff(got, ref) <= TOL
    plain = reference(sd3_pipe, prompts, negatives, guidance_scale=5.0)
    assert (got - plain).abs().max().item() > 100 * TOL


def test_cli_slg_options(sd3_pipe, tmp_path):
    from typer.testing import CliRunner

    from diffguide.cli.main import app

    folder = save_tiny(sd3_pipe, tmp_path / "tiny-sd3")
    run = [
        "generate",
        "-m",
        str(folder),
        "-p",
        "a cat",
        "--cfg",
        "5",
        "--steps",
        "8",
        "-o",
        str(tmp_path / "o"),
    ]
    res = CliRunner().invoke(
        app, [*run, "--slg", "2.8", "--slg-layers", "b1", "--slg-start", "0.1", "--slg-stop", "0.6"]
    )
    assert res.exit_code == 0, res.output
    assert "slg layers: b1 -> 1 transformer block" in res.output
    assert "done in" in res.output and "8 model forward calls" in res.output
    png = next(line for line in res.output.splitlines() if line.endswith(".png"))
    replayed = CliRunner().invoke(app, ["replay", png])
    assert replayed.exit_code == 0 and "bit-identical" in replayed.output and "NOT" not in replayed.output
    res = CliRunner().invoke(app, [*run, "--slg-layers", "b1"])
    assert res.exit_code == 2
    assert "--slg-layers/--slg-start/--slg-stop given but --slg is 0 (SLG off): set --slg" in res.output
    res = CliRunner().invoke(app, [*run, "--slg", "1", "--slg-layers", "b9"])
    assert res.exit_code == 2 and "block 9 is past the last block" in res.output


def test_pag_semantics_value_vs_diagonal(sd3_pipe):
    """PAG(semantics=...) picks the joint-attention identity: "diagonal" (diffusers' SD3 PAG
    processor, the default) or "value" (the whole joint map -> V); each is a different perturbed
    branch, recorded in the manifest and rebuilt by replay's registry; a bad name is one line."""
    from diffguide import PAG
    from diffguide.guidance.registry import term_from_dict

    gp = GuidedPipeline(sd3_pipe)

    def run(pag):
        return gp.generate(
            PROMPTS[:1], NEGATIVES[:1], guidance=[CFG(5.0), pag], steps=STEPS, seed=SEED, decode=False
        )

    diag, value = run(PAG(3.0, layers="b1")), run(PAG(3.0, layers="b1", semantics="value"))
    assert (diag.latents - value.latents).abs().max().item() > 1e-3
    recorded = value.manifests[0]["parameters"]["guidance"][1]
    assert (
        recorded["semantics"] == "value" and "semantics" not in diag.manifests[0]["parameters"]["guidance"][1]
    )
    assert term_from_dict(recorded) == PAG(3.0, layers="b1", semantics="value")
    with pytest.raises(ConfigError, match=r"^PAG semantics must be one of diagonal, value, got 'v'$"):
        PAG(3.0, semantics="v")  # type: ignore[arg-type]
