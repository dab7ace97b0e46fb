"""A job's ``initial_latents`` (+ ``strength``): an upload like the other files (multipart part, base64 or
upload id), the result bit-identical to ``diffguide generate --init-latents`` with the same file; bad
files and strengths refused in one line (422) with nothing kept."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file
from service_support import client
from test_service_uploads import multipart
from typer.testing import CliRunner

from diffguide.cli.main import app as cli
from diffguide.service.models import ModelCache, find_models


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init") / "start.safetensors"
    save_file({"latents": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))}, str(path))
    return path


def test_initial_latents_job_equals_the_cli_bit_for_bit(cache, start, tmp_path):
    args = ["-p", "a photo of a sneaker", "-n", "2", "--steps", "6", "--seed", "3", "--cfg", "4",
            "--init-latents", str(start), "--strength", "0.6", "--threads", "1"]  # fmt: skip
    res = CliRunner().invoke(cli, ["generate", *args, "--save-latents", "-q", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    cli_latents = torch.cat(
        [load_file(str(p))["latents"] for p in sorted((tmp_path / "cli").glob("*.safetensors"))]
    )
    body = {"prompt": "a photo of a sneaker", "num_images": 2, "steps": 6, "seed": 3,
            "guidance": [{"method": "cfg", "scale": 4}], "initial_latents": {"part": "start"}, "strength": 0.6}  # fmt: skip
    sha = hashlib.sha256(start.read_bytes()).hexdigest()
    with client(cache, tmp_path / "svc") as c:
        r = multipart(c, body, {"start": start})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["state"] == "succeeded", job
        assert job["request"]["initial_latents"]["upload"] == sha
        latents = load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"]
        assert torch.equal(latents, cli_latents)
        manifest = c.get(f"/v1/jobs/{job['id']}/manifest").json()[0]
        assert manifest["parameters"]["strength"] == 0.6
        cli_manifest = json.loads((tmp_path / "cli" / "diffguide-000-3.json").read_text())
        assert (
            manifest["parameters"]["init_latents"]["sha256"]
            == cli_manifest["parameters"]["init_latents"]["sha256"]
        )
        # by upload id and as base64: the same result
        again = c.post("/v1/jobs?wait=true", json={**body, "initial_latents": {"upload": sha}}).json()
        assert torch.equal(load(c.get(f"/v1/jobs/{again['id']}/latents").content)["latents"], latents)
        b64 = base64.b64encode(start.read_bytes()).decode()
        third = c.post("/v1/jobs?wait=true", json={**body, "initial_latents": {"base64": b64}}).json()
        assert torch.equal(load(c.get(f"/v1/jobs/{third['id']}/latents").content)["latents"], latents)


def test_bad_initial_latents_are_refused_in_one_line(cache, start, tmp_path):
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 4, 8, 8), "b": torch.zeros(1)}, str(two))
    pickle = tmp_path / "x.pt"
    torch.save(torch.zeros(1), pickle)
    base = {"prompt": "a", "steps": 2}
    assert two.read_bytes()[:1] == b"\x80"  # a 128-byte header: once taken for a pickle by its first byte
    with client(cache, tmp_path / "svc") as c:
        r = multipart(c, {**base, "initial_latents": {"part": "f"}}, {"f": two})
        assert r.status_code == 422
        assert "initial_latents: initial latents file 'the file' holds 2 tensors (a, b)" in r.json()["error"]
        r = multipart(c, {**base, "initial_latents": {"part": "f"}}, {"f": pickle})
        assert r.status_code == 422 and "is a pickle" in r.json()["error"]
        r = c.post("/v1/jobs", json={**base, "strength": 0.5})
        assert r.status_code == 422
        assert "strength 0.5 needs initial latents to start from" in r.json()["error"]
        r = multipart(c, {**base, "initial_latents": {"part": "f"}, "strength": 1.5}, {"f": start})
        assert r.status_code == 422
        assert "strength must be in (0, 1] (1 = start from pure noise), got 1.5" in r.json()["error"]
    uploads = tmp_path / "svc" / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir())  # nothing kept from refused requests
