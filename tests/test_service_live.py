"""diffguide serve for real: results equal the CLI's bit for bit; a uvicorn process on loopback
killed mid-job and restarted loses no finished result and marks the killed job failed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file
from service_support import client, free_port
from typer.testing import CliRunner

import diffguide
from diffguide.cli.main import app as cli
from diffguide.service.models import ModelCache, find_models
from diffguide.service.store import RESTART_ERROR


def rgb(data: bytes | Path) -> torch.Tensor:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return torch.tensor(list(im.convert("RGB").getdata()))


def test_service_results_equal_the_cli_bit_for_bit(tmp_path):
    args = ["-p", "a handwritten digit 3", "-p", "a photo of a sneaker", "-N", "blurry", "--steps", "4",
            "--seed", "11", "--scheduler", "dpmpp_2m", "--cfg", "3", "--pag", "1.5", "--pag-layers", "mid",
            "--tpg", "1", "--tpg-window", "0:0.5", "--threads", "1"]  # fmt: skip
    res = CliRunner().invoke(cli, ["generate", *args, "--save-latents", "-q", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    body = {
        "prompt": ["a handwritten digit 3", "a photo of a sneaker"],
        "negative_prompt": "blurry",
        "steps": 4,
        "seed": 11,
        "scheduler": "dpmpp_2m",
        "guidance": [
            {"method": "cfg", "scale": 3},
            {"method": "pag", "scale": 1.5, "layers": "mid"},
            {"method": "tpg", "scale": 1, "window": {"start": 0, "end": 0.5}},
        ],
    }
    with client(ModelCache(find_models((), True), 4096.0), tmp_path / "svc", threads=1) as c:
        job = c.post("/v1/jobs?wait=true", json=body).json()
        assert job["state"] == "succeeded"
        latents = load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"]
        pngs = [c.get(f"/v1/jobs/{job['id']}/images/{i}").content for i in range(2)]
        manifests = c.get(f"/v1/jobs/{job['id']}/manifest").json()
    for i, seed in enumerate((11, 12)):
        stem = tmp_path / "cli" / f"diffguide-{i:03d}-{seed}"
        assert torch.equal(latents[i : i + 1], load_file(f"{stem}.safetensors")["latents"])
        assert torch.equal(rgb(pngs[i]), rgb(Path(f"{stem}.png")))
        cli_manifest = diffguide.io.read_manifest(f"{stem}.json")
        assert manifests[i]["parameters"] == cli_manifest["parameters"]
        assert manifests[i]["environment"]["threads"] == cli_manifest["environment"]["threads"]


def _serve(data: Path, port: int, key: str) -> subprocess.Popen[bytes]:
    src = str(Path(diffguide.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "DIFFGUIDE_API_KEY": key}
    cmd = [sys.executable, "-m", "diffguide.cli.main", "serve", "--port", str(port), "--data-dir", str(data),
           "--threads", "1", "--device", "cpu"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ready(http: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "diffguide serve exited"
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("diffguide serve did not start")


def _state(http: httpx.Client, job_id: str, states: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and (job["state"] != "running" or job["progress"]["step"] >= 2):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_uvicorn_killed_mid_job_restarts_with_finished_results_and_the_job_failed(tmp_path):
    port, key = free_port(), "k3y"
    base = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path, port, key)
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            _ready(http, proc)
            assert httpx.get(f"{base}/healthz").status_code == 401  # the key is required
            done = http.post(
                "/v1/jobs", params={"wait": "true"}, json={"prompt": "a handwritten digit 1", "steps": 3}
            )
            assert done.json()["state"] == "succeeded"
            png = http.get(f"/v1/jobs/{done.json()['id']}/images/0").content
            long = http.post("/v1/jobs", json={"prompt": "a handwritten digit 2", "steps": 200}).json()
            _state(http, long["id"], ("running",))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        proc = _serve(tmp_path, port, key)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            _ready(http, proc)
            assert http.get(f"/v1/jobs/{done.json()['id']}/images/0").content == png
            killed = http.get(f"/v1/jobs/{long['id']}").json()
            assert killed["state"] == "failed" and killed["error"] == RESTART_ERROR
            assert http.get(f"/v1/jobs/{long['id']}/images/0").status_code == 409
            assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [done.json()["id"]]
    finally:
        proc.kill()
        proc.wait(30)
