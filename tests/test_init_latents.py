"""Sampling from initial latents (img2img, diffguide.sampling.init) vs diffusers' img2img pipelines.

Same components, latents, strength and per-image generators (``seed + i``): final latents within 1e-4
of ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` /
``StableDiffusion3Img2ImgPipeline`` given the latents as their ``image``; strength 1 is the plain run
bit for bit; bad inputs are one-line errors; the manifest records the file and replay reproduces it.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from families_support import tiny_sd3
from safetensors.torch import save_file

from diffguide import CFG, ConfigError, GenerateConfig, GuidedPipeline
from diffguide.errors import DiffguideError
from diffguide.repro.replay import replay
from diffguide.sampling.init import InitLatents, load_init_latents, save_init_latents
from diffguide.sampling.schedulers import SCHEDULERS

TOL = 1e-4
SEED = 7
PROMPTS = ["a red cat on a sofa", "a blue dog"]
NEGATIVES = ["ugly", ""]


def init_for(gp: GuidedPipeline, batch: int, seed: int = 3) -> torch.Tensor:
    size = gp.default_size()
    shape = gp.family.latent_shape(gp.pipe, batch, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference(cls, pipe, init, strength, steps, scheduler="euler", **kwargs):
    ref = cls(**pipe.components)
    if scheduler != "flow":
        sched_cls, overrides = SCHEDULERS[scheduler]
        ref.scheduler = sched_cls.from_config(pipe.scheduler.config, **overrides)
    ref.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    out = ref(
        PROMPTS,
        image=init,
        strength=strength,
        negative_prompt=NEGATIVES,
        generator=gens,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="latent",
        **kwargs,
    )
    return out.images


def ours(gp, init, strength, steps, scheduler="euler"):
    return gp.generate(
        PROMPTS, NEGATIVES, guidance=[CFG(5.0)], steps=steps, seed=SEED, decode=False,
        scheduler=scheduler, init_latents=InitLatents.of(init), strength=strength,
    )  # fmt: skip


SD_CASES = {
    "sd15 euler 0.6": ("sd15", "euler", 0.6, 5),
    "sd15 euler_a 0.5": ("sd15", "euler_a", 0.5, 6),
    "sd15 ddim 0.75": ("sd15", "ddim", 0.75, 4),
    "sd15 heun 0.5": ("sd15", "heun", 0.5, 4),
    "sdxl dpmpp_2m 0.7": ("sdxl", "dpmpp_2m", 0.7, 5),
}


@pytest.mark.parametrize("case", list(SD_CASES))
def test_img2img_matches_diffusers(request, case):
    arch, scheduler, strength, steps = SD_CASES[case]
    gp = request.getfixturevalue(arch)
    cls = StableDiffusionXLImg2ImgPipeline if arch == "sdxl" else StableDiffusionImg2ImgPipeline
    init = init_for(gp, len(PROMPTS))
    ref = reference(cls, gp.pipe, init, strength, steps, scheduler)
    got = ours(gp, init, strength, steps, scheduler)
    diff = (got.latents - ref).abs().max().item()
    print(f"{case}: max abs diff vs diffusers img2img {diff:.3g}")
    assert got.latents.shape == ref.shape
    assert diff <= TOL
    begin = steps - int(steps * strength)
    if scheduler != "heun":  # heun evaluates twice per step
        assert got.forward_calls == steps - begin
    # the initial latents matter: other latents give another result
    other = ours(gp, init_for(gp, len(PROMPTS), seed=4), strength, steps, scheduler)
    assert (other.latents - ref).abs().max() > 100 * TOL


def test_img2img_sd3_matches_diffusers():
    pipe = tiny_sd3(seed=0)
    gp = GuidedPipeline(pipe)
    init = init_for(gp, len(PROMPTS))
    ref = reference(StableDiffusion3Img2ImgPipeline, pipe, init, 0.6, 5, scheduler="flow")
    got = ours(gp, init, 0.6, 5)
    diff = (got.latents - ref).abs().max().item()
    print(f"sd3 flow 0.6: max abs diff vs diffusers img2img {diff:.3g}")
    assert diff <= TOL
    assert got.forward_calls == 3


def test_strength_one_is_the_plain_run_bit_for_bit(sd15):
    plain = sd15.generate(PROMPTS, NEGATIVES, guidance=[CFG(5.0)], steps=4, seed=SEED, decode=False)
    full = ours(sd15, init_for(sd15, 1), 1.0, 4)
    assert torch.equal(plain.latents, full.latents)
    assert plain.forward_calls == full.forward_calls == 4


def test_one_row_of_latents_serves_every_image(sd15):
    one = init_for(sd15, 1)
    a = ours(sd15, one, 0.5, 4).latents
    b = ours(sd15, one.expand(2, -1, -1, -1).clone(), 0.5, 4).latents
    assert torch.equal(a, b)


def test_batch_invariant_img2img_equals_single_runs(sd15):
    init = init_for(sd15, 2)
    kw = dict(guidance=[CFG(5.0)], steps=4, decode=False, strength=0.5, batch_invariant=True)
    both = sd15.generate(PROMPTS, NEGATIVES, seed=SEED, init_latents=InitLatents.of(init), **kw)
    second = sd15.generate(
        PROMPTS[1:], NEGATIVES[1:], seed=SEED + 1, init_latents=InitLatents.of(init[1:]), **kw
    )
    assert torch.equal(both.latents[1:], second.latents)


def test_wrong_shape_is_one_line_error(sd15):
    bad = torch.zeros(1, 4, 3, 3)
    with pytest.raises(ConfigError) as err:
        ours(sd15, bad, 0.5, 4)
    size = sd15.default_size()
    h = sd15.family.latent_shape(sd15.pipe, 1, size, size)[-1]
    assert str(err.value) == (
        f"initial latents have shape [1, 4, 3, 3]; this model at {size}x{size} px takes [1 or 2, 4, {h}, {h}]"
    )


@pytest.mark.parametrize(
    ("strength", "message"),
    [
        (0.0, "strength must be in (0, 1] (1 = start from pure noise), got 0.0"),
        (1.5, "strength must be in (0, 1] (1 = start from pure noise), got 1.5"),
        (float("nan"), "strength must be in (0, 1] (1 = start from pure noise), got nan"),
        ("0.5", "strength must be a number in (0, 1], got '0.5'"),
    ],
)
def test_bad_strength(strength, message):
    with pytest.raises(ConfigError) as err:
        GenerateConfig.create("x", init_latents=InitLatents.of(torch.zeros(1, 4, 8, 8)), strength=strength)
    assert str(err.value) == message


def test_strength_without_latents():
    with pytest.raises(
        ConfigError,
        match=r"^strength 0.5 needs initial latents to start from \(--init-latents; a job's initial_latents\)$",
    ):
        GenerateConfig.create("x", strength=0.5)


def test_too_small_strength_runs_no_step(sd15):
    with pytest.raises(ConfigError) as err:
        ours(sd15, init_for(sd15, 1), 0.1, 4)
    assert str(err.value) == (
        "strength 0.1 with 4 steps runs no step (int(steps * strength) = 0); raise the strength or the steps"
    )


def test_file_errors(tmp_path):
    pt = tmp_path / "x.pt"
    torch.save(torch.zeros(1), pt)
    with pytest.raises(ConfigError, match=r"is a pickle \(\.pt\); only \.safetensors is read"):
        load_init_latents(pt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(
        ConfigError, match=r"^initial latents file '.*junk.safetensors' is not a safetensors file"
    ):
        load_init_latents(junk)
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 4, 8, 8), "b": torch.zeros(1)}, str(two))
    with pytest.raises(ConfigError, match=r"holds 2 tensors \(a, b\)"):
        load_init_latents(two)
    with pytest.raises(ConfigError, match=r"does not exist$"):
        load_init_latents(tmp_path / "missing.safetensors")


def test_comfy_savelatent_file_reads_as_loadlatent(tmp_path):
    x = torch.randn(1, 4, 8, 8)
    new, old = tmp_path / "new.latent", tmp_path / "old.latent"
    save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])}, str(new))
    save_file({"latent_tensor": x}, str(old))
    assert load_init_latents(new).space == "comfy" and torch.equal(load_init_latents(new).latents, x)
    assert torch.equal(load_init_latents(old).latents, x * (1.0 / 0.18215))


def test_manifest_records_file_and_replay_is_identical(sd15, tmp_path):
    path = tmp_path / "init.safetensors"
    save_init_latents(path, init_for(sd15, 2))
    init = load_init_latents(path)
    out = sd15.generate(
        PROMPTS,
        NEGATIVES,
        guidance=[CFG(5.0)],
        steps=4,
        seed=SEED,
        decode=False,
        init_latents=init,
        strength=0.5,
    )
    rec = out.manifests[1]["parameters"]["init_latents"]
    assert (
        rec["path"] == str(path)
        and rec["sha256"] == init.sha256
        and rec["shape"] == [2, 4, 8, 8][:1] + list(init.latents.shape[1:])
    )
    assert out.manifests[1]["parameters"]["strength"] == 0.5
    manifest = json.loads(json.dumps(out.manifests[1]))
    assert replay(manifest, sd15).identical
    save_init_latents(path, init_for(sd15, 2, seed=9))  # the file changed: replay says so
    with pytest.raises(DiffguideError, match="changed since the run"):
        replay(manifest, sd15)


def test_tensor_latents_cannot_be_replayed(sd15):
    out = ours(sd15, init_for(sd15, 1), 0.5, 4)
    with pytest.raises(DiffguideError, match="given as a tensor, not a file"):
        replay(json.loads(json.dumps(out.manifests[0])), sd15)
