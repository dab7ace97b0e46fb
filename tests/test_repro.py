"""Reproducibility toolkit: traces and first divergence, replay, determinism checks,
conditioning files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffguide import CFG, PAG, TPG, ConfigError, DiffguideError, GuidedPipeline, Window, testing
from diffguide.conditioning import ConditioningFile, load_conditioning, save_conditioning
from diffguide.io import save_result
from diffguide.models.denoiser import Conditioning
from diffguide.pipeline import GenerateConfig
from diffguide.repro.determinism import check_determinism
from diffguide.repro.replay import config_from_manifest, replay
from diffguide.repro.trace import TraceRecorder, load_trace
from diffguide.repro.trace_diff import diff_traces


def _trace(gp: GuidedPipeline, cfg: GenerateConfig, path, modules: str | None = None):
    rec = TraceRecorder(modules)
    with rec.hooks(gp.unet):
        result = gp.generate(cfg, decode=False, callback=rec)
    rec.save(path, result.manifests[0])
    return load_trace(path), result


def test_trace_records_every_step_and_branch(sd15, tmp_path):
    cfg = GenerateConfig.create(["a", "b"], guidance=[CFG(4), PAG(2), TPG(2)], steps=3, seed=1)
    trace, result = _trace(sd15, cfg, tmp_path / "t.safetensors", "mid_block.attentions.0")
    assert [s["index"] for s in trace.steps] == [0, 1, 2]
    keys = trace.keys_of_step(2)
    assert keys[0].endswith("latents_in") and keys[-1].endswith("latents_out")
    for branch in ("uncond", "cond", "pag", "tpg"):
        assert trace.tensors[f"step_0000/pred/{branch}"].shape == (2, 4, 16, 16)
        assert f"step_0001/module/mid_block.attentions.0/{branch}" in trace.tensors
    assert torch.equal(trace.tensors["step_0002/latents_out"], result.latents)
    # the guided prediction is the documented combination of the recorded branches
    p = {b: trace.tensors[f"step_0001/pred/{b}"] for b in ("uncond", "cond", "pag", "tpg")}
    expected = (
        p["cond"] + 3 * (p["cond"] - p["uncond"]) + 2 * (p["cond"] - p["pag"]) + 2 * (p["cond"] - p["tpg"])
    )
    torch.testing.assert_close(trace.tensors["step_0001/guided"], expected, rtol=1e-5, atol=1e-5)
    assert trace.manifest["parameters"]["steps"] == 3
    # hooks are removed after the run
    assert all(not m._forward_hooks for m in sd15.unet.modules())


def test_trace_modules_pattern_must_match(sd15):
    with pytest.raises(DiffguideError, match="matches no module"), TraceRecorder("nope.*").hooks(sd15.unet):
        pass


def test_first_divergence_at_window_edge(sd15, tmp_path):
    base = GenerateConfig.create("a", guidance=[CFG(4), PAG(2)], steps=6, seed=3)
    late = GenerateConfig.create("a", guidance=[CFG(4), PAG(2, window=Window(end=0.5))], steps=6, seed=3)
    a, _ = _trace(sd15, late, tmp_path / "a.safetensors")
    b, _ = _trace(sd15, base, tmp_path / "b.safetensors")
    d = diff_traces(a, b)
    assert not d.ok
    # PAG stops at step 3 (fraction 0.5): everything before is identical, step 3's guided differs
    assert d.first_step == 3
    assert d.first is not None and d.first.name == "guided"
    assert all(row.ok for row in d.steps[:3])
    assert "step_0003/pred/pag" in d.only_b
    assert json.loads(d.to_json())["first_divergence"]["step"] == 3


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A random LoRA for the tiny SD1.5 UNet, saved in diffusers' format."""
    pipe = testing.tiny_sd15(seed=0)
    torch.manual_seed(7)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("lora")
    type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_scale_divergence_is_found_at_step_0(lora_file, tmp_path):
    cfg = GenerateConfig.create("a", guidance=[CFG(4)], steps=3, seed=0)
    traces = []
    for scale in (1.0, 0.5):
        gp = GuidedPipeline(testing.tiny_sd15(seed=0))
        gp.load_lora(lora_file, scale)
        trace, result = _trace(gp, cfg, tmp_path / f"t{scale}.safetensors", "down_blocks.0.attentions.0")
        traces.append(trace)
        lora = result.manifests[0]["model"]["loras"][0]
        assert lora["scale"] == scale and len(lora["sha256"]) == 16
    d = diff_traces(traces[1], traces[0])
    assert d.first_step == 0
    # the first tensor that differs is the output of the first LoRA-patched module, before any prediction
    assert d.first is not None and d.first.name.startswith("module/down_blocks.0.attentions.0/")


def test_lora_bad_file(sd15, tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DiffguideError, match="safetensors"):
        GuidedPipeline(testing.tiny_sd15()).load_lora(bad)


def test_replay_is_bit_identical_from_png(tmp_path):
    model = tmp_path / "model"
    testing.tiny_sd15(seed=0).save_pretrained(model)
    gp = GuidedPipeline.from_pretrained(model)
    result = gp.generate(["a cat", "a dog"], guidance=[CFG(4), TPG(2)], steps=3, seed=9)
    paths = [p for p in save_result(result, tmp_path / "out") if p.suffix == ".png"]
    report = replay(result.manifests[1], GuidedPipeline.from_pretrained(model), png=paths[1])
    assert report.identical
    assert report.expected_hash == report.actual_hash
    assert report.pixels is not None and report.pixels.max_abs_err == 0.0
    assert report.model_mismatch == {}
    # a different model is reported
    other = GuidedPipeline(testing.tiny_sd15(seed=1))
    changed = replay(result.manifests[1], other)
    assert not changed.identical and "unet" in changed.model_mismatch


def test_config_round_trips_through_manifest(sd15):
    cfg = GenerateConfig.create(
        ["a", "b"],
        ["x", "y"],
        guidance=[
            CFG(3, 0.5, Window(sigma_max=10)),
            PAG(2, "mid", 0.01),
            TPG(1.5, "d0", Window(0.0, 1.0, 0.2, 0.8)),
        ],
        steps=2,
        seed=4,
        scheduler="euler_a",
    )
    manifest = sd15.generate(cfg, decode=False).manifests[0]
    # the manifest records the resolved size, so a replay does not depend on the model's default
    assert config_from_manifest(json.loads(json.dumps(manifest))) == replace(cfg, width=32, height=32)


def test_check_determinism(sd15):
    cfg = GenerateConfig.create(
        ["a", "b"], guidance=[CFG(4), PAG(2), TPG(2)], steps=3, seed=2, scheduler="euler_a"
    )
    checks = check_determinism(sd15, cfg, batch_vs_single=True, strict=True)
    assert checks[0].name == "rerun"
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.name, c.report.max_abs_err) for c in checks]
    assert checks[0].report.max_abs_err == 0.0


def test_conditioning_file_round_trip(sdxl, tmp_path):
    cfg = GenerateConfig.create("a cat", guidance=[CFG(4)], steps=3)
    cond, uncond = sdxl.encode(cfg, 32, 32)
    path = save_conditioning(tmp_path / "c.safetensors", cond, uncond, {"prompt": "a cat"})
    loaded = load_conditioning(path)
    assert loaded.metadata == {"prompt": "a cat"}
    a = sdxl.generate(cfg, decode=False, conditioning=loaded)
    b = sdxl.generate(cfg, decode=False)
    assert torch.equal(a.latents, b.latents)
    assert a.manifests[0]["conditioning"]["metadata"] == {"prompt": "a cat"}


def test_missing_sdxl_conditioning_is_loud(sdxl, tmp_path):
    cfg = GenerateConfig.create("a cat", guidance=[CFG(4)], steps=2)
    cond, uncond = sdxl.encode(cfg, 32, 32)
    assert uncond is not None
    bare = ConditioningFile(Conditioning(cond.embeds), Conditioning(uncond.embeds))
    with pytest.raises(ConfigError, match="pooled and time_ids"):
        sdxl.generate(cfg, decode=False, conditioning=bare)
    no_negative = ConditioningFile(cond, None)
    with pytest.raises(ConfigError, match="negative conditioning"):
        sdxl.generate(cfg, decode=False, conditioning=no_negative)


class Evil:
    """An arbitrary Python object: weights_only loading must refuse it."""


def test_conditioning_file_errors(tmp_path):
    embeds = torch.randn(1, 77, 32)
    torch.save([[embeds, {}]], tmp_path / "wrapped.pt")
    with pytest.raises(DiffguideError, match="drops"):
        load_conditioning(tmp_path / "wrapped.pt")

    torch.save({"prompt_embeds": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DiffguideError, match="weights_only"):
        load_conditioning(tmp_path / "evil.pt")
    torch.save({"prompt_embeds": embeds, "pooled": torch.randn(1, 8)}, tmp_path / "keys.pt")
    with pytest.raises(DiffguideError, match="unknown conditioning keys"):
        load_conditioning(tmp_path / "keys.pt")
    torch.save({"prompt_embeds": embeds, "time_ids": torch.randn(2, 6)}, tmp_path / "batch.pt")
    with pytest.raises(DiffguideError, match="batch 1"):
        load_conditioning(tmp_path / "batch.pt")
    with pytest.raises(DiffguideError, match="does not exist"):
        load_conditioning(tmp_path / "missing.safetensors")
    torch.save({"prompt_embeds": embeds}, tmp_path / "ok.pt")
    assert load_conditioning(tmp_path / "ok.pt").uncond is None


def test_batch_vs_single_is_refused_for_whole_batch_comfy_noise(sd15):
    cfg = GenerateConfig.create(["a", "b"], steps=2, noise="comfy")
    with pytest.raises(ConfigError, match="comfy noise policy draws one noise tensor"):
        check_determinism(sd15, cfg, batch_vs_single=True)


def test_config_from_manifest_names_missing_fields():
    with pytest.raises(DiffguideError, match=r"manifest lacks \['prompts'"):
        config_from_manifest({"parameters": {"steps": 2}})
