"""Run the node pack's example workflow in ComfyUI on the bundled tiny-sd model; save the outputs.

    python scripts/render_nodes_samples.py docs/examples/comfyui-pag-tpg-tiny-sd.json \
        docs/images/comfyui-pag-tpg-tiny-sd.png

The workflow (API format) is docs/examples/comfyui-pag-tpg-workflow.json with tiny-sd in place of
the SDXL checkpoint: CheckpointLoaderSimple -> diffguide PAG -> diffguide TPG -> KSampler. It runs
with ComfyUI's own node code (its KSampler, its samplers) and the pack's nodes, as the tests run
workflows (tests/comfy_workflow_support.py): ComfyUI's UNETLoader / checkpoint detection cannot
read a diffusers folder, so CheckpointLoaderSimple returns ComfyUI's SD1.5 UNet holding tiny-sd's
weights (tests/comfy_support.py), a CLIP that encodes with tiny-sd's text encoder, and
EmptyLatentImage uses tiny-sd's VAE factor 4 (ComfyUI's node assumes 8). The grid is decoded with
tiny-sd's VAE: one row per prompt and variant (the nodes bypassed, PAG only, PAG -> TPG), one
column per image of the batch. Needs ComfyUI (scripts/install_comfyui.sh) and Pillow.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TINY_SD = ROOT / "src" / "diffguide" / "assets" / "tiny-sd"
PROMPTS = ("a handwritten digit 3", "a handwritten digit 7", "a photo of an ankle boot")
UPSCALE = 3


def checkpoint(pipe: Any) -> tuple[Any, Any, None]:
    """ComfyUI's (MODEL, CLIP, VAE) for tiny-sd: its UNet's ComfyUI twin, a text -> CONDITIONING
    callable (the stand-in CLIPTextEncode calls it), no VAE (decoded here)."""
    from comfy_support import comfy_model_from_diffusers_unet

    def encode(text: str) -> list[list[Any]]:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(text, "cpu", 1, False)
        return [[embeds, {}]]

    return comfy_model_from_diffusers_unet(pipe.unet), encode, None


def node_standin(name: str) -> Any:
    """The pack's node ``name`` executed as ComfyUI's executor calls a legacy node."""
    from comfy_nodes_support import run_node

    from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[name]
    return lambda i: run_node(cls, i.pop("model"), **i)


def variants(wf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The workflow with both diffguide nodes bypassed, with PAG only, and as given."""
    sampler = next(k for k, v in wf.items() if v["class_type"] == "KSampler")
    pag = next(k for k, v in wf.items() if v["class_type"] == "DiffguidePAG")
    out = {}
    for label, source in (("KSampler only", pag), ("+ PAG", pag), ("+ PAG -> TPG", None)):
        v = json.loads(json.dumps(wf))
        if source is not None:
            model = wf[source]["inputs"]["model"] if label == "KSampler only" else [source, 0]
            v[sampler]["inputs"]["model"] = model
        out[label] = v
    return out


def decode(pipe: Any, samples: torch.Tensor, comfy_scale: float) -> list[Any]:
    """ComfyUI LATENT samples (model latent / its SD1.5 scale factor) -> PIL images."""
    from PIL import Image

    latent = samples * comfy_scale / pipe.vae.config.scaling_factor
    with torch.no_grad():
        images = pipe.vae.decode(latent).sample
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a).resize((a.shape[1] * UPSCALE,) * 2, Image.NEAREST) for a in arrays]


def grid(rows: list[tuple[str, list[Any]]]) -> Any:
    from PIL import Image, ImageDraw

    cell, label_w = rows[0][1][0].width, 230
    out = Image.new("RGB", (label_w + cell * len(rows[0][1]), cell * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, images) in enumerate(rows):
        for line, text in enumerate(label.split("\n")):
            draw.text((6, r * cell + cell // 2 - 14 + 14 * line), text, fill="black")
        for c, image in enumerate(images):
            out.paste(image, (label_w + c * cell, r * cell))
    return out


def main(workflow: str, out: str) -> None:
    import comfy_workflow_support as cws
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    wf = json.loads(Path(workflow).read_text())
    pipe = StableDiffusionPipeline.from_pretrained(
        TINY_SD, safety_checker=None, requires_safety_checker=False
    )
    cws.load_comfy_nodes()
    ckpt = next(v for v in wf.values() if v["class_type"] == "CheckpointLoaderSimple")["inputs"]["ckpt_name"]
    cws.CHECKPOINTS[ckpt] = model = checkpoint(pipe)
    factor = pipe.vae_scale_factor
    cws.EXTRA_NODES["EmptyLatentImage"] = lambda i: (
        {"samples": torch.zeros(i["batch_size"], 4, i["height"] // factor, i["width"] // factor)},
    )
    for name in ("DiffguidePAG", "DiffguideTPG"):
        cws.EXTRA_NODES[name] = node_standin(name)
    comfy_scale = model[0].model.latent_format.scale_factor
    rows = []
    with tempfile.TemporaryDirectory() as models:
        for prompt in PROMPTS:
            for label, variant in variants(wf).items():
                for node in variant.values():
                    if node["class_type"] == "CLIPTextEncode" and node["inputs"]["text"]:
                        node["inputs"]["text"] = prompt
                samples = cws.comfy_execute(variant, Path(models))
                rows.append((f"{prompt}\n{label}", decode(pipe, samples, comfy_scale)))
    grid(rows).save(out)
    print(
        f"wrote {out}: {len(PROMPTS)} prompts x {len(rows) // len(PROMPTS)} variants x {len(rows[0][1])} images"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2])
