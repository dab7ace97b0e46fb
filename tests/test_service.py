"""diffguide serve (diffguide.service) through FastAPI's client: every endpoint and job state,
the error codes, cancellation, faults, webhooks, the API key, the model cache."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load
from service_support import PROMPT, Gate, Sink, client, job_body, wait_state

from diffguide import ConfigError
from diffguide.io import read_manifest
from diffguide.service.models import ModelCache, find_models
from diffguide.service.schema import JobRequest
from diffguide.service.store import RESTART_ERROR, JobStore


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


@pytest.fixture(scope="module")
def unet(cache):
    return cache.get("tiny-sd").model


def reference(cache: ModelCache, **overrides):
    """The library's result for the same request (same process, same thread count)."""
    return cache.get("tiny-sd").generate(JobRequest(**job_body(**overrides)).to_config())


def pixels(png: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(png)) as im:
        return torch.tensor(list(im.convert("RGB").getdata()))


def test_job_succeeds_with_files_equal_to_the_library_run(cache, tmp_path):
    with client(cache, tmp_path) as c:
        r = c.post(
            "/v1/jobs?wait=true", json=job_body(prompt=["a handwritten digit 7", "a photo of a dress"])
        )
        assert r.status_code == 200
        job = r.json()
        assert job["state"] == "succeeded" and job["images"] == 2 and job["error"] is None
        assert job["progress"] == {"step": 3, "steps": 3}
        assert c.get(f"/v1/jobs/{job['id']}").json() == job
        ref = reference(cache, prompt=["a handwritten digit 7", "a photo of a dress"])
        latents = c.get(f"/v1/jobs/{job['id']}/latents")
        assert latents.headers["content-type"] == "application/octet-stream"
        assert torch.equal(load(latents.content)["latents"], ref.latents)
        for i in range(2):
            png = c.get(f"/v1/jobs/{job['id']}/images/{i}")
            assert png.headers["content-type"] == "image/png"
            assert torch.equal(
                pixels(png.content), torch.tensor(list(ref.images[i].convert("RGB").getdata()))
            )
            path = tmp_path / f"{i}.png"
            path.write_bytes(png.content)
            assert read_manifest(path)["image"]["index"] == i
        manifests = c.get(f"/v1/jobs/{job['id']}/manifest").json()
        assert [m["image"]["prompt"] for m in manifests] == ["a handwritten digit 7", "a photo of a dress"]
        assert manifests[0]["output"] == ref.manifests[0]["output"]
        assert c.get(f"/v1/jobs/{job['id']}/images/2").json() == {
            "error": f"job '{job['id']}' has no image 2"
        }
        assert c.get(f"/v1/jobs/{job['id']}/images/2").status_code == 404
        gone = c.delete(f"/v1/jobs/{job['id']}")
        assert gone.status_code == 409
        assert gone.json() == {"error": f"job '{job['id']}' has already ended (succeeded)"}
        assert [j["id"] for j in c.get("/v1/jobs").json()] == [job["id"]]


def test_unknown_job_is_404_on_every_job_endpoint(cache, tmp_path):
    with client(cache, tmp_path) as c:
        for path in ("", "/images/0", "/latents", "/manifest", "/events"):
            r = c.get(f"/v1/jobs/nope{path}")
            assert (r.status_code, r.json()) == (404, {"error": "no job 'nope'"})
        assert c.delete("/v1/jobs/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "../tiny-sd"}, "model '../tiny-sd' is not a model name: use a name from GET /v1/models"),
        ({"model": "/etc/passwd"}, "model '/etc/passwd' is not a model name"),
        ({"model": "tiny..sd"}, "model 'tiny..sd' is not a model name"),
        ({"model": "other"}, "unknown model 'other'; available: tiny-sd"),
        ({"guidance": [{"method": "cfg", "scale": -1}]}, "CFG scale must be in [0, 100], got -1.0"),
        ({"guidance": [{"method": "xyz"}]}, "unknown guidance method 'xyz' in guidance[0]; known: cfg,"),
        (
            {"guidance": [{"method": "pag", "adaptive": 1}]},
            "pag has no parameter 'adaptive'; its parameters:",
        ),
        ({"guidance": ["cfg"]}, "guidance.0: Input should be a valid dictionary"),
        ({"scheduler": "nope"}, "unknown scheduler 'nope'; choose one of: euler"),
        ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"width": 36}, "width must be a positive multiple of 8, got 36"),
        ({"seeds": 3}, "seeds: Extra inputs are not permitted"),
        ({"callback_url": "file:///etc/passwd"}, "callback_url: callback_url must be an http(s) URL"),
        ({"noise": "comfy", "scheduler": "dpmpp_2m_karras"}, "with the comfy noise policy the schedule"),
    ],
)
def test_bad_requests_are_422_with_one_line(cache, tmp_path, body, message):
    with client(cache, tmp_path) as c:
        r = c.post("/v1/jobs", json=job_body(**body))
        assert r.status_code == 422
        assert r.json()["error"].startswith(message) and "\n" not in r.json()["error"]
        assert c.get("/v1/jobs").json() == []  # nothing queued


def test_bad_layer_spec_fails_the_job_with_the_one_line_error(cache, tmp_path):
    with client(cache, tmp_path) as c:
        job = c.post(
            "/v1/jobs?wait=true", json=job_body(guidance=[{"method": "pag", "layers": "up_blocks.9"}])
        )
        assert job.json()["state"] == "failed"
        assert job.json()["error"].startswith("layer 'up_blocks.9' is not a module of this model")
        assert c.get(f"/v1/jobs/{job.json()['id']}/images/0").status_code == 409


def test_request_larger_than_the_limit_is_413(cache, tmp_path):
    with client(cache, tmp_path, max_request_bytes=2048) as c:
        r = c.post("/v1/jobs", json=job_body(prompt="x" * 3000))
        assert (r.status_code, r.json()) == (413, {"error": "request body larger than 2048 bytes"})
        assert c.get("/v1/jobs").json() == []
        assert c.post("/v1/jobs", json=job_body(steps=1)).status_code == 202


def test_full_queue_is_429_and_a_queued_job_cancels_at_once(cache, unet, tmp_path):
    pipe = cache.get("tiny-sd")
    with client(cache, tmp_path, queue_size=1) as c:
        with pipe.lock:  # the worker waits for the pipeline: one job running, one queued
            first = c.post("/v1/jobs", json=job_body()).json()
            wait_state(c, first["id"], ("running",))
            second = c.post("/v1/jobs", json=job_body())
            assert second.status_code == 202 and second.json()["state"] == "queued"
            third = c.post("/v1/jobs", json=job_body())
            assert third.status_code == 429 and third.headers["retry-after"] == "2"
            assert third.json() == {"error": "the queue is full (1 jobs waiting); retry later"}
            assert "diffguide_queue_length 1" in c.get("/metrics").text
            cancelled = c.delete(f"/v1/jobs/{second.json()['id']}").json()
            assert cancelled["state"] == "cancelled" and cancelled["progress"]["step"] == 0
        assert wait_state(c, first["id"], ("succeeded",))["images"] == 1
        assert c.get(f"/v1/jobs/{second.json()['id']}").json()["state"] == "cancelled"
        assert c.get(f"/v1/jobs/{second.json()['id']}/images/0").status_code == 409


def test_cancel_stops_a_running_job_within_one_step_and_the_next_is_exact(cache, unet, tmp_path):
    gate = Gate(unet, at=2)
    try:
        with client(cache, tmp_path) as c:
            job = c.post("/v1/jobs", json=job_body(steps=10)).json()
            assert gate.reached.wait(30)
            running = c.get(f"/v1/jobs/{job['id']}").json()
            assert running["state"] == "running" and running["progress"] == {"step": 1, "steps": 10}
            r = c.delete(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200 and r.json()["cancel_requested"] is True
            gate.remove()
            done = wait_state(c, job["id"], ("cancelled",))
            assert done["progress"]["step"] == 1 and gate.calls == 2  # the forward under way ended, no more
            assert c.get(f"/v1/jobs/{job['id']}/latents").status_code == 409
            assert not list((tmp_path / "jobs").iterdir())  # no partial files
            nxt = c.post("/v1/jobs?wait=true", json=job_body(seed=4)).json()
            latents = load(c.get(f"/v1/jobs/{nxt['id']}/latents").content)["latents"]
        assert torch.equal(latents, reference(cache, seed=4).latents)
    finally:
        gate.remove()


def test_a_job_raising_mid_run_fails_cleanly_and_the_next_job_is_correct(cache, unet, tmp_path):
    processors = dict(unet.attn_processors)
    hooks = (len(unet._forward_pre_hooks), len(unet._forward_hooks))
    gate = Gate(unet, at=2, raise_error=True)
    try:
        with client(cache, tmp_path) as c:
            bad = c.post("/v1/jobs?wait=true", json=job_body(guidance=[{"method": "pag", "scale": 2}])).json()
            assert bad["state"] == "failed" and bad["error"] == "RuntimeError: boom in the model"
            gate.remove()
            assert unet.attn_processors == processors  # the PAG processors were removed
            assert (len(unet._forward_pre_hooks), len(unet._forward_hooks)) == hooks
            good = c.post(
                "/v1/jobs?wait=true", json=job_body(guidance=[{"method": "pag", "scale": 2}])
            ).json()
            assert good["state"] == "succeeded"
            latents = load(c.get(f"/v1/jobs/{good['id']}/latents").content)["latents"]
            assert 'diffguide_jobs{state="failed"} 1' in c.get("/metrics").text
        assert torch.equal(latents, reference(cache, guidance=[{"method": "pag", "scale": 2}]).latents)
    finally:
        gate.remove()


def test_events_stream_one_event_per_step_with_previews(cache, tmp_path):
    with client(cache, tmp_path, preview_every=2) as c:
        job = c.post("/v1/jobs", json=job_body(steps=5)).json()
        events = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        steps = [e for e in events if e["event"] == "step"]
        assert [e["step"] for e in steps] == [1, 2, 3, 4, 5] and {e["steps"] for e in steps} == {5}
        assert [e["step"] for e in steps if "preview" in e] == [2, 4, 5]
        assert steps[1]["preview"].startswith("data:image/png;base64,")
        assert events[0] == {"event": "state", "state": "queued"}
        assert events[-1] == {"event": "end", "state": "succeeded", "error": None}
        again = c.get(f"/v1/jobs/{job['id']}/events").text  # a finished job replays its events
        assert again.count("event: step") == 5 and again.endswith('"error": null}\n\n')


def test_webhook_posts_the_final_job(cache, tmp_path):
    with Sink() as sink, client(cache, tmp_path) as c:
        job = c.post("/v1/jobs", json=job_body(callback_url=sink.url)).json()
        assert sink.arrived.wait(30)
        (body,) = sink.bodies
        assert body["id"] == job["id"] and body["state"] == "succeeded"
        assert body["files"]["images"] == [f"/v1/jobs/{job['id']}/images/0"]
        deadline = time.monotonic() + 5
        while 'diffguide_callbacks_total{outcome="sent"} 1' not in c.get("/metrics").text:
            assert time.monotonic() < deadline


def test_api_key_guards_every_endpoint_and_the_page(cache, tmp_path):
    with client(cache, tmp_path, api_key="s3cret") as c:
        for path in ("/", "/healthz", "/metrics", "/v1/models", "/v1/jobs", "/static/app.js", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert c.post("/v1/jobs", json=job_body()).status_code == 401
        assert c.get("/healthz?api_key=s3cret").status_code == 200
        assert c.get("/v1/jobs/nope", headers={"Authorization": "Bearer s3cret"}).status_code == 404
    with client(cache, tmp_path / "open") as c:
        assert c.get("/healthz").json()["status"] == "ok"


def test_cors_is_off_by_default_and_on_for_named_origins(cache, tmp_path):
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "POST"}
    with client(cache, tmp_path / "off") as c:
        assert (
            "access-control-allow-origin"
            not in c.get("/healthz", headers={"Origin": "http://a.example"}).headers
        )
        assert "access-control-allow-origin" not in c.options("/v1/jobs", headers=preflight).headers
    with client(cache, tmp_path / "on", cors_origins=("http://a.example",)) as c:
        r = c.options("/v1/jobs", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://a.example"


def test_models_layers_health_metrics(cache, tmp_path):
    with client(cache, tmp_path) as c:
        models = c.get("/v1/models").json()
        assert models["models"][0]["name"] == "tiny-sd" and models["models"][0]["loaded"]
        assert models["cache"]["used_bytes"] == models["models"][0]["bytes"] > 0
        layers = c.get("/v1/models/tiny-sd/layers", params={"pag": "mid", "tpg": "d1"}).json()
        assert layers["selected"]["pag"]["modules"] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
        assert layers["selected"]["tpg"]["modules"] == ["down_blocks.1.attentions.0.transformer_blocks.0"]
        assert layers["presets"]["pag"]["spec"] == "mid"
        assert [u["alias"] for u in layers["units"]][:3] == ["d0", "d1", "m0"]
        bad = c.get("/v1/models/tiny-sd/layers", params={"pag": "blocks.9"})
        assert bad.status_code == 422 and bad.json()["error"].startswith("layer 'blocks.9' is not a module")
        assert c.get("/v1/models/..%2Fx/layers").status_code in (404, 422)
        assert c.get("/v1/models/nope/layers").json() == {"error": "unknown model 'nope'; available: tiny-sd"}
        assert c.get("/healthz").json()["queue"] == 0
        c.post("/v1/jobs?wait=true", json=job_body(steps=2))
        text = c.get("/metrics").text
        assert 'diffguide_jobs{state="succeeded"} 1' in text and "diffguide_step_seconds_count 2" in text
        assert c.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]


def test_compare_reports_the_diff_and_a_heatmap(cache, tmp_path):
    with client(cache, tmp_path) as c:
        a = c.post("/v1/jobs?wait=true", json=job_body(seed=1)).json()["id"]
        b = c.post("/v1/jobs?wait=true", json=job_body(seed=1)).json()["id"]
        d = c.post("/v1/jobs?wait=true", json=job_body(seed=2)).json()["id"]
        same = c.get("/v1/compare", params={"a": a, "b": b}).json()
        assert same["identical"] and same["latents"]["max_abs_err"] == 0.0
        diff = c.get("/v1/compare", params={"a": a, "b": d}).json()
        la = load(c.get(f"/v1/jobs/{a}/latents").content)["latents"]
        ld = load(c.get(f"/v1/jobs/{d}/latents").content)["latents"]
        assert not diff["identical"] and diff["latents"]["max_abs_err"] == pytest.approx(
            float((la - ld).abs().max())
        )
        heat = c.get("/v1/compare/heatmap", params={"a": a, "b": d})
        with Image.open(io.BytesIO(heat.content)) as im:
            assert im.size == (256, 256) and im.getextrema()[0][1] == 255
        with Image.open(io.BytesIO(c.get("/v1/compare/heatmap", params={"a": a, "b": b}).content)) as im:
            assert im.getextrema() == ((0, 0), (0, 0), (0, 0))
        assert c.get("/v1/compare", params={"a": a, "b": "nope"}).status_code == 404


def test_restart_serves_finished_jobs_fails_running_ones_requeues_queued(cache, tmp_path):
    with client(cache, tmp_path) as c:
        done = c.post("/v1/jobs?wait=true", json=job_body()).json()
        png = c.get(f"/v1/jobs/{done['id']}/images/0").content
    store = JobStore(tmp_path)  # as a process killed mid-job leaves it: a running row, partial files
    store.add("deadbeef", "tiny-sd", JobRequest(**job_body()).model_dump(mode="json"), 3)
    store.update("deadbeef", state="running", step=1)
    (tmp_path / "jobs" / "deadbeef").mkdir()
    store.add("cafe", "tiny-sd", JobRequest(**job_body(seed=9)).model_dump(mode="json"), 3)
    store.close()
    with client(cache, tmp_path) as c:
        assert c.get(f"/v1/jobs/{done['id']}/images/0").content == png
        dead = c.get("/v1/jobs/deadbeef").json()
        assert dead["state"] == "failed" and dead["error"] == RESTART_ERROR
        assert not (tmp_path / "jobs" / "deadbeef").exists()
        requeued = wait_state(c, "cafe", ("succeeded",))
        assert requeued["images"] == 1


def test_model_cache_evicts_least_recently_used_within_its_budget(tmp_path):
    from diffguide.defaults import default_model

    for name in ("a", "b"):
        os.symlink(default_model(), tmp_path / name)
    models = find_models((tmp_path,), False)
    assert sorted(models) == ["a", "b"]
    small = ModelCache(models, 10.0)
    with pytest.raises(
        ConfigError, match=r"^model 'a' needs 20\.7 MB, more than the model memory budget \(10\.0 MB\)$"
    ):
        small.get("a")
    cache = ModelCache(models, 30.0)
    a = cache.get("a")
    assert cache.get("a") is a
    cache.get("b")
    assert [m.name for m in cache.held()] == ["b"] and cache.evictions == 1
    assert cache.used() <= cache.budget


def test_concurrent_submissions_lose_nothing(cache, tmp_path):
    with client(cache, tmp_path, queue_size=32) as c:
        ids: list[str] = []

        def post(seed: int) -> None:
            ids.append(c.post("/v1/jobs", json=job_body(steps=2, seed=seed)).json()["id"])

        threads = [threading.Thread(target=post, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 8
        for job_id in ids:
            assert wait_state(c, job_id, ("succeeded",))["images"] == 1
        seeds = sorted(c.get(f"/v1/jobs/{j}/manifest").json()[0]["image"]["seed"] for j in ids)
        assert seeds == list(range(8))
        assert PROMPT in c.get(f"/v1/jobs/{ids[0]}/manifest").text


def test_serve_command_refuses_bad_settings_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from diffguide.cli.main import app as cli

    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--models-dir", str(tmp_path / "nope"), "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert (
        res.output.strip() == f"error: model folder '{tmp_path / 'nope'}' does not exist or is not a folder"
    )
    res = runner.invoke(cli, ["serve", "--queue-size", "0", "--data-dir", str(tmp_path)])
    assert (res.exit_code, res.output.strip()) == (2, "error: queue size must be >= 1, got 0")
    res = runner.invoke(cli, ["serve", "--api-key", " ", "--data-dir", str(tmp_path)])
    assert (res.exit_code, res.output.strip()) == (
        2,
        "error: the API key is empty: give a non-empty key or none",
    )
