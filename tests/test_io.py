"""diffguide.io: file names, PNG chunks, sidecars, latents, no-overwrite and atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from diffguide import io
from diffguide.errors import DiffguideError
from diffguide.io import a1111_parameters, load_latents, read_manifest, save_result
from diffguide.pipeline import GenerationResult


def manifest(index: int, seed: int, prompt: str = "a cat", negative: str = "blurry") -> dict:
    return {
        "diffguide_manifest": 1,
        "model": {"source": "/models/tiny-sd", "hashes": {"unet": "abc123", "vae": "def456"}, "loras": []},
        "parameters": {
            "steps": 3,
            "scheduler": "euler_a",
            "width": 32,
            "height": 24,
            "seed": seed - index,
            "guidance": [
                {"method": "cfg", "scale": 7.5, "rescale": 0.0},
                {"method": "pag", "scale": 3.0},
                {"method": "tpg", "scale": 2.5},
            ],
        },
        "image": {"index": index, "seed": seed, "prompt": prompt, "negative_prompt": negative},
        "environment": {"versions": {"diffguide": "0.1.0"}},
    }


def result(n: int = 2, seed: int = 7, prompt: str = "a cat") -> GenerationResult:
    images = [Image.new("RGB", (32, 24), (40 * i, 100, 200)) for i in range(n)]
    latents = torch.arange(n * 4 * 3 * 4, dtype=torch.float32).reshape(n, 4, 3, 4)
    return GenerationResult(latents, images, [manifest(i, seed + i, prompt) for i in range(n)])


def test_names_chunks_sidecars_and_latents(tmp_path):
    res = result()
    out = tmp_path / "new" / "dir"  # created
    pngs = save_result(res, out, save_latents=True)
    assert [p.name for p in pngs] == ["diffguide-000-7.png", "diffguide-001-8.png"]
    assert sorted(os.listdir(out)) == sorted(
        f"diffguide-{i:03d}-{7 + i}{ext}" for i in range(2) for ext in (".png", ".json", ".safetensors")
    )
    for i, png in enumerate(pngs):
        with Image.open(png) as im:
            assert im.size == (32, 24)
            text = dict(im.text)
        assert json.loads(text["diffguide"]) == res.manifests[i]
        assert read_manifest(png) == res.manifests[i]
        assert json.loads(png.with_suffix(".json").read_text()) == res.manifests[i]
        assert read_manifest(png.with_suffix(".json")) == res.manifests[i]
        latents, meta = load_latents(png)
        assert latents.shape == (1, 4, 3, 4)
        assert torch.equal(latents, res.latents[i : i + 1])
        assert meta == res.manifests[i]
        assert f"Seed: {7 + i}" in text["parameters"]


def test_a1111_parameters():
    text = a1111_parameters(manifest(1, 8))
    assert text == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: Euler a, CFG scale: 7.5, PAG scale: 3, TPG scale: 2.5, Seed: 8, Size: 32x24, "
        "Model hash: abc123, Model: tiny-sd, Version: diffguide 0.1.0"
    )
    m = manifest(0, 1, negative="")
    m["parameters"]["guidance"] = []  # no CFG term: CFG scale 1 (off); no negative line
    assert a1111_parameters(m).startswith("a cat\nSteps: 3, Sampler: Euler a, CFG scale: 1, Seed: 1,")


def test_never_overwrites(tmp_path):
    first = save_result(result(), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    second = save_result(result(), tmp_path)
    assert [p.name for p in second] == ["diffguide-000-7_1.png", "diffguide-001-8_1.png"]
    third = save_result(result(), tmp_path, save_latents=True)
    assert [p.name for p in third] == ["diffguide-000-7_2.png", "diffguide-001-8_2.png"]
    assert third[0].with_suffix(".safetensors").exists()
    assert {p: p.read_bytes() for p in before} == before and first[0].exists()
    # a stem counts as taken when ANY of its files exists: all files of one image share a stem
    (tmp_path / "x-000-0_1.json").write_text("{}")
    res = result(1, seed=0)
    assert save_result(res, tmp_path, prefix="x")[0].name == "x-000-0.png"
    assert save_result(res, tmp_path, prefix="x")[0].name == "x-000-0_2.png"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io, "_png_bytes", boom)
    with pytest.raises(RuntimeError):
        save_result(result(), tmp_path, save_latents=True)
    assert list(tmp_path.iterdir()) == []


def test_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    save_result(result(1), tmp_path)
    pngs = save_result(result(1), tmp_path)
    assert pngs[0].name == "diffguide-000-7_1.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "diffguide-000-7.json",
        "diffguide-000-7.png",
        "diffguide-000-7_1.json",
        "diffguide-000-7_1.png",
    ]


def test_unicode_prompt_roundtrip(tmp_path):
    res = result(1, prompt="chat noir 黒猫 — ünïcödé")
    png = save_result(res, tmp_path)[0]
    assert read_manifest(png)["image"]["prompt"] == "chat noir 黒猫 — ünïcödé"
    with Image.open(png) as im:
        assert im.text["parameters"].startswith("chat noir 黒猫")


def test_read_manifest_errors(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(DiffguideError, match="no diffguide manifest"):
        read_manifest(plain)
    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    with pytest.raises(DiffguideError, match="not a PNG"):
        read_manifest(jpg)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DiffguideError, match="not an image"):
        read_manifest(junk)
    with pytest.raises(DiffguideError, match="does not exist"):
        read_manifest(tmp_path / "missing.png")


def test_bad_inputs(tmp_path):
    with pytest.raises(DiffguideError, match="prefix"):
        save_result(result(), tmp_path, prefix="../evil")
    res = result()
    res.images = []
    with pytest.raises(DiffguideError, match="no decoded images"):
        save_result(res, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(DiffguideError, match="not a folder"):
        save_result(result(), tmp_path / "file")


def test_replace_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    from diffguide.io import replace_atomic

    target = tmp_path / "results.json"
    replace_atomic(target, '{"n": 1}')
    replace_atomic(target, b'{"n": 2}')
    assert target.read_text() == '{"n": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
