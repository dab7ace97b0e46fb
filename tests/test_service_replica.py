"""The Ray Serve path without Ray: a replica's streamed run (step events, the job's files, the
result equal to the library's, cancel at the next step) and the front's runner relaying it into a
job, through a stand-in for Ray Serve's streaming handle. The real Ray test is test_service_ray.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load
from service_support import Gate, job_body, wait_state

from diffguide.conditioning import save_conditioning
from diffguide.pipeline import GenerateConfig
from diffguide.service.models import ModelCache, find_models
from diffguide.service.ray_backend import RayRunner, Replica
from diffguide.service.schema import JobRequest


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


@pytest.fixture(scope="module")
def replica(cache) -> Replica:
    r = Replica({k: str(v) for k, v in cache.models.items()}, 4096.0, "cpu", threads=1)
    r.cache = cache  # share the loaded model with the tests
    return r


class Stream:
    """Ray Serve's DeploymentResponseGenerator, in-process: iterates an async generator run on a
    loop of its own; cancel() cancels it as Serve cancels the replica's task."""

    def __init__(self, agen: AsyncIterator[dict[str, Any]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.agen = agen
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cancelled = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(anext(self.agen), self.loop).result(60)  # type: ignore[arg-type]
            except StopAsyncIteration:
                return

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.run_coroutine_threadsafe(self.agen.aclose(), self.loop).result(60)  # type: ignore[attr-defined]


class Handle:
    """``handle.options(stream=True).run.remote(...)`` of a deployment of ``replica``."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.streams: list[Stream] = []

    def options(self, stream: bool) -> Handle:
        assert stream
        return self

    @property
    def run(self) -> Handle:
        return self

    def remote(self, request: dict[str, Any], files: dict[str, bytes], preview_every: int) -> Stream:
        request = json.loads(json.dumps(request))  # what crosses to the replica: JSON and bytes
        self.streams.append(Stream(self.replica.run(request, files, preview_every)))
        return self.streams[-1]


def test_replica_streams_step_events_then_the_run_equal_to_the_library(cache, replica, tmp_path):
    gp = cache.get("tiny-sd")
    cond, uncond = gp.encode(GenerateConfig.create("a photo of a shirt", "blurry"), 32, 32)
    data = save_conditioning(tmp_path / "c.safetensors", cond, uncond, {"prompt": "a photo of a shirt"})
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    body = job_body(prompt=None, steps=3, trace=True, conditioning={"upload": sha})
    stream = Handle(replica).remote(JobRequest(**body).model_dump(mode="json"), {sha: data.read_bytes()}, 2)
    events = list(stream)
    assert [e["event"] for e in events] == ["step", "step", "step", "run"]
    assert [("preview" in e) for e in events[:3]] == [False, True, True]
    run = events[-1]["run"]
    ref = gp.generate(JobRequest(**body).to_config("a photo of a shirt"), conditioning=_cond(data))
    assert torch.equal(run.result.latents, ref.latents)
    assert run.trace is not None and "step_0002/guided" in run.trace.tensors
    assert (replica.uploads / f"{sha}.safetensors").read_bytes() == data.read_bytes()


def _cond(path: Path) -> Any:
    from diffguide.conditioning import load_conditioning

    return load_conditioning(path)


def test_front_relays_replica_events_and_cancels_the_stream_within_one_step(cache, replica, tmp_path):
    from diffguide.service.config import ServiceConfig
    from diffguide.service.server import create_app

    handle = Handle(replica)
    app = create_app(ServiceConfig(tmp_path, threads=1, preview_every=2), cache, runner=RayRunner(handle))
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        job = c.post("/v1/jobs?wait=true", json=job_body(steps=4)).json()
        assert job["state"] == "succeeded" and job["progress"] == {"step": 4, "steps": 4}
        text = c.get(f"/v1/jobs/{job['id']}/events").text
        assert text.count("event: step") == 4 and text.count("preview") == 2  # steps 2 and 4
        solo = cache.get("tiny-sd").generate(JobRequest(**job_body(steps=4)).to_config()).latents
        assert torch.equal(load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"], solo)
        gate = Gate(cache.get("tiny-sd").model, at=2)
        try:
            job = c.post("/v1/jobs", json=job_body(steps=20)).json()
            assert gate.reached.wait(60)
            assert c.delete(f"/v1/jobs/{job['id']}").json()["cancel_requested"]
            gate.opened.set()
            done = wait_state(c, job["id"], ("cancelled", "failed", "succeeded"))
        finally:
            gate.remove()
        assert done["state"] == "cancelled" and done["progress"]["step"] <= 2
        assert handle.streams[-1].cancelled
        nxt = c.post("/v1/jobs?wait=true", json=job_body(steps=4)).json()  # the model is clean again
        assert torch.equal(load(c.get(f"/v1/jobs/{nxt['id']}/latents").content)["latents"], solo)


def test_replica_error_reaches_the_job_in_one_line(cache, replica, tmp_path):
    from fastapi.testclient import TestClient

    from diffguide.service.config import ServiceConfig
    from diffguide.service.server import create_app

    app = create_app(ServiceConfig(tmp_path, threads=1), cache, runner=RayRunner(Handle(replica)))
    with TestClient(app) as c:
        bad = job_body(guidance=[{"method": "pag", "layers": "up_blocks.9"}])
        job = c.post("/v1/jobs?wait=true", json=bad).json()
        assert job["state"] == "failed"
        assert job["error"].startswith("layer 'up_blocks.9' is not a module of this model")
