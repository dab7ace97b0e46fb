"""AuraFlow family: diffguide vs diffusers' AuraFlowPipeline on the tiny model (UMT5 encoder).

Same components, seeds (one CPU generator per image, ``seed + i``) and schedule (static shift
1.73 from the scheduler config); final latents agree to 1e-4. CFG runs [uncond, cond] in ONE
forward per step, counted with a hook. The transformer's weights are re-drawn at a useful size
(``dit_support._liven``): diffusers zero-initialises AuraFlow's modulations, and with them the
text and every perturbation barely move the prediction.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import AuraFlowPipeline
from dit_support import _liven as liven
from families_support import check_generate_and_replay, guided_latents, max_diff, pipeline_latents, save_tiny

from diffguide import CFG, ConfigError, GuidedPipeline
from diffguide.conditioning import load_conditioning, save_conditioning
from diffguide.models.families import family_of
from diffguide.models.families.auraflow import AuraFlowFamily
from diffguide.testing_dit import tiny_auraflow

TOL = 1e-4
STEPS = 4
SEED = 7
SIZE = 32  # the tiny model's largest size (8 x 8 patches of its positional embedding)
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["ugly", ""]


@pytest.fixture(scope="module")
def aura_pipe():
    pipe = tiny_auraflow(seed=0)
    liven(
        pipe.transformer, 3
    )  # diffusers zero-initialises AuraFlow's modulations: blocks would be identities
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompts, negatives, steps=STEPS, **kwargs):
    return pipeline_latents(
        pipe, prompts, negatives, steps=steps, seed=SEED, height=SIZE, width=SIZE, **kwargs
    )


def ours(pipe, guidance, prompts, negatives, steps=STEPS):
    return guided_latents(pipe, guidance, prompts, negatives, steps=steps, seed=SEED)


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_matches_pipeline(aura_pipe, batch):
    prompts, negatives = PROMPTS[:batch], NEGATIVES[:batch]
    ref = reference(aura_pipe, prompts, negatives, guidance_scale=5.0)
    got, rows = ours(aura_pipe, [CFG(5.0)], prompts, negatives)
    assert got.shape == ref.shape == (batch, 4, 16, 16)
    assert rows == [2 * batch] * STEPS  # [uncond, cond] in one forward per step
    assert max_diff(got, ref) <= TOL
    plain = reference(aura_pipe, prompts, negatives, guidance_scale=1.0)
    assert (got - plain).abs().max().item() > 100 * TOL  # CFG changed the result


def test_no_cfg_matches_pipeline(aura_pipe):
    ref = reference(aura_pipe, PROMPTS, NEGATIVES, guidance_scale=1.0)
    got, rows = ours(aura_pipe, [], PROMPTS, NEGATIVES)
    assert rows == [2] * STEPS and max_diff(got, ref) <= TOL


def test_schedule_and_timestep_scale(aura_pipe):
    stepper, sched = AuraFlowFamily().stepper(
        aura_pipe, "euler", 5, shift=1.0, height=SIZE, width=SIZE, generators=[], eta=0.0
    )
    ref = AuraFlowPipeline(**aura_pipe.components).scheduler
    ref.set_timesteps(5)
    assert sched.config.shift == 1.73 and stepper.sigmas == ref.sigmas[:5].tolist()
    seen = []
    handle = aura_pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True
    )
    try:
        GuidedPipeline(aura_pipe).generate("a", guidance=[], steps=2, seed=0, decode=False)
    finally:
        handle.remove()
    assert seen[0].tolist() == [1.0] and 0 < seen[1].item() < 1  # t / 1000


def test_decode_matches_pipeline(aura_pipe):
    captured = {}

    def grab(pipe, i, t, kw):
        captured["latents"] = kw["latents"]
        return {}

    ref = AuraFlowPipeline(**aura_pipe.components)
    ref.set_progress_bar_config(disable=True)
    images = ref(
        "a cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=grab,
    ).images
    mine = GuidedPipeline(aura_pipe).decode(captured["latents"])
    assert list(mine[0].getdata()) == list(images[0].getdata())


def test_conditioning_file_is_bit_identical(aura_pipe, tmp_path):
    gp = GuidedPipeline(aura_pipe)
    kw = {"guidance": [CFG(3.0)], "steps": 2, "seed": SEED, "decode": False}
    out = gp.generate(PROMPTS, NEGATIVES, **kw)
    cond, uncond = gp.family.encode(aura_pipe, PROMPTS, NEGATIVES, True, SIZE, SIZE)
    path = save_conditioning(tmp_path / "c.safetensors", cond, uncond)
    again = gp.generate(PROMPTS, conditioning=load_conditioning(path), **kw)
    assert torch.equal(again.latents, out.latents)


def test_errors(aura_pipe):
    gp = GuidedPipeline(aura_pipe)
    assert family_of(aura_pipe).name == "auraflow" and gp.default_size() == SIZE
    with pytest.raises(
        ConfigError, match=r"^width 64 is larger than this auraflow model's positional embedding"
    ):
        gp.generate("a", guidance=[CFG(2.0)], steps=2, width=64)
    real = SimpleNamespace(
        vae_scale_factor=8,
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2, pos_embed_max_size=4096)),
    )
    with pytest.raises(
        ConfigError, match=r"^height must be a multiple of 16 for this auraflow model, got 1000$"
    ):
        AuraFlowFamily().check_size(real, 1000, 1024)
    assert AuraFlowFamily().default_size(real) == 1024  # diffusers' AuraFlowPipeline default
    with pytest.raises(
        ConfigError, match=r"^scheduler 'ddim' does not run auraflow models; choose one of: euler$"
    ):
        gp.generate("a", guidance=[CFG(2.0)], steps=2, scheduler="ddim")


def test_cli_generate_replay(aura_pipe, tmp_path):
    folder = save_tiny(aura_pipe, tmp_path / "tiny-auraflow")
    run = ["generate", "--model", str(folder), "-p", "a cat", "-p", "a dog", "--cfg", "5", "--steps", "3"]
    check_generate_and_replay(run, tmp_path / "out")


def test_pag_tpg_slg_one_forward_exact_layers(aura_pipe):
    """CFG + PAG (joint block) + TPG (single block) + SLG: one forward of 5B rows per step; each
    term changes the result; the model computes as before afterwards; a block past the end is an error."""
    from diffguide import PAG, SLG, TPG, LayerSpecError

    slg = SLG(3.0, layers="s0", start=0.0, stop=1.0)
    terms = [CFG(5.0), PAG(3.0, layers="b0"), TPG(3.0, layers="s0"), slg]
    got, rows = ours(aura_pipe, terms, PROMPTS, NEGATIVES)
    assert rows == [8] + [10] * (STEPS - 1)  # SLG's strict window (N start < i) leaves out step 0
    base, _ = ours(aura_pipe, terms[:1], PROMPTS, NEGATIVES)
    for k in (1, 2, 3):
        alone, _ = ours(aura_pipe, [terms[0], terms[k]], PROMPTS, NEGATIVES)
        assert (alone - base).abs().max().item() > 10 * TOL, terms[k].name
    assert (got - base).abs().max().item() > 10 * TOL
    again, _ = ours(aura_pipe, terms[:1], PROMPTS, NEGATIVES)
    assert torch.equal(again, base)
    with pytest.raises(
        LayerSpecError, match=r"^layer 's1': block 1 is past the last block; single_transformer_blocks"
    ):
        ours(aura_pipe, [SLG(3.0, layers="s1")], PROMPTS, NEGATIVES)
