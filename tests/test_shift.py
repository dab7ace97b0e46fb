"""Sampling time shift (SD3 eq. 23) on the discrete UNet schedules: formula, timesteps,
errors, manifest and replay, and a trace divergence it causes at a known step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from typer.testing import CliRunner

from diffguide import CFG, ConfigError, GuidedPipeline, testing
from diffguide.cli.main import app
from diffguide.pipeline import GenerateConfig
from diffguide.repro.replay import config_from_manifest, replay
from diffguide.repro.trace import TraceRecorder, load_trace
from diffguide.repro.trace_diff import diff_traces
from diffguide.sampling.schedulers import make_scheduler, set_timesteps, time_shift


def test_time_shift_known_values():
    u = np.array([0.0, 0.25, 0.5, 1.0])
    # s u / (1 + (s - 1) u) with s = 3: 0, 0.75/1.5, 1.5/2, 1
    np.testing.assert_allclose(time_shift(u, 3.0), [0.0, 0.5, 0.75, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(time_shift(u, 1.0), u)
    # the shift is a group: shifting by a then by b is shifting by a * b
    np.testing.assert_allclose(time_shift(time_shift(u, 2.0), 1.5), time_shift(u, 3.0), atol=1e-15)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_shifted_timesteps(sd15, name):
    base_cfg = sd15.pipe.scheduler.config
    plain, shifted = make_scheduler(name, base_cfg), make_scheduler(name, base_cfg)
    set_timesteps(plain, name, 5, "cpu")
    set_timesteps(shifted, name, 5, "cpu", shift=2.0)
    t = torch.unique_consecutive(plain.timesteps).double().numpy()
    expected = 999 * (2 * (t / 999) / (1 + t / 999))
    got = torch.unique_consecutive(shifted.timesteps).double().numpy()
    if name == "dpmpp_2m":  # integer timesteps: rounded to the nearest, not truncated
        expected = np.round(expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert (got[:-1] > t[:-1]).all()  # s > 1 moves every step but t = 0 towards noise
    assert len(shifted.timesteps) == len(plain.timesteps)


def test_shift_errors():
    with pytest.raises(ConfigError, match="finite number > 0"):
        GenerateConfig.create("a", shift=0.0)
    with pytest.raises(ConfigError, match="finite number > 0"):
        GenerateConfig.create("a", shift=float("nan"))
    with pytest.raises(ConfigError, match=r"custom timesteps .*not 'euler_a'"):
        GenerateConfig.create("a", shift=2.0, scheduler="euler_a")
    with pytest.raises(ConfigError, match="comfy noise policy"):
        GenerateConfig.create("a", shift=2.0, noise="comfy")


def _trace(gp: GuidedPipeline, cfg: GenerateConfig, path):
    rec = TraceRecorder()
    result = gp.generate(cfg, decode=False, callback=rec)
    rec.save(path, result.manifests[0])
    return load_trace(path), result


@pytest.fixture(scope="module")
def trailing():
    """SDXL-style "trailing" spacing: the first timestep is 999, which the shift keeps."""
    pipe = testing.tiny_sd15(seed=0)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return GuidedPipeline(pipe)


def test_shift_divergence_is_found_in_the_scheduler_at_step_0(trailing, tmp_path):
    """With the first timestep kept, step 0's model inputs and predictions agree; the first
    tensor to differ is step 0's latents_out (the Euler step to a different sigma)."""
    runs = []
    for shift in (1.0, 2.0):
        cfg = GenerateConfig.create("a", guidance=[CFG(4)], steps=4, seed=2, shift=shift)
        trace, result = _trace(trailing, cfg, tmp_path / f"s{shift}.safetensors")
        assert result.manifests[0]["model"]["sampling_shift"] == shift
        assert result.manifests[0]["scheduler"]["shift"] == shift
        runs.append(trace)
    d = diff_traces(runs[0], runs[1])
    assert d.first_step == 0 and d.first is not None and d.first.name == "latents_out"
    for name in ("latents_in", "pred/uncond", "pred/cond", "guided"):
        assert torch.equal(runs[0].tensors[f"step_0000/{name}"], runs[1].tensors[f"step_0000/{name}"])
    s0, s1 = (r.manifest["scheduler"]["sigmas"] for r in runs)
    assert s0[0] == s1[0] and s1[1] > s0[1]


def test_shift_with_leading_spacing_differs_from_the_initial_latents(sd15, tmp_path):
    """SD1.5's "leading" spacing starts below t = 999, so the shift moves the first sigma and
    the initial latents (noise * init sigma) already differ: divergence at step 0, latents_in."""
    runs = [
        _trace(sd15, GenerateConfig.create("a", steps=3, shift=s), tmp_path / f"{s}.safetensors")[0]
        for s in (1.0, 1.5)
    ]
    d = diff_traces(runs[0], runs[1])
    assert d.first_step == 0 and d.first is not None and d.first.name == "latents_in"


def test_shift_replays_bit_identically(tmp_path):
    model = tmp_path / "model"
    testing.tiny_sd15(seed=0).save_pretrained(model)
    gp = GuidedPipeline.from_pretrained(model)
    result = gp.generate("a", guidance=[CFG(3)], steps=3, seed=1, shift=3.0, scheduler="heun", decode=False)
    manifest = result.manifests[0]
    assert config_from_manifest(manifest).shift == 3.0
    assert replay(manifest, GuidedPipeline.from_pretrained(model)).identical


def test_cli_shift(tmp_path):
    model = tmp_path / "model"
    testing.tiny_sd15(seed=0).save_pretrained(model)
    runner = CliRunner()
    args = [
        "generate",
        "--model",
        str(model),
        "-p",
        "a",
        "--steps",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "o"),
    ]
    res = runner.invoke(app, [*args, "--shift", "2.5"])
    assert res.exit_code == 0, res.output
    assert '"sampling_shift": 2.5' in next((tmp_path / "o").glob("*.json")).read_text()
    bad = runner.invoke(app, [*args, "--shift", "2", "--scheduler", "ddim"])
    assert bad.exit_code == 2 and "custom timesteps" in bad.output
