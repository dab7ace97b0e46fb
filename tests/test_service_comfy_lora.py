"""diffguide serve's ComfyUI side, continued: ``GET /history`` of every prompt (``max_items``,
``offset`` as ComfyUI's ``PromptQueue.get_history``), and workflows with ``LoraLoader`` /
``LoraLoaderModelOnly`` naming a LoRA sent to ``POST /v1/uploads``, through a ComfyUI API client's
flow (upload, ``/object_info``, ``POST /prompt``, poll ``/history``, ``/view``); results equal the
same job through ``/v1/jobs`` bit for bit."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from service_support import PROMPT, client
from test_service_comfy import poll_history, workflow

from diffguide.service.models import ModelCache, find_models


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


@pytest.fixture(scope="module")
def lora(cache, tmp_path_factory) -> Path:
    """A random LoRA (diffusers/peft keys) for the bundled model's UNet."""
    from peft import LoraConfig, get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("lora")
    gp = cache.get("tiny-sd")
    unet = copy.deepcopy(gp.pipe.unet)
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    type(gp.pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def with_lora(name: str, strength: float, model_only: bool) -> dict[str, Any]:
    """workflow() with a LoRA loader between the checkpoint and KSampler (and the text encoders)."""
    wf = workflow(steps=2)
    if model_only:
        inputs = {"model": ["4", 0], "lora_name": name, "strength_model": strength}
        wf["2"] = {"class_type": "LoraLoaderModelOnly", "inputs": inputs}
    else:
        inputs = {"model": ["4", 0], "clip": ["4", 1], "lora_name": name}
        inputs.update(strength_model=strength, strength_clip=strength)
        wf["2"] = {"class_type": "LoraLoader", "inputs": inputs}
        for nid in ("6", "7"):
            wf[nid]["inputs"]["clip"] = ["2", 1]
    wf["3"]["inputs"]["model"] = ["2", 0]
    return wf


def images_of(c, prompt_id: str) -> list[bytes]:
    entry = poll_history(c, prompt_id)
    assert entry["status"]["status_str"] == "success"
    return [c.get("/view", params=image).content for image in entry["outputs"]["9"]["images"]]


def test_lora_loaders_name_uploaded_files_and_equal_the_v1_job(cache, lora, tmp_path):
    with client(cache, tmp_path / "data") as c:
        assert c.get("/object_info/LoraLoader").json()["LoraLoader"]["input"]["required"]["lora_name"] == [
            [],
            {},
        ]
        up = c.post("/v1/uploads?kind=lora", files={"file": ("style.safetensors", lora.read_bytes())})
        assert up.status_code == 201
        lid = up.json()["id"]
        assert lid == hashlib.sha256(lora.read_bytes()).hexdigest()
        name = f"{lid}.safetensors"
        info = c.get("/object_info").json()
        for node in ("LoraLoader", "LoraLoaderModelOnly"):
            assert info[node]["input"]["required"]["lora_name"] == [[name], {}]
        runs = {}
        for model_only in (False, True):
            r = c.post("/prompt", json={"prompt": with_lora(name, 0.7, model_only), "client_id": "me"})
            assert r.status_code == 200, r.json()
            pid = r.json()["prompt_id"]
            runs[model_only] = images_of(c, pid)
            job = c.get(f"/v1/jobs/{pid}").json()
            assert job["request"]["loras"] == [
                {"file": {"upload": lid, "base64": None, "part": None}, "scale": 0.7}
            ]
        plain = c.post("/prompt", json={"prompt": workflow(steps=2)}).json()["prompt_id"]
        body = {
            "prompt": PROMPT, "negative_prompt": "blurry", "num_images": 2, "steps": 2, "width": 32,
            "height": 32, "seed": 7, "scheduler": "euler", "noise": "comfy", "schedule": "normal",
            "guidance": [{"method": "cfg", "scale": 4.0}],
            "loras": [{"file": {"upload": lid}, "scale": 0.7}],
        }  # fmt: skip
        job = c.post("/v1/jobs?wait=true", json=body).json()
        assert job["state"] == "succeeded"
        same = [c.get(f"/v1/jobs/{job['id']}/images/{i}").content for i in range(2)]
        assert runs[False] == same and runs[True] == same  # the LoRA has UNet layers only
        assert images_of(c, plain) != same  # the LoRA takes effect


BAD_NAMES = {
    "x.safetensors": "x.safetensors",
    "a path": "../" + "0" * 64 + ".safetensors",
    "an id never uploaded": "0" * 64 + ".safetensors",
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_a_lora_name_that_is_no_upload_is_a_comfyui_node_error(cache, tmp_path, case):
    name = BAD_NAMES[case]
    with client(cache, tmp_path) as c:
        r = c.post("/prompt", json={"prompt": with_lora(name, 1.0, True)})
        assert r.status_code == 400
        assert r.json()["node_errors"]["2"]["errors"][0]["message"] == (
            f"node 2 (LoraLoaderModelOnly): LoRA '{name}' is not a file uploaded to this service; "
            "send it to POST /v1/uploads?kind=lora and give lora_name '<id>.safetensors'"
        )
        assert r.json()["node_errors"]["2"]["class_type"] == "LoraLoaderModelOnly"
        assert c.get("/v1/jobs").json() == []  # nothing was queued


def test_history_lists_every_ended_prompt_with_max_items_and_offset(cache, tmp_path):
    with client(cache, tmp_path) as c:
        assert c.get("/history").json() == {}
        ids = []
        for seed in (1, 2, 3):
            ids.append(c.post("/prompt", json={"prompt": workflow(steps=1, seed=seed)}).json()["prompt_id"])
            poll_history(c, ids[-1])
        c.post("/v1/jobs?wait=true", json={"prompt": PROMPT, "steps": 1, "width": 32, "height": 32})
        everything = c.get("/history").json()
        assert list(everything) == ids  # in the order they ended; the /v1/jobs job is not a prompt
        for pid in ids:
            assert everything[pid] == c.get(f"/history/{pid}").json()[pid]
        assert list(c.get("/history", params={"max_items": 2}).json()) == ids[1:]  # the last two
        assert list(c.get("/history", params={"offset": 1}).json()) == ids[1:]
        assert list(c.get("/history", params={"offset": 0, "max_items": 1}).json()) == ids[:1]
        assert c.get("/history", params={"max_items": 0}).json() == {}
        assert c.get("/history", params={"max_items": 9}).json() == everything
        bad = c.get("/history", params={"max_items": "two"})
        assert bad.status_code == 422 and bad.json() == {
            "error": "query.max_items: Input should be a valid integer, unable to parse string as an integer"
        }
        assert c.get("/history", params={"max_items": -1}).status_code == 422
