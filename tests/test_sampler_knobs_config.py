"""The sampler knobs as GenerateConfig options: euler churn (diffusers policy) vs diffusers'
EulerDiscreteScheduler, euler_a's eta / s_noise (comfy policy) vs ComfyUI's SamplerEulerAncestral
through ``sample_custom``, manifest replay, and the one-line errors."""

from __future__ import annotations

import math

import comfy_support
import pytest
import torch

from diffguide import CFG, ConfigError
from diffguide.pipeline import GenerateConfig
from diffguide.repro.schema import config_from_manifest
from diffguide.sampling.comfy import SD_SCALE_FACTOR
from diffguide.sampling.knobs import DynamicThreshold

CHURN = {"s_churn": 40.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003}


def _cfg(**kw):
    return GenerateConfig.create(
        ["a cat", "a dog"], ["", "ugly"], guidance=[CFG(5.0)], steps=6, seed=3, width=32, height=32, **kw
    )


def _reference(pipe, cfg, shape, name="euler", thresholding=None, **step_kw):
    """diffusers' own loop: scheduler ``name`` from the model's config (``thresholding``: its
    dynamic_thresholding_ratio / sample_max_value config), step with ``step_kw`` and the per-image
    generators (seed + i) after the initial noise."""
    from diffguide.sampling.schedulers import SCHEDULERS

    cls, extra = SCHEDULERS[name]
    if thresholding is not None:
        extra = {**extra, "thresholding": True, "dynamic_thresholding_ratio": thresholding[0]}
        extra["sample_max_value"] = thresholding[1]
    sched = cls.from_config(pipe.pipe.scheduler.config, **extra)
    sched.set_timesteps(cfg.steps)
    cond, uncond = pipe.encode(cfg, 32, 32)
    gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(2)]
    x = torch.cat([torch.randn(1, *shape, generator=g) for g in gens]) * sched.init_noise_sigma
    embeds = torch.cat([uncond.embeds, cond.embeds])
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            e_u, e_c = pipe.pipe.unet(x_in, t, encoder_hidden_states=embeds).sample.chunk(2)
            x = sched.step(e_u + 5.0 * (e_c - e_u), t, x, generator=gens, **step_kw).prev_sample
    return x


@pytest.fixture(scope="module")
def sd15():
    from diffguide import GuidedPipeline
    from diffguide.testing import tiny_sd15

    return GuidedPipeline(tiny_sd15())


def test_churn_differs_and_equals_diffusers(sd15):
    plain = sd15.generate(_cfg(scheduler="euler"), decode=False)
    cfg = _cfg(scheduler="euler", **CHURN)
    churned = sd15.generate(cfg, decode=False)
    churn = {k: (math.inf if v is None else v) for k, v in CHURN.items()}
    ref = _reference(sd15, cfg, plain.latents.shape[1:], "euler", **churn)
    diff = (churned.latents - ref).abs().max().item()
    moved = (churned.latents - plain.latents).abs().max().item()
    scale = ref.abs().max().item()
    print(
        f"euler churn: max |ours - diffusers| = {diff:.3g} (values up to {scale:.3g}); vs no churn {moved:.3g}"
    )
    assert moved > 1e-2
    assert diff <= 1e-6 * scale  # float rounding of CFG (batched branches vs the reference's chunk)
    sched = churned.manifests[0]["scheduler"]
    assert sched["churn"] == {"s_churn": 40.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003}
    assert "churn" not in plain.manifests[0]["scheduler"]


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "ddpm"])
def test_dynamic_thresholding_differs_and_equals_diffusers(sd15, scheduler):
    plain = sd15.generate(_cfg(scheduler=scheduler), decode=False)
    cfg = _cfg(scheduler=scheduler, dynamic_thresholding=DynamicThreshold(0.9, 1.2))
    ours = sd15.generate(cfg, decode=False)
    ref = _reference(sd15, cfg, plain.latents.shape[1:], scheduler, (0.9, 1.2))
    diff, scale = (ours.latents - ref).abs().max().item(), ref.abs().max().item()
    moved = (ours.latents - plain.latents).abs().max().item()
    print(
        f"{scheduler} thresholding: max |ours - diffusers| = {diff:.3g} (values up to {scale:.3g}); vs off {moved:.3g}"
    )
    assert moved > 1e-2
    # the CFG rounding (batched branches vs the reference's chunk): the unthresholded run differs
    # from the same reference loop by as much (ddim 3.2e-5, ddpm 1.7e-5, values up to 1)
    assert diff <= 1e-4
    assert ours.manifests[0]["scheduler"]["config"]["thresholding"] is True
    assert plain.manifests[0]["scheduler"]["config"]["thresholding"] is False
    replayed = config_from_manifest(ours.manifests[0])
    assert replayed.dynamic_thresholding == DynamicThreshold(0.9, 1.2)
    assert torch.equal(sd15.generate(replayed, decode=False).latents, ours.latents)


def test_churn_manifest_replay_bit_identical(sd15):
    cfg = _cfg(scheduler="euler", s_churn=20.0, s_noise=1.01)
    first = sd15.generate(cfg, decode=False)
    replayed = config_from_manifest(first.manifests[0])
    assert (replayed.s_churn, replayed.s_tmin, replayed.s_tmax, replayed.s_noise) == (20.0, 0.0, None, 1.01)
    assert torch.equal(sd15.generate(replayed, decode=False).latents, first.latents)


def test_old_manifest_replays_knobs_off(sd15):
    m = sd15.generate(_cfg(scheduler="euler"), decode=False)
    params = {
        k: v
        for k, v in m.manifests[0]["parameters"].items()
        if k not in ("s_churn", "s_tmin", "s_tmax", "s_noise", "ancestral_eta")
    }
    cfg = config_from_manifest({**m.manifests[0], "parameters": params})
    assert (cfg.s_churn, cfg.s_tmax, cfg.s_noise, cfg.ancestral_eta) == (0.0, None, 1.0, 1.0)


@pytest.fixture(scope="module")
def comfy_setup():
    return comfy_support.guided_pipeline_and_patcher()


def _comfy_euler_ancestral(patcher, cond, uncond, seed, eta, s_noise):
    """ComfyUI's SamplerEulerAncestral node + KSamplerSelect-free SamplerCustom: ksampler
    ("euler_ancestral", {eta, s_noise}) over BasicScheduler's normal sigmas, through sample_custom."""
    c = comfy_support.load_comfy()
    latent = torch.zeros(2, 4, 16, 16)
    noise = c.sample.prepare_noise(latent, seed, None)
    sigmas = comfy_support.comfy_calculate_sigmas(patcher, "normal", 8)
    sampler = c.samplers.ksampler("euler_ancestral", {"eta": eta, "s_noise": s_noise})
    with torch.no_grad():
        out = c.sample.sample_custom(
            patcher,
            noise,
            5.0,
            sampler,
            sigmas,
            [[cond, {}]],
            [[uncond, {}]],
            latent,
            disable_pbar=True,
            seed=seed,
        )
    return out * SD_SCALE_FACTOR


@pytest.mark.parametrize(("eta", "s_noise"), [(0.5, 1.0), (1.0, 0.8), (0.0, 1.0)])
def test_comfy_euler_a_knobs_match_comfyui(comfy_setup, eta, s_noise):
    gp, patcher = comfy_setup
    kw = {"scheduler": "euler_a", "noise": "comfy", "steps": 8, "seed": 42}
    cfg = GenerateConfig.create(
        ["a cat", "a dog"], ["", "ugly"], guidance=[CFG(5.0)], ancestral_eta=eta, s_noise=s_noise, **kw
    )
    cond, uncond = gp.encode(cfg, 32, 32)
    ours = gp.generate(cfg, decode=False)
    plain = gp.generate(
        GenerateConfig.create(["a cat", "a dog"], ["", "ugly"], guidance=[CFG(5.0)], **kw), decode=False
    )
    theirs = _comfy_euler_ancestral(patcher, cond.embeds, uncond.embeds, 42, eta, s_noise)
    diff = (ours.latents - theirs).abs().max().item()
    moved = (ours.latents - plain.latents).abs().max().item()
    print(
        f"euler_ancestral eta={eta} s_noise={s_noise}: max |ours - ComfyUI| = {diff:.3g}; vs default {moved:.3g}"
    )
    assert diff <= 1e-4
    assert moved > 1e-2
    assert ours.manifests[0]["scheduler"]["sampler"] == {
        "name": "euler_ancestral",
        "eta": eta,
        "s_noise": s_noise,
    }
    replayed = config_from_manifest(ours.manifests[0])
    assert torch.equal(gp.generate(replayed, decode=False).latents, ours.latents)


def _comfy_churn(patcher, cond, uncond, seed, churn, name="euler"):
    """ComfyUI's KSampler path with churn: ``prepare_noise`` (which seeds the GLOBAL generator with
    the seed and draws the initial noise from it), then ``sample_euler(s_churn, ...)`` through
    ``sample_custom``, drawing its churn noise with ``torch.randn_like`` from that same global
    stream. The global RNG state is restored afterwards (fork_rng)."""
    c = comfy_support.load_comfy()
    latent = torch.zeros(2, 4, 16, 16)
    with torch.random.fork_rng(devices=[]):
        noise = c.sample.prepare_noise(latent, seed, None)
        sigmas = comfy_support.comfy_calculate_sigmas(patcher, "normal", 8)
        sampler = c.samplers.ksampler(name, churn)
        with torch.no_grad():
            out = c.sample.sample_custom(
                patcher,
                noise,
                5.0,
                sampler,
                sigmas,
                [[cond, {}]],
                [[uncond, {}]],
                latent,
                disable_pbar=True,
                seed=seed,
            )
    return out * SD_SCALE_FACTOR


COMFY_CHURN = [
    {"s_churn": 3.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0},
    {"s_churn": 40.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003},
]


@pytest.mark.parametrize(
    ("sampler", "knobs"), [("euler", COMFY_CHURN[0]), ("euler", COMFY_CHURN[1]), ("heun", COMFY_CHURN[1])]
)
def test_comfy_churn_matches_comfyui(comfy_setup, sampler, knobs):
    """euler and heun with churn vs ComfyUI's sample_euler / sample_heun (global-RNG churn noise)."""
    gp, patcher = comfy_setup
    kw = {"scheduler": sampler, "noise": "comfy", "steps": 8, "seed": 42}
    make = lambda **k: GenerateConfig.create(["a cat", "a dog"], ["", "ugly"], guidance=[CFG(5.0)], **kw, **k)  # noqa: E731
    cfg = make(**knobs)
    cond, uncond = gp.encode(cfg, 32, 32)
    state = torch.random.get_rng_state()
    ours = gp.generate(cfg, decode=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    plain = gp.generate(make(), decode=False)
    churn = {k: (math.inf if v is None else v) for k, v in knobs.items()}
    theirs = _comfy_churn(patcher, cond.embeds, uncond.embeds, 42, churn, sampler)
    diff = (ours.latents - theirs).abs().max().item()
    moved = (ours.latents - plain.latents).abs().max().item()
    print(f"comfy {sampler} churn {knobs}: max |ours - ComfyUI| = {diff:.3g}; vs no churn {moved:.3g}")
    # heun: twice the evaluations; without churn it already differs by 1.2e-4 on values up to 56
    # here (float32 rounding, 2e-6 relative), so a relative bound
    assert diff <= (1e-4 if sampler == "euler" else 1e-5 * (1 + theirs.abs().max().item()))
    assert moved > 1e-2
    entry = ours.manifests[0]["scheduler"]["sampler"]
    assert {k: v for k, v in entry.items() if k != "sigma_hats"} == {"name": sampler, **knobs}
    sigmas = ours.manifests[0]["scheduler"]["sigmas"]
    assert len(entry["sigma_hats"]) == 8
    assert any(h > s for h, s in zip(entry["sigma_hats"], sigmas, strict=False))  # churned somewhere
    assert "global generator" in ours.manifests[0]["noise"]["per_step"]
    replayed = config_from_manifest(ours.manifests[0])
    assert torch.equal(gp.generate(replayed, decode=False).latents, ours.latents)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"s_churn": -1.0, "scheduler": "euler"}, "s_churn must be a finite number >= 0, got -1.0"),
        ({"s_churn": "5", "scheduler": "euler"}, "s_churn must be a number, got str '5'"),
        ({"s_noise": math.nan, "scheduler": "euler"}, "s_noise must be a finite number >= 0, got nan"),
        ({"s_churn": 1.0, "s_tmin": 2.0, "s_tmax": 1.0, "scheduler": "euler"}, "s_tmax (1.0) must be >= s_tmin (2.0)"),
        ({"s_churn": 1.0, "scheduler": "ddim"}, "s_churn applies to the diffusers policy's euler only, not 'ddim' (diffusers noise policy)"),
        ({"s_noise": 0.5, "scheduler": "euler"}, "s_noise only take effect with s_churn > 0"),
        ({"ancestral_eta": 0.5, "scheduler": "euler_a"}, "ancestral_eta applies to the comfy policy's euler_a only, not 'euler_a' (diffusers noise policy)"),
        ({"s_churn": 1.0, "scheduler": "dpmpp_2m", "noise": "comfy"}, "s_churn: churn in the comfy noise policy is for euler and heun only, not 'dpmpp_2m' (comfy noise policy)"),
        ({"s_noise": 0.5, "scheduler": "euler", "noise": "comfy"}, "s_noise only take effect with s_churn > 0"),
        ({"ancestral_eta": 0.5, "scheduler": "euler", "noise": "comfy"}, "ancestral_eta apply to the comfy policy's euler_a only, not 'euler' (comfy noise policy)"),
        ({"dynamic_thresholding": DynamicThreshold(), "scheduler": "euler"}, "dynamic thresholding needs the diffusers noise policy and a scheduler that thresholds (ddim, dpmpp_2m, dpmpp_2m_karras, unipc, ddpm), not 'euler' (diffusers noise policy)"),
        ({"dynamic_thresholding": 0.9, "scheduler": "ddim"}, "dynamic_thresholding must be a DynamicThreshold or None, got 0.9"),
    ],
)  # fmt: skip
def test_knob_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**kwargs)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("flags", "knobs"),
    [
        (["--scheduler", "euler", "--s-churn", "40", "--s-tmin", "0.5", "--s-tmax", "10", "--s-noise", "1.003"], CHURN),
        (["--scheduler", "ddim", "--dynamic-thresholding", "0.9:1.2"], {"scheduler": "ddim", "dynamic_thresholding": DynamicThreshold(0.9, 1.2)}),
    ],
)  # fmt: skip
def test_cli_knobs_equal_python_api(sd15, tmp_path, flags, knobs):
    """``diffguide generate --s-churn ...`` writes the latents of the same GenerateConfig."""
    from typer.testing import CliRunner

    from diffguide.cli.main import app
    from diffguide.io import load_latents
    from diffguide.testing import tiny_sd15

    model = tmp_path / "model"
    tiny_sd15().save_pretrained(model)
    out = tmp_path / "out"
    args = [
        "generate",
        "--model",
        model,
        "-p",
        "a cat",
        "-p",
        "a dog",
        "--negative-prompt",
        "",
        "--negative-prompt",
        "ugly",
    ]
    args += ["--cfg", "5"]
    args += ["--steps", "6", "--seed", "3", "--width", "32", "--height", "32", *flags, "--threads", "1"]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--out", out, "--save-latents", "--quiet"]])
    assert res.exit_code == 0, res.output
    want = sd15.generate(_cfg(**{"scheduler": "euler", **knobs}), decode=False).latents
    got = torch.cat([load_latents(p)[0] for p in sorted(out.glob("*.safetensors"))])
    assert torch.equal(got.reshape(want.shape), want)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--s-churn", "-2"], "s_churn must be a finite number >= 0, got -2.0"),
        (["--scheduler", "ddim", "--dynamic-thresholding", "high"], "--dynamic-thresholding must be PERCENTILE or PERCENTILE:MAX, got 'high'"),
        (["--scheduler", "ddim", "--dynamic-thresholding", "0.9:0.5"], "dynamic threshold max value must be >= 1, got 0.5"),
        (["--scheduler", "euler_a", "--noise", "comfy", "--ancestral-eta", "-1"], "ancestral_eta must be a finite number >= 0, got -1.0"),
    ],
)  # fmt: skip
def test_cli_bad_knob_one_line(tmp_path, flags, message):
    from typer.testing import CliRunner

    from diffguide.cli.main import app

    res = CliRunner().invoke(app, ["generate", "-p", "a", *flags, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert res.stderr == f"error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_prompt_file_knob_keys(tmp_path):
    from diffguide.validation import family_defaults, load_prompts
    from diffguide.validation.sample import plan

    path = tmp_path / "p.yaml"
    path.write_text(
        "defaults: {scheduler: euler, s_churn: 40}\nprompts:\n  - a\n  - prompt: b\n    s_tmax: 10\n    s_noise: 1.003\n"
    )
    cfgs = [job.config for job in plan(load_prompts(path), family_defaults("sd15"))]
    assert [(c.s_churn, c.s_tmin, c.s_tmax, c.s_noise) for c in cfgs] == [
        (40.0, 0.0, None, 1.0),
        (40.0, 0.0, 10.0, 1.003),
    ]
    path.write_text("prompts:\n  - a\n  - prompt: b\n    scheduler: ddim\n    s_churn: 3\n")
    with pytest.raises(ConfigError) as err:
        plan(load_prompts(path), family_defaults("sd15"))
    assert (
        str(err.value)
        == f"{path}:3: s_churn applies to the diffusers policy's euler only, not 'ddim' (diffusers noise policy)"
    )
    path.write_text("prompts:\n  - prompt: b\n    scheduler: ddim\n    dynamic_thresholding: [0.9, 1.5]\n")
    (job,) = plan(load_prompts(path), family_defaults("sd15"))
    assert job.config.dynamic_thresholding == DynamicThreshold(0.9, 1.5)
    path.write_text("prompts:\n  - prompt: b\n    dynamic_thresholding: {percentile: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:2: dynamic threshold percentile must be in (0, 1], got 2"
    path.write_text("prompts:\n  - prompt: b\n    s_noise: lots\n")
    with pytest.raises(ConfigError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}:2: 's_noise' must be a number, got 'lots'"
