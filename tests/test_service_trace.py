"""A job's step trace (the same file as ``diffguide generate --trace``) and VAE-decoded previews in
its event stream (the model's VAE, or its tiny autoencoder when the model folder has one)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load, load_file
from service_support import client
from typer.testing import CliRunner

from diffguide.cli.main import app as cli
from diffguide.defaults import default_model
from diffguide.service.models import TINY_VAE, ModelCache, find_models


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


def events(c: Any, job_id: str) -> list[dict[str, Any]]:
    text = c.get(f"/v1/jobs/{job_id}/events").text
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def png_rgb(data_url_or_bytes: str | bytes) -> torch.Tensor:
    data = data_url_or_bytes
    if isinstance(data, str):
        data = base64.b64decode(data.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        return torch.tensor(list(im.convert("RGB").getdata()))


def test_trace_file_is_the_clis_for_the_same_run(cache, tmp_path):
    trace = tmp_path / "cli.safetensors"
    args = ["-p", "a handwritten digit 7", "--steps", "3", "--seed", "4", "--cfg", "4", "--pag", "1.5",
            "--threads", "1", "--trace", str(trace), "--trace-modules", "mid_block.attentions.0"]  # fmt: skip
    res = CliRunner().invoke(cli, ["generate", *args, "-q", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    body = {
        "prompt": "a handwritten digit 7",
        "steps": 3,
        "seed": 4,
        "guidance": [{"method": "cfg", "scale": 4}, {"method": "pag", "scale": 1.5}],
        "trace": True,
        "trace_modules": "mid_block.attentions.0",
    }
    with client(cache, tmp_path / "svc") as c:
        job = c.post("/v1/jobs?wait=true", json=body).json()
        assert job["files"]["trace"] == f"/v1/jobs/{job['id']}/trace"
        got = c.get(job["files"]["trace"])
        assert got.headers["content-type"] == "application/octet-stream"
        (tmp_path / "svc.safetensors").write_bytes(got.content)
        # the same file: the same tensors bit for bit and the same metadata (manifest, steps); not
        # byte for byte: safetensors writes the metadata in a random (hash map) order on each save
        assert file_metadata(tmp_path / "svc.safetensors") == file_metadata(trace)
        tensors, expected = load(got.content), load_file(trace)
        assert sorted(tensors) == sorted(expected) and len(tensors) == 27
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
        assert "step_0002/module/mid_block.attentions.0/pag" in tensors and "step_0002/guided" in tensors
        plain = c.post("/v1/jobs?wait=true", json={**body, "trace": False, "trace_modules": None}).json()
        assert "trace" not in plain["files"]
        assert c.get(f"/v1/jobs/{plain['id']}/trace").json() == {
            "error": f"job '{plain['id']}' has no trace: ask for one with \"trace\": true"
        }
        assert c.get("/v1/jobs/nope/trace").status_code == 404
        r = c.post("/v1/jobs", json={**body, "batch_invariant": True})
        assert r.status_code == 422 and r.json()["error"].startswith("a trace records the steps of one batch")


def test_vae_previews_are_off_by_default_and_decode_the_latents(cache, tmp_path):
    with client(cache, tmp_path, preview_every=0) as c:
        body = {"prompt": "a photo of a dress", "steps": 3}
        plain = c.post("/v1/jobs?wait=true", json=body).json()
        assert not any("vae_preview" in e or "preview" in e for e in events(c, plain["id"]))
        job = c.post("/v1/jobs?wait=true", json={**body, "vae_preview_every": 2}).json()
        steps = [e for e in events(c, job["id"]) if e["event"] == "step"]
        assert [e["step"] for e in steps if "vae_preview" in e] == [2, 3]
        final = png_rgb(c.get(f"/v1/jobs/{job['id']}/images/0").content)
        assert torch.equal(png_rgb(steps[-1]["vae_preview"]), final)  # the full VAE at the last step
        assert not torch.equal(png_rgb(steps[1]["vae_preview"]), final)


def test_vae_previews_use_the_tiny_autoencoder_when_the_model_has_one(tmp_path):
    from diffusers import AutoencoderTiny

    folder = tmp_path / "models" / "tiny-taesd"
    shutil.copytree(default_model(), folder, symlinks=True)
    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    tiny.save_pretrained(folder / TINY_VAE)
    cache = ModelCache(find_models((folder.parent,), False), 4096.0)
    with client(cache, tmp_path / "svc", preview_every=0) as c:
        job = c.post(
            "/v1/jobs?wait=true",
            json={"model": "tiny-taesd", "prompt": "a", "steps": 2, "vae_preview_every": 2},
        ).json()
        assert job["state"] == "succeeded", job
        latents = load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"]
        (last,) = [e["vae_preview"] for e in events(c, job["id"]) if "vae_preview" in e]
    with torch.no_grad():
        x = tiny.decode(latents / tiny.config.scaling_factor).sample[0]
    expected = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
    assert torch.equal(png_rgb(last), expected.long())
