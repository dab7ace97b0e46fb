"""ComfyUI's other endpoints on diffguide serve: GET /queue, POST /queue, POST /interrupt (and
execution_interrupted), GET /object_info (inputs and outputs as ComfyUI's own nodes declare them),
POST /upload/image (+ /view of the upload)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from service_support import Gate, client, wait_state
from test_service_comfy import poll_history, workflow

from diffguide.comfy_workflow.translate import SAMPLERS
from diffguide.service.comfy_info import served_nodes
from diffguide.service.models import ModelCache, find_models


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


def test_queue_and_interrupt_in_comfyuis_shapes(cache, tmp_path):
    gate = Gate(cache.get("tiny-sd").model, at=2)
    try:
        with client(cache, tmp_path) as c, c.websocket_connect("/ws?clientId=me") as ws:
            ws.receive_json()
            wf = workflow()
            running = c.post("/prompt", json={"prompt": wf, "client_id": "me"}).json()["prompt_id"]
            assert gate.reached.wait(60)
            waiting = c.post("/prompt", json={"prompt": workflow(seed=8)}).json()["prompt_id"]
            other = c.post("/prompt", json={"prompt": workflow(seed=9)}).json()["prompt_id"]
            v1 = c.post("/v1/jobs", json={"prompt": "a", "steps": 1}).json()["id"]
            q = c.get("/queue").json()
            assert q["queue_running"] == [[1, running, wf, {"client_id": "me"}, ["9"]]]
            assert [item[1] for item in q["queue_pending"]] == [waiting, other]  # /v1 jobs not listed
            assert c.post("/queue", json={"delete": [other, v1]}).status_code == 200
            assert c.get(f"/v1/jobs/{other}").json()["state"] == "cancelled"
            assert c.post("/interrupt", json={"prompt_id": waiting}).status_code == 200  # not running
            assert c.post("/interrupt").status_code == 200  # the running prompt
            gate.opened.set()
            assert wait_state(c, running, ("cancelled",))["state"] == "cancelled"
            message = ws.receive_json()
            while message["type"] != "execution_interrupted":
                message = ws.receive_json()
            data = message["data"]
            assert {k: data[k] for k in ("prompt_id", "node_id", "node_type", "executed")} == {
                "prompt_id": running,
                "node_id": "3",
                "node_type": "KSampler",
                "executed": [],
            }
            entry = poll_history(c, running)
            assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
            assert entry["status"]["messages"][-1][0] == "execution_interrupted"
            assert poll_history(c, waiting)["status"]["status_str"] == "success"
            assert wait_state(c, v1, ("succeeded",))["state"] == "succeeded"  # /v1 jobs untouched
            assert c.post("/queue", json={"clear": True}).status_code == 200
            assert c.get("/queue").json() == {"queue_running": [], "queue_pending": []}
            assert c.post("/queue", content=b"[1]").json() == {"error": "the body must be a JSON object"}
    finally:
        gate.remove()


def test_object_info_lists_the_served_nodes_as_comfyui_declares_them(cache, tmp_path):
    with client(cache, tmp_path) as c:
        info = c.get("/object_info").json()
        ks = c.get("/object_info/KSampler").json()
        assert c.get("/object_info/UNETLoader").json() == {}
    assert sorted(info) == sorted(served_nodes())
    assert "LoraLoader" in info and "UNETLoader" not in info and "ModelSamplingSD3" not in info
    assert ks == {"KSampler": info["KSampler"]}
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] == [["tiny-sd.safetensors"], {}]
    sampler = info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert sampler == list(SAMPLERS) and "euler" in sampler
    assert info["SaveImage"]["output_node"] and not info["KSampler"]["output_node"]


def test_object_info_inputs_and_outputs_are_comfyuis_own(cache, tmp_path):
    with client(cache, tmp_path) as c:
        info = c.get("/object_info").json()
    ours = {k: v for k, v in info.items() if k != "FluxGuidance"}  # comfy_extras.nodes_flux: not loaded
    theirs = _comfy_node_info(list(ours))
    for name, node in ours.items():
        assert node["input_order"] == theirs[name]["input_order"], name
        assert node["output"] == list(theirs[name]["output"]), name
        for key, spec in node["input"]["required"].items():
            real = theirs[name]["input"]["required"][key][0]
            if isinstance(spec[0], list):  # a choice: only values ComfyUI's node offers too
                if key not in ("ckpt_name", "lora_name"):  # the service's models and uploads
                    assert set(spec[0]) <= set(real), (name, key)
            else:
                assert spec[0] == str(real), (name, key)


def _comfy_node_info(names: list[str]) -> dict[str, Any]:
    """ComfyUI's own node_info (server.py's) for ``names``: inputs without 'hidden', outputs."""
    import comfy_support
    from comfy_workflow_support import load_comfy_nodes

    try:
        cn = load_comfy_nodes()
    except comfy_support.ComfyUnavailable as exc:
        if (comfy_support.COMFY_DIR / "comfy" / "samplers.py").is_file():  # installed but broken: a failure
            pytest.fail(f"ComfyUI is installed in {comfy_support.COMFY_DIR} but does not work: {exc}")
        pytest.skip(f"ComfyUI core not available: {exc}")
    out = {}
    for name in names:
        module = next(m for m in (cn.nodes, cn.cfg, cn.advanced, cn.hunyuan, cn.sd3, cn.slg, cn.pag)
                      if name in getattr(m, "NODE_CLASS_MAPPINGS", {}) or hasattr(m, name))  # fmt: skip
        cls = getattr(module, "NODE_CLASS_MAPPINGS", {}).get(name) or getattr(module, name)
        if hasattr(cls, "GET_NODE_INFO_V1"):
            info = cls.GET_NODE_INFO_V1()
        else:
            types = cls.INPUT_TYPES()
            info = {"input": types, "input_order": {k: list(v) for k, v in types.items()}}
            info["output"] = cls.RETURN_TYPES
        info["input_order"] = {k: v for k, v in info["input_order"].items() if k != "hidden"}
        out[name] = info
    return out


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_image_as_comfyui_and_view_it(cache, tmp_path):
    with client(cache, tmp_path) as c:

        def up(data: bytes, name: str = "in.png", **fields: str) -> Any:
            return c.post("/upload/image", files={"image": (name, data, "image/png")}, data=fields)

        assert up(png((255, 0, 0))).json() == {"name": "in.png", "subfolder": "", "type": "input"}
        assert up(png((255, 0, 0))).json()["name"] == "in.png"  # the same bytes: kept once
        assert up(png((0, 255, 0))).json()["name"] == "in (1).png"
        assert up(png((0, 0, 255)), overwrite="true").json()["name"] == "in.png"
        r = up(png((9, 9, 9)), subfolder="masks", type="temp")
        assert r.json() == {"name": "in.png", "subfolder": "masks", "type": "temp"}
        view = c.get("/view", params={"filename": "in.png", "subfolder": "", "type": "input"})
        assert view.status_code == 200 and view.content == png((0, 0, 255))
        assert c.get("/view", params={"filename": "in (1).png", "type": "input"}).content == png((0, 255, 0))
        assert up(b"not an image").json() == {"error": "'in.png' is not an image (PNG, JPEG, WebP, ...)"}
        assert up(png((1, 1, 1)), "../x.png").json() == {"error": "'../x.png' is not a plain file name"}
        assert up(png((1, 1, 1)), subfolder="../..").status_code == 422
        assert up(png((1, 1, 1)), type="output").json() == {
            "error": "upload type 'output' is not one of: input, temp"
        }
        assert c.post("/upload/image", files={"file": ("a.png", png((1, 1, 1)))}).status_code == 400
        assert c.get("/view", params={"filename": "../jobs.sqlite3", "type": "input"}).status_code == 404
    stored = sorted(str(p.relative_to(tmp_path / "comfy")) for p in (tmp_path / "comfy").rglob("*.png"))
    assert stored == ["input/in (1).png", "input/in.png", "temp/masks/in.png"]
