"""Files in a job's request: conditioning (diffguide's and ComfyUI's form) and LoRAs, as multipart
parts, base64 in JSON or upload ids; results equal the CLI's / library's with the same files; bad
files refused in one line (413 / 422) with nothing kept."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file, save
from service_support import client
from typer.testing import CliRunner

from diffguide.cli.main import app as cli
from diffguide.comfy_workflow.conditioning import save_comfy_conditioning, to_diffguide
from diffguide.conditioning import ConditioningFile, save_conditioning
from diffguide.pipeline import GenerateConfig
from diffguide.service.models import ModelCache, find_models

COND_PROMPT = "a handwritten digit 2"


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(find_models((), True), 4096.0)


@pytest.fixture(scope="module")
def files(cache, tmp_path_factory) -> dict[str, Path]:
    """A conditioning file of each form, and a random LoRA for the bundled model's UNet."""
    from peft import LoraConfig, get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("files")
    gp = cache.get("tiny-sd")
    cond, uncond = gp.encode(GenerateConfig.create(COND_PROMPT, "a photo of a bag"), 32, 32)
    assert uncond is not None
    save_conditioning(folder / "cond.safetensors", cond, uncond, {"prompt": COND_PROMPT})
    save_comfy_conditioning(folder / "pos.safetensors", [[cond.embeds, {}]])
    save_comfy_conditioning(folder / "neg.safetensors", [[uncond.embeds, {}]])
    unet = copy.deepcopy(gp.pipe.unet)
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    type(gp.pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    (folder / "pytorch_lora_weights.safetensors").rename(folder / "lora.safetensors")
    torch.save({"prompt_embeds": cond.embeds}, folder / "cond.pt")
    return {p.stem + p.suffix.replace(".safetensors", ""): p for p in folder.iterdir()}


def rgb(data: bytes | Path) -> torch.Tensor:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return torch.tensor(list(im.convert("RGB").getdata()))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def multipart(c, request: dict, parts: dict[str, Path], wait: bool = True):
    import json

    files = {"request": (None, json.dumps(request), "application/json")}
    files.update({name: (p.name, p.read_bytes(), "application/octet-stream") for name, p in parts.items()})
    return c.post("/v1/jobs" + ("?wait=true" if wait else ""), files=files)


def test_conditioning_and_lora_uploads_equal_the_cli_bit_for_bit(cache, files, tmp_path):
    args = ["--conditioning", str(files["cond"]), "--lora", f"{files['lora']}:0.7", "--steps", "3",
            "--seed", "5", "--cfg", "4", "--pag", "1.5", "--threads", "1"]  # fmt: skip
    res = CliRunner().invoke(cli, ["generate", *args, "--save-latents", "-q", "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    stem = tmp_path / "cli" / "diffguide-000-5"
    body = {
        "conditioning": {"part": "cond"},
        "loras": [{"file": {"part": "style"}, "scale": 0.7}],
        "steps": 3,
        "seed": 5,
        "guidance": [{"method": "cfg", "scale": 4}, {"method": "pag", "scale": 1.5}],
    }
    with client(cache, tmp_path / "svc") as c:
        r = multipart(c, body, {"cond": files["cond"], "style": files["lora"]})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["state"] == "succeeded", job
        assert job["request"]["conditioning"]["upload"] == sha(files["cond"])
        assert job["request"]["loras"][0]["file"]["upload"] == sha(files["lora"])
        latents = load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"]
        assert torch.equal(latents, load_file(f"{stem}.safetensors")["latents"])
        assert torch.equal(rgb(c.get(f"/v1/jobs/{job['id']}/images/0").content), rgb(Path(f"{stem}.png")))
        manifest = c.get(f"/v1/jobs/{job['id']}/manifest").json()[0]
        assert manifest["image"]["prompt"] == COND_PROMPT
        assert manifest["conditioning"]["source"] == "file"
        assert [lo["sha256"] for lo in manifest["model"]["loras"]] == [
            lo["sha256"] for lo in _cli_manifest(stem)["model"]["loras"]
        ]
        stored = sorted(p.name for p in (tmp_path / "svc" / "uploads").iterdir())
        assert stored == sorted(f"{sha(files[k])}.safetensors" for k in ("cond", "lora"))
        # the same files by upload id (JSON), and base64 in JSON: the same job, the same result
        ids = {"conditioning": {"upload": sha(files["cond"])}}
        lora = [{"file": {"base64": b64(files["lora"])}, "scale": 0.7}]
        again = c.post("/v1/jobs?wait=true", json={**body, **ids, "loras": lora}).json()
        assert torch.equal(load(c.get(f"/v1/jobs/{again['id']}/latents").content)["latents"], latents)
        assert len(list((tmp_path / "svc" / "uploads").iterdir())) == 2  # stored once, by content
        # a LoRA at another scale is another model in the cache; the plain model is untouched
        held = [m["name"] for m in c.get("/v1/models").json()["cache"]["loaded"]]
        assert f"tiny-sd+lora:{sha(files['lora'])}@0.7" in held and "tiny-sd" in held


def _cli_manifest(stem: Path) -> dict:
    import json

    return json.loads(Path(f"{stem}.json").read_text())


def test_uploads_endpoint_and_comfy_form_conditioning_equal_the_library(cache, files, tmp_path):
    with client(cache, tmp_path) as c:
        pos = c.post(
            "/v1/uploads?kind=conditioning", files={"file": ("p.safetensors", files["pos"].read_bytes())}
        )
        assert (pos.status_code, pos.json()) == (
            201,
            {"id": sha(files["pos"]), "bytes": files["pos"].stat().st_size, "kind": "conditioning"},
        )
        body = {
            "conditioning": {"upload": pos.json()["id"]},
            "negative_conditioning": {"base64": b64(files["neg"])},
            "num_images": 2,
            "steps": 3,
            "seed": 2,
        }
        job = c.post("/v1/jobs?wait=true", json=body).json()
        assert job["state"] == "succeeded", job
        latents = load(c.get(f"/v1/jobs/{job['id']}/latents").content)["latents"]
    from diffguide.comfy_workflow.conditioning import load_comfy_conditioning

    cond = ConditioningFile(
        to_diffguide(load_comfy_conditioning(files["pos"])[0], "p"),
        to_diffguide(load_comfy_conditioning(files["neg"])[0], "n"),
    )
    cfg = GenerateConfig.create("<conditioning file>", num_images=2, steps=3, seed=2)
    assert torch.equal(latents, cache.get("tiny-sd").generate(cfg, conditioning=cond).latents)


def _bad(tmp_path: Path) -> dict[str, Path]:
    out = {"text": tmp_path / "notes.txt", "keys": tmp_path / "keys.safetensors"}
    out["text"].write_text("hello, not tensors")
    out["keys"].write_bytes(save({"x": torch.zeros(2)}))
    return out


def test_bad_files_are_refused_in_one_line_and_nothing_is_kept(cache, files, tmp_path):
    bad = _bad(tmp_path)
    lora = {"loras": [{"file": {"part": "lora"}}]}
    cases = [
        (
            {"conditioning": {"part": "c"}},
            {"c": files["cond.pt"]},
            "conditioning is a pickle (torch.save / .pt / .ckpt), which can run code when loaded: the "
            "service reads only safetensors; send a .safetensors file instead "
            "(safetensors.torch.save_file(dict_of_tensors, path))",
        ),
        (
            {**lora, "conditioning": {"part": "c"}},
            {"c": bad["text"], "lora": files["lora"]},
            "conditioning is not a safetensors file (",
        ),
        (
            {**lora, "conditioning": {"part": "c"}},
            {"c": bad["keys"], "lora": files["lora"]},
            "conditioning: 'the file': unknown conditioning keys ['x']",
        ),
        ({"conditioning": {"part": "c"}}, {}, "conditioning: the multipart body has no file part 'c'"),
        ({"prompt": "a"}, {"c": files["cond"]}, "file part(s) c are not referenced by the request"),
        (
            {"conditioning": {"part": "c"}, "negative_conditioning": {"part": "n"}},
            {"c": files["cond"], "n": files["neg"]},
            "negative_conditioning goes with a ComfyUI-form conditioning",
        ),
        ({"prompt": "a", **lora, "steps": 0}, {"lora": files["lora"]}, "steps: Input should be greater"),
    ]
    with client(cache, tmp_path / "svc") as c:
        for body, parts, message in cases:
            r = multipart(c, body, parts, wait=False)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"].startswith(message) and "\n" not in r.json()["error"], r.json()
        for body, message in [
            ({"conditioning": {"upload": "0" * 64}}, f"conditioning: no upload '{'0' * 64}'"),
            ({"conditioning": {"base64": "***"}}, "conditioning.base64 is not valid base64"),
            ({"conditioning": {"part": "c", "upload": "0" * 64}}, "conditioning: give exactly one of"),
            ({"prompt": None}, "give a prompt, or a conditioning file ('conditioning')"),
            ({"prompt": "a", "trace_modules": "mid_block"}, "trace_modules needs trace: true"),
        ]:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 422 and r.json()["error"].startswith(message), r.json()
        r = c.post("/v1/uploads", files={"file": ("c.pt", files["cond.pt"].read_bytes())})
        assert r.status_code == 422 and r.json()["error"].startswith("the file (safetensors) is a pickle")
        r = c.post("/v1/uploads?kind=conditioning", files={"file": ("k", bad["keys"].read_bytes())})
        assert r.json()["error"].startswith("the file (conditioning): 'the file': unknown conditioning keys")
        assert c.post("/v1/uploads", json={}).json() == {
            "error": "send multipart/form-data with the part(s) file"
        }
        assert c.get("/v1/jobs").json() == []
        assert [p.name for p in (tmp_path / "svc" / "uploads").iterdir()] == []  # nothing half-written
        # a LoRA that fits no layer of the model: the job fails in one line
        job = multipart(
            c, {"prompt": "a", "steps": 1, "loras": [{"file": {"part": "k"}}]}, {"k": bad["keys"]}
        )
        assert job.json()["state"] == "failed"
        assert "LoRA '" in job.json()["error"] and "\n" not in job.json()["error"]


def test_size_limits_are_413(cache, files, tmp_path):
    with client(cache, tmp_path, max_request_bytes=4096, max_upload_bytes=8192) as c:
        big = {"c": files["lora"]}  # larger than 8 KiB
        assert files["lora"].stat().st_size > 8192
        r = multipart(c, {"conditioning": {"part": "c"}}, big, wait=False)
        assert (r.status_code, r.json()) == (413, {"error": "request body larger than 8192 bytes"})
        r = c.post("/v1/jobs", json={"conditioning": {"base64": b64(files["lora"])}})
        assert (r.status_code, r.json()) == (413, {"error": "request body larger than 4096 bytes"})
    with client(cache, tmp_path, max_upload_bytes=2048) as c:
        r = c.post("/v1/jobs", json={"conditioning": {"base64": b64(files["cond"])}})
        size = files["cond"].stat().st_size
        assert (r.status_code, r.json()) == (
            413,
            {"error": f"conditioning is {size} bytes, more than the upload limit (2048 bytes)"},
        )
        assert c.get("/v1/jobs").json() == [] and list(tmp_path.rglob("*.safetensors")) == []


def test_openapi_documents_the_job_body_with_its_file_fields(cache, tmp_path):
    with client(cache, tmp_path) as c:
        spec = c.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    assert "request" in body["multipart/form-data"]["schema"]["properties"]
    job = spec["components"]["schemas"]["JobRequest"]["properties"]
    assert {"conditioning", "negative_conditioning", "loras", "trace", "vae_preview_every"} <= set(job)
    assert set(spec["components"]["schemas"]["FileRef"]["properties"]) == {"upload", "base64", "part"}
    assert "/v1/uploads" in spec["paths"] and "/v1/jobs/{job_id}/trace" in spec["paths"]
