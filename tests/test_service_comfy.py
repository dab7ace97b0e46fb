"""diffguide serve's ComfyUI-compatible endpoints through FastAPI's client: a ComfyUI API client's
flow (/ws, POST /prompt, /history, /view), results equal to /v1/jobs and to diffguide.comfy_workflow,
ComfyUI's error shapes, 404s and the API key."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from safetensors.torch import load
from service_support import PROMPT, Gate, client
from starlette.websockets import WebSocketDisconnect

from diffguide.comfy_workflow import load as load_workflow
from diffguide.service.models import ModelCache, find_models


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


def workflow(**sampler: Any) -> dict[str, Any]:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    ks = {"seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    ks.update(sampler)
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                **ks,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def same_job_body() -> dict[str, Any]:
    """The /v1/jobs request of workflow(): the comfy noise policy, ComfyUI's sampler and schedule."""
    return {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "num_images": 2,
        "guidance": [{"method": "cfg", "scale": 4.0}],
        "steps": 3,
        "width": 32,
        "height": 32,
        "seed": 7,
        "scheduler": "euler",
        "noise": "comfy",
        "schedule": "normal",
    }


def poll_history(c, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = c.get(f"/history/{prompt_id}")
        assert h.status_code == 200
        if h.json():
            return h.json()[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} not in the history after {timeout}s")


def test_comfy_client_flow_equals_the_same_run_via_v1_jobs_and_comfy_workflow(cache, tmp_path):
    with client(cache, tmp_path / "data") as c, c.websocket_connect("/ws?clientId=me") as ws:
        hello = ws.receive_json()
        assert hello == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"},
        }
        r = c.post("/prompt", json={"prompt": workflow(), "client_id": "me"})
        assert r.status_code == 200
        answer = r.json()
        pid = answer["prompt_id"]
        assert answer == {"prompt_id": pid, "number": 1, "node_errors": {}}
        messages = []
        while not (messages and messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None):
            messages.append(ws.receive_json())
        entry = poll_history(c, pid)
        images = entry["outputs"]["9"]["images"]
        assert [i["subfolder"] for i in images] == [pid, pid] and {i["type"] for i in images} == {"output"}
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert entry["prompt"][:2] == [1, pid] and entry["prompt"][2] == workflow()
        pngs = []
        for image in images:
            v = c.get("/view", params=image)
            assert v.status_code == 200 and v.headers["content-type"] == "image/png"
            pngs.append(v.content)
        # a /prompt job is a normal job: the same run through /v1/jobs gives the same files, bit for bit
        assert c.get(f"/v1/jobs/{pid}").json()["state"] == "succeeded"
        job = c.post("/v1/jobs?wait=true", json=same_job_body()).json()
        assert job["state"] == "succeeded"
        assert pngs == [c.get(f"/v1/jobs/{job['id']}/images/{i}").content for i in range(2)]
        served = load(c.get(f"/v1/jobs/{pid}/latents").content)["latents"]
        assert torch.equal(served, load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"])
    # ... and the latents equal diffguide.comfy_workflow's run of the same JSON on the same model
    # (model-space latents: ComfyUI's EmptyLatentImage shape assumes a VAE factor of 8, tiny-sd's is 4)
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "tiny-sd.safetensors").touch()  # the run's name; weights below
    (tmp_path / "wf.json").write_text(json.dumps({"prompt": workflow()}))
    run = load_workflow(tmp_path / "wf.json", tmp_path / "models")
    ref = cache.get("tiny-sd").generate(run.config, decode=False, conditioning=run.conditioning)
    assert run.config.noise == "comfy" and torch.equal(ref.latents, served)
    kinds = [m["type"] for m in messages]
    assert kinds == [
        "execution_start", "execution_cached", "executing", "progress", "progress", "progress",
        "executing", "executed", "execution_success", "executing",
    ]  # fmt: skip
    assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3]
    assert {m["data"]["max"] for m in messages if m["type"] == "progress"} == {3}
    assert messages[2]["data"]["node"] == "3" and messages[6]["data"]["node"] == "9"
    assert messages[7]["data"]["output"] == {"images": images}
    assert all(m["data"]["prompt_id"] == pid for m in messages)


def test_unsupported_node_and_unknown_checkpoint_answer_comfyui_node_errors(cache, tmp_path):
    wf = workflow()
    wf["10"] = {"class_type": "FancyUpscale", "inputs": {}}
    with client(cache, tmp_path) as c:
        r = c.post("/prompt", json={"prompt": wf})
        assert r.status_code == 400
        body = r.json()
        message = body["error"]["message"]
        assert message.startswith("node 10 (FancyUpscale): unsupported node class; diffguide runs CFGNorm, ")
        assert "\n" not in message
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert body["node_errors"] == {
            "10": {
                "errors": [
                    {"type": "diffguide_unsupported", "message": message, "details": "", "extra_info": {}}
                ],
                "dependent_outputs": [],
                "class_type": "FancyUpscale",
            }
        }
        wf = workflow()
        wf["4"]["inputs"]["ckpt_name"] = "../tiny-sd.safetensors"
        r = c.post("/prompt", json={"prompt": wf})
        assert r.status_code == 400
        assert r.json()["node_errors"]["4"]["errors"][0]["message"] == (
            "node 4 (CheckpointLoaderSimple): checkpoint '../tiny-sd.safetensors' is not a model of this "
            "service; available: tiny-sd"
        )
        wf = workflow()
        wf["3"]["inputs"]["sampler_name"] = "lcm"
        r = c.post("/prompt", json={"prompt": wf})
        assert list(r.json()["node_errors"]) == ["3"]
        wf = workflow()
        wf["5"]["inputs"]["batch_size"] = 17
        assert c.post("/prompt", json={"prompt": wf}).json()["error"]["message"] == (
            "node 3 (KSampler): the run's prompt: give 1 to 16 prompts, got 17"
        )
        wf = workflow()
        wf["2"] = {"class_type": "VAELoader", "inputs": {"vae_name": "x.safetensors"}}
        wf["8"]["inputs"]["vae"] = ["2", 0]
        assert c.post("/prompt", json={"prompt": wf}).json()["node_errors"]["2"]["errors"][0]["message"] == (
            "node 2 (VAELoader): not run by the service, which runs its own models by name "
            "(CheckpointLoaderSimple) and LoRAs sent to POST /v1/uploads, no other files"
        )
        assert c.post("/prompt", json={"client_id": "x"}).json()["error"]["type"] == "no_prompt"
        assert c.get("/v1/jobs").json() == []  # nothing was queued


def test_unknown_ids_and_files_are_404(cache, tmp_path):
    with client(cache, tmp_path) as c:
        assert c.get("/history/0123456789abcdef").status_code == 404
        assert c.get("/history/..%2Fx").status_code == 404
        params = {"filename": "image-000-7.png", "subfolder": "0123456789abcdef", "type": "output"}
        assert c.get("/view", params=params).json() == {"error": "no prompt '0123456789abcdef'"}
        job = c.post("/v1/jobs?wait=true", json={"prompt": PROMPT, "steps": 1, "width": 32, "height": 32})
        jid = job.json()["id"]
        assert c.get(f"/history/{jid}").json() == {"error": f"no prompt '{jid}'"}  # not a /prompt job
        r = c.post("/prompt", json={"prompt": workflow(steps=1)})
        pid = r.json()["prompt_id"]
        poll_history(c, pid)
        for bad in ({"type": "temp"}, {"filename": "../store.sqlite"}, {"filename": "image-009-7.png"}):
            assert c.get("/view", params={**params, "subfolder": pid, **bad}).status_code == 404


def test_api_key_applies_to_prompt_history_view_and_ws(cache, tmp_path):
    with client(cache, tmp_path, api_key="sekrit") as c:
        assert c.post("/prompt", json={"prompt": workflow()}).status_code == 401
        assert c.get("/history/0123456789abcdef").status_code == 401
        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/ws?clientId=me") as ws:
            ws.receive_json()
        with c.websocket_connect("/ws?clientId=me&api_key=sekrit") as ws:
            assert ws.receive_json()["type"] == "status"
        auth = {"Authorization": "Bearer sekrit"}
        r = c.post("/prompt", json={"prompt": workflow(steps=1)}, headers=auth)
        assert r.status_code == 200 and r.json()["node_errors"] == {}


def test_pag_patch_node_equals_the_v1_job_with_cfg_and_pag(cache, tmp_path):
    wf = workflow(steps=2)
    wf["2"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["4", 0], "scale": 1.5}}
    wf["3"]["inputs"]["model"] = ["2", 0]
    with client(cache, tmp_path) as c:
        pid = c.post("/prompt", json={"prompt": wf}).json()["prompt_id"]
        images = poll_history(c, pid)["outputs"]["9"]["images"]
        terms = [{"method": "cfg", "scale": 4.0}, {"method": "pag", "scale": 1.5, "layers": "mid"}]
        job = c.post("/v1/jobs?wait=true", json={**same_job_body(), "steps": 2, "guidance": terms}).json()
        assert c.get(f"/v1/jobs/{pid}").json()["request"]["guidance"][1]["method"] == "pag"
        pngs = [c.get("/view", params=i).content for i in images]
        assert pngs == [c.get(f"/v1/jobs/{job['id']}/images/{i}").content for i in range(2)]


def test_failed_prompt_sends_execution_error_and_history_error(cache, tmp_path):
    gate = Gate(cache.get("tiny-sd").model, at=2, raise_error=True)
    try:
        with client(cache, tmp_path) as c, c.websocket_connect("/ws?clientId=me") as ws:
            ws.receive_json()
            pid = c.post("/prompt", json={"prompt": workflow(), "client_id": "me"}).json()["prompt_id"]
            message = ws.receive_json()
            while message["type"] != "execution_error":
                message = ws.receive_json()
            entry = poll_history(c, pid)
    finally:
        gate.remove()
    assert message["data"]["exception_message"] == "RuntimeError: boom in the model"
    assert message["data"]["node_id"] == "3" and message["data"]["node_type"] == "KSampler"
    assert entry["outputs"] == {} and entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1] == ["execution_error", message["data"]]
