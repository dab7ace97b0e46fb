"""diffguide serve --ray: jobs sampled by 2 Ray Serve replicas of the bundled model (a local Ray
instance on this machine). Opt-in, DIFFGUIDE_RAY_TESTS=1: starting Ray and two replicas takes
about 3 minutes on a loaded 2-core machine, longer than the rest of the service tests together."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load
from service_support import job_body, wait_state

from diffguide.service.config import ServiceConfig
from diffguide.service.models import ModelCache, find_models
from diffguide.service.schema import JobRequest
from diffguide.service.server import create_app

pytestmark = pytest.mark.skipif(
    os.environ.get("DIFFGUIDE_RAY_TESTS") != "1",
    reason="starts a local Ray instance and 2 replicas (minutes): set DIFFGUIDE_RAY_TESTS=1",
)


def test_two_ray_replicas_run_jobs_in_parallel_with_solo_results(tmp_path):
    from diffguide.service import ray_backend

    models = find_models((), True)
    runner = ray_backend.start(models, 4096.0, "cpu", threads=1, replicas=2)
    try:
        assert len({runner.handle.pid.remote().result() for _ in range(12)}) == 2
        cache = ModelCache(models, 4096.0)
        app = create_app(ServiceConfig(tmp_path, threads=1), cache, runner=runner, concurrency=2)
        with TestClient(app) as c:
            ids = [c.post("/v1/jobs", json=job_body(seed=s, steps=3)).json()["id"] for s in range(6)]
            jobs = [wait_state(c, i, ("succeeded", "failed"), timeout=300) for i in ids]
            assert [j["state"] for j in jobs] == ["succeeded"] * 6
            spans = sorted((j["started"], j["finished"]) for j in jobs)
            assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))  # two at once
            pipe = cache.get("tiny-sd")
            for seed, job_id in enumerate(ids):
                served = load(c.get(f"/v1/jobs/{job_id}/latents").content)["latents"]
                solo = pipe.generate(JobRequest(**job_body(seed=seed, steps=3)).to_config()).latents
                assert torch.equal(served, solo)
            bad = c.post(
                "/v1/jobs?wait=true", json=job_body(guidance=[{"method": "pag", "layers": "up_blocks.9"}])
            )
            assert bad.json()["state"] == "failed"
            assert bad.json()["error"].startswith("layer 'up_blocks.9' is not a module of this model")
            # per-step events from the replica, and a running job cancelled within a step or so
            text = c.get(f"/v1/jobs/{ids[0]}/events").text
            assert text.count("event: step") == 3 and text.count('"preview"') == 2
            slow = c.post("/v1/jobs", json=job_body(steps=200, width=256, height=256)).json()["id"]
            running = wait_state(c, slow, ("running",), timeout=300)
            while running["progress"]["step"] < 2:
                running = c.get(f"/v1/jobs/{slow}").json()
            assert c.delete(f"/v1/jobs/{slow}").json()["cancel_requested"]
            ended = wait_state(c, slow, ("cancelled", "succeeded", "failed"), timeout=120)
            assert ended["state"] == "cancelled" and ended["progress"]["step"] < 200
            again = c.post("/v1/jobs?wait=true", json=job_body(seed=0, steps=3)).json()
            served = load(c.get(f"/v1/jobs/{again['id']}/latents").content)["latents"]
            assert torch.equal(
                served, pipe.generate(JobRequest(**job_body(seed=0, steps=3)).to_config()).latents
            )
    finally:
        ray_backend.stop()
        import ray

        ray.shutdown()
