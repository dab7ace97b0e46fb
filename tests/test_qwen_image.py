"""Qwen-Image family: diffguide vs diffusers' QwenImagePipeline on the tiny model (no text encoder).

Conditioning is precomputed (prompt_embeds + prompt_embeds_mask and the negatives), given to
both. Same components, seeds (one CPU generator per image, ``seed + i``) and schedule; final
latents agree to 1e-4. True CFG with the norm-preserving rescale is ``CFG(w, renorm=True)``,
run as ONE forward per step for [uncond, cond] (diffusers makes two calls). The transformer's
weights are re-drawn at a useful size (``dit_support._liven``), so that the text, CFG's renorm
and the perturbations move the result far beyond the tolerance.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import QwenImagePipeline
from dit_support import _liven as liven
from families_support import max_diff, save_tiny

from diffguide import CFG, Conditioning, ConfigError, DiffguideError, GuidedPipeline
from diffguide.conditioning import ConditioningFile, load_conditioning, save_conditioning
from diffguide.models.families import family_of
from diffguide.models.families.qwen_image import QwenImageFamily
from diffguide.testing_dit import qwen_embeds, tiny_qwen_image

TOL = 1e-4
STEPS = 4
SEED = 7
SIZE = 32  # VAE x2, patch 2: 8 x 8 = 64 image tokens


def fresh_qwen() -> QwenImagePipeline:
    pipe = tiny_qwen_image(seed=0)
    liven(pipe.transformer, 4)  # weights at a useful size, so text, CFG and perturbations matter
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen_pipe():
    return fresh_qwen()


def texts(batch: int, ragged: bool) -> dict[str, torch.Tensor]:
    """Prompt (7 tokens) and negative embeddings; ``ragged``: the negative has 5 tokens and the
    last prompt row 2 padding tokens (mask 0), so the branches need padding to share a forward."""
    pe, pm = qwen_embeds(1, batch, tokens=7)
    ne, nm = qwen_embeds(2, batch, tokens=5 if ragged else 7)
    if ragged:
        pm[-1, 5:] = 0
    return {
        "prompt_embeds": pe,
        "prompt_embeds_mask": pm,
        "negative_prompt_embeds": ne,
        "negative_prompt_embeds_mask": nm,
    }


def as_file(t: dict[str, torch.Tensor]) -> ConditioningFile:
    cond = Conditioning(tensors={"embeds": t["prompt_embeds"], "mask": t["prompt_embeds_mask"]})
    uncond = Conditioning(
        tensors={"embeds": t["negative_prompt_embeds"], "mask": t["negative_prompt_embeds_mask"]}
    )
    return ConditioningFile(cond, uncond)


def reference(pipe, t, steps=STEPS, **kwargs):
    """diffusers' final latents, unpacked to (B, 16, 1, h, w)."""
    ref = QwenImagePipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    batch = t["prompt_embeds"].shape[0]
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(batch)]
    out = ref(
        **t,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
        **kwargs,
    )
    return QwenImageFamily().unpack(out.images, SIZE, SIZE)


def ours(pipe, t, guidance, steps=STEPS):
    gp = GuidedPipeline(pipe)
    rows: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append(int(k["hidden_states"].shape[0])), with_kwargs=True
    )
    batch = t["prompt_embeds"].shape[0]
    try:
        out = gp.generate(
            ["<embeds>"] * batch,
            guidance=guidance,
            steps=steps,
            seed=SEED,
            height=SIZE,
            width=SIZE,
            decode=False,
            conditioning=as_file(t),
        )
    finally:
        handle.remove()
    assert out.forward_calls == steps == len(rows)
    return out.latents, rows


@pytest.mark.parametrize("ragged", [False, True], ids=["equal", "ragged"])
@pytest.mark.parametrize("batch", [1, 2])
def test_true_cfg_matches_pipeline(qwen_pipe, batch, ragged):
    t = texts(batch, ragged)
    ref = reference(qwen_pipe, t, true_cfg_scale=4.0)
    got, rows = ours(qwen_pipe, t, [CFG(4.0, renorm=True)])
    assert got.shape == ref.shape == (batch, 16, 1, 16, 16)
    assert rows == [2 * batch] * STEPS  # [uncond, cond] in one forward per step
    assert max_diff(got, ref) <= TOL
    plain, _ = ours(qwen_pipe, t, [CFG(4.0)])
    assert (plain - ref).abs().max().item() > 100 * TOL  # the renorm is what diffusers does


def test_no_cfg_matches_pipeline(qwen_pipe):
    t = texts(2, ragged=True)
    cond_only = {k: v for k, v in t.items() if not k.startswith("negative")}
    ref = reference(qwen_pipe, cond_only, true_cfg_scale=1.0)
    got, rows = ours(qwen_pipe, t, [])
    assert rows == [2] * STEPS and max_diff(got, ref) <= TOL


def test_padding_the_text_changes_nothing(qwen_pipe):
    """Branches are padded to one text length: padding (mask 0) at the end leaves the prediction."""
    t = texts(1, ragged=False)
    model, fam = qwen_pipe.transformer, QwenImageFamily()
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(tensors={"embeds": t["prompt_embeds"], "mask": t["prompt_embeds_mask"]})
    longer = Conditioning(tensors={"embeds": qwen_embeds(3, 1, tokens=9)[0]})  # a 9-token negative
    short, _ = fam.model_inputs(qwen_pipe, (), cond, None, SIZE, SIZE)
    padded, other = fam.model_inputs(qwen_pipe, (), cond, longer, SIZE, SIZE)
    assert short.get("mask") is None  # all ones: dropped, as diffusers' encode_prompt drops it
    assert (
        padded.embeds.shape[1] == other.embeds.shape[1] == 9
        and padded["mask"][0].tolist() == [1] * 7 + [0] * 2
    )
    with torch.no_grad():
        a = fam.forward(model, x, torch.tensor(500.0), short)
        b = fam.forward(model, x, torch.tensor(500.0), padded)
    assert (a - b).abs().max().item() <= 1e-5


def test_pack_unpack_match_diffusers():
    fam = QwenImageFamily()
    noise = torch.randn(2, 1, 16, 8, 12)
    packed = fam.pack(noise)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(noise, 2, 16, 8, 12))
    unpacked = fam.unpack(packed, 16, 24)  # VAE factor 2: 8 x 12 latents
    assert torch.equal(unpacked, QwenImagePipeline._unpack_latents(packed, 16, 24, 2))
    assert torch.equal(unpacked[:, :, 0], noise[:, 0])


def test_schedule_is_the_pipelines(qwen_pipe):
    captured = {}

    def grab(pipe, i, t, kw):
        captured.setdefault("sigmas", pipe.scheduler.sigmas.tolist())
        return {}

    ref = QwenImagePipeline(**qwen_pipe.components)
    ref.set_progress_bar_config(disable=True)
    t = texts(1, ragged=False)
    ref(
        prompt_embeds=t["prompt_embeds"],
        prompt_embeds_mask=t["prompt_embeds_mask"],
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        output_type="latent",
        callback_on_step_end=grab,
    )
    stepper, _ = QwenImageFamily().stepper(
        qwen_pipe, "euler", 5, shift=1.0, height=SIZE, width=SIZE, generators=[], eta=0.0
    )
    assert stepper.sigmas == captured["sigmas"][:5]


def test_decode_matches_pipeline(qwen_pipe):
    captured = {}

    def grab(pipe, i, t, kw):
        captured["latents"] = kw["latents"]
        return {}

    ref = QwenImagePipeline(**qwen_pipe.components)
    ref.set_progress_bar_config(disable=True)
    t = texts(1, ragged=False)
    images = ref(
        prompt_embeds=t["prompt_embeds"],
        prompt_embeds_mask=t["prompt_embeds_mask"],
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=grab,
    ).images
    gp = GuidedPipeline(qwen_pipe)
    mine = gp.decode(gp.family.unpack(captured["latents"], SIZE, SIZE))
    assert list(mine[0].getdata()) == list(images[0].getdata())


def test_conditioning_file_with_masks(qwen_pipe, tmp_path):
    """Masks survive a conditioning file (negative with another token count); the run is bit-identical."""
    t = texts(2, ragged=True)
    path = save_conditioning(tmp_path / "q.safetensors", as_file(t).cond, as_file(t).uncond, {"prompt": "x"})
    loaded = load_conditioning(path)
    assert torch.equal(loaded.cond["mask"], t["prompt_embeds_mask"])
    assert loaded.uncond is not None and loaded.uncond.embeds.shape == (2, 5, 64)
    gp = GuidedPipeline(qwen_pipe)
    kw = {"guidance": [CFG(4.0, renorm=True)], "steps": 2, "seed": SEED, "height": SIZE, "width": SIZE}
    a = gp.generate(["x", "x"], decode=False, conditioning=loaded, **kw)
    b = gp.generate(["x", "x"], decode=False, conditioning=as_file(t), **kw)
    assert torch.equal(a.latents, b.latents)
    assert a.manifests[0]["conditioning"]["file"]["path"] == str(path.resolve())


def test_conditioning_file_mask_errors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 7, 64), "prompt_embeds_mask": torch.ones(1, 6)}, str(path))
    with pytest.raises(
        DiffguideError, match=r"'prompt_embeds_mask' has shape \(1, 6\); expected \(1, 7\) \(batch, tokens"
    ):
        load_conditioning(path)
    save_file(
        {"prompt_embeds": torch.zeros(1, 7, 64), "negative_prompt_embeds_mask": torch.ones(1, 7)}, str(path)
    )
    with pytest.raises(
        DiffguideError, match=r"has 'negative_prompt_embeds_mask' but not 'negative_prompt_embeds'$"
    ):
        load_conditioning(path)


def test_errors(qwen_pipe):
    gp = GuidedPipeline(qwen_pipe)
    assert family_of(qwen_pipe).name == "qwen-image"
    with pytest.raises(ConfigError, match=r"^this Qwen-Image pipeline has no text encoder: pass precomputed"):
        gp.generate("a cat", guidance=[CFG(4.0, renorm=True)], steps=2, height=SIZE, width=SIZE)
    cf = as_file(texts(1, ragged=False))
    with pytest.raises(ConfigError, match=r"^--shift does not apply to this qwen-image model"):
        gp.generate("a", steps=2, height=SIZE, width=SIZE, shift=3.0, conditioning=cf)
    real = SimpleNamespace(
        vae_scale_factor=8, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2))
    )
    with pytest.raises(
        ConfigError, match=r"^width must be a multiple of 16 for this qwen-image model, got 40$"
    ):
        QwenImageFamily().check_size(real, 32, 40)
    bad = Conditioning(tensors={"embeds": torch.zeros(1, 7, 64), "mask": torch.ones(1, 6)})
    with pytest.raises(ConfigError, match=r"^Qwen-Image text mask has shape \(1, 6\); expected \(1, 7\)"):
        gp.generate("a", steps=2, height=SIZE, width=SIZE, conditioning=ConditioningFile(bad, None))


def test_cli_generate_from_conditioning_file_and_replay(qwen_pipe, tmp_path):
    from typer.testing import CliRunner

    from diffguide.cli.main import app

    folder = save_tiny(qwen_pipe, tmp_path / "tiny-qwen")
    t = texts(2, ragged=True)
    path = save_conditioning(tmp_path / "q.safetensors", as_file(t).cond, as_file(t).uncond)
    run = [
        "generate",
        "-m",
        str(folder),
        "--conditioning",
        str(path),
        "-n",
        "2",
        "--cfg",
        "4",
        "--cfg-renorm",
    ]
    res = CliRunner().invoke(
        app, [*run, "--steps", "3", "-W", "32", "-H", "32", "-o", str(tmp_path / "o"), "-q"]
    )
    assert res.exit_code == 0, res.output
    png = next(line for line in res.output.splitlines() if line.endswith("-001-1.png"))
    res = CliRunner().invoke(app, ["replay", png])
    assert res.exit_code == 0 and "bit-identical" in res.output and "NOT" not in res.output, res.output
    save_conditioning(path, as_file(texts(2, ragged=False)).cond, None)  # the file changes
    res = CliRunner().invoke(app, ["replay", png])
    assert res.exit_code == 2 and "changed since the run" in res.output, res.output
    res = CliRunner().invoke(app, ["generate", "-m", str(folder), "-p", "a cat", "-W", "32", "-H", "32"])
    assert res.exit_code == 2 and "no text encoder" in res.output


def test_pag_tpg_slg_one_forward_exact_layers(qwen_pipe):
    """CFG + PAG + TPG + SLG on exact blocks: 5 branches, one forward of 5B rows per step; every
    term changes the result; the model computes as before afterwards; a block past the end is an error."""
    from diffguide import PAG, SLG, TPG, LayerSpecError

    t = texts(2, ragged=True)
    slg = SLG(3.0, layers="transformer_blocks.1", start=0.0, stop=1.0)
    terms = [CFG(4.0, renorm=True), PAG(2.0, layers="b0"), TPG(2.0, layers="b1"), slg]
    got, rows = ours(qwen_pipe, t, terms)
    assert rows == [8] + [10] * (STEPS - 1)  # SLG's strict window (N start < i) leaves out step 0
    base, _ = ours(qwen_pipe, t, terms[:1])
    for k in (1, 2, 3):
        alone, _ = ours(qwen_pipe, t, [terms[0], terms[k]])
        assert (alone - base).abs().max().item() > 10 * TOL, terms[k].name
    assert (got - base).abs().max().item() > 10 * TOL
    again, _ = ours(qwen_pipe, t, terms[:1])
    assert torch.equal(again, base)
    with pytest.raises(
        LayerSpecError, match=r"^layer 'b2': block 2 is past the last block; transformer_blocks"
    ):
        ours(qwen_pipe, t, [PAG(2.0, layers="b2")])


def test_encode_uses_the_pipelines_encode_prompt():
    """With a text encoder, prompts go through the pipeline's own encode_prompt (Qwen2.5-VL is not
    built here: a stand-in pipeline records the calls)."""
    calls = []
    embeds = torch.randn(2, 6, 64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])

    def encode_prompt(prompt, device, num_images_per_prompt, max_sequence_length):
        calls.append((prompt, num_images_per_prompt, max_sequence_length))
        return (embeds, mask) if prompt[0] == "a cat" else (embeds[:, :3], None)

    pipe = SimpleNamespace(text_encoder=object(), device=torch.device("cpu"), encode_prompt=encode_prompt)
    cond, uncond = QwenImageFamily().encode(pipe, ["a cat", "a dog"], ["", "ugly"], True, SIZE, SIZE)
    assert calls == [(["a cat", "a dog"], 1, 512), (["", "ugly"], 1, 512)]
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond["mask"], mask)
    assert uncond is not None and "mask" not in uncond  # diffusers returns no mask when all tokens count
    assert QwenImageFamily().encode(pipe, ["a cat", "a dog"], ["", ""], False, SIZE, SIZE)[1] is None


@pytest.fixture(scope="module")
def qwen_lora(tmp_path_factory):
    """A random LoRA on the tiny Qwen-Image transformer's attention projections, diffusers' format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = fresh_qwen()
    torch.manual_seed(3)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("qwen-lora")
    QwenImagePipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_matches_pipeline(qwen_lora):
    t = texts(2, ragged=True)
    gp = GuidedPipeline(fresh_qwen())
    before = gp.component_hashes()["transformer"]
    gp.load_lora(qwen_lora, 0.7)
    kw = {"guidance": [CFG(4.0, renorm=True)], "steps": 3, "seed": SEED, "height": SIZE, "width": SIZE}
    out = gp.generate(["x", "x"], decode=False, conditioning=as_file(t), **kw)
    assert out.manifests[0]["model"]["loras"][0]["scale"] == 0.7
    assert out.manifests[0]["model"]["hashes"]["transformer"] != before
    ref_pipe = fresh_qwen()
    ref_pipe.load_lora_weights(str(qwen_lora), adapter_name="x")
    ref_pipe.set_adapters(["x"], adapter_weights=[0.7])
    ref = reference(ref_pipe, t, steps=3, true_cfg_scale=4.0)
    assert max_diff(out.latents, ref) <= TOL
    plain = reference(fresh_qwen(), t, steps=3, true_cfg_scale=4.0)
    assert (out.latents - plain).abs().max().item() > 100 * TOL
