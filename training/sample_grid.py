"""Sanity check: sample an exported folder with plain diffusers: tiny-sd with StableDiffusionPipeline
(Euler), tiny-sd3 with StableDiffusion3Pipeline (its FlowMatchEulerDiscreteScheduler).

    python training/sample_grid.py out.png [--model src/diffguide/assets/tiny-sd] [--n 8] [--steps 20] [--cfg 4]
    python training/sample_grid.py out.png --model src/diffguide/assets/tiny-sd3 --classify

Writes a PNG grid with one row per prompt (10 digits, then 10 garments), n samples per row.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import CAPTIONS  # noqa: E402


def load(folder: str):
    import json

    from diffusers import EulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    if (
        json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
        == "StableDiffusion3Pipeline"
    ):
        absent = dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)
        return StableDiffusion3Pipeline.from_pretrained(folder, **absent)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default=str(HERE.parent / "src" / "diffguide" / "assets" / "tiny-sd"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    ap.add_argument(
        "--classify",
        action="store_true",
        help="also report prompt accuracy with diffguide.bench's digit / garment classifiers",
    )
    args = ap.parse_args()

    from PIL import Image

    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    net = getattr(pipe, "transformer", None) or pipe.unet
    size = net.config.sample_size * pipe.vae_scale_factor
    rows, all_imgs = [], []
    t0 = time.time()
    for i, prompt in enumerate(CAPTIONS):
        g = torch.Generator().manual_seed(args.seed + i)
        imgs = pipe(
            prompt,
            num_images_per_prompt=args.n,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            generator=g,
            height=size,
            width=size,
            output_type="np",
        ).images
        rows.append(np.concatenate(list(imgs), axis=1))
        all_imgs.append(imgs)
    dt = time.time() - t0
    grid = (np.concatenate(rows, axis=0).clip(0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(grid)
    im = im.resize((im.width * args.scale, im.height * args.scale), Image.NEAREST)
    im.save(args.out)
    print(
        f"wrote {args.out}: {len(CAPTIONS)} prompts x {args.n} images, {args.steps} steps, cfg {args.cfg}; "
        f"{dt:.1f}s total, {dt / len(CAPTIONS):.2f}s per prompt batch of {args.n}"
    )
    if args.classify:
        sys.path.insert(0, str(HERE.parent / "src"))
        from diffguide.bench.classifiers import PromptClassifiers
        from diffguide.bench.reference import to_gray28

        u8 = (np.concatenate(all_imgs).clip(0, 1) * 255).round().astype(np.uint8)
        gray = to_gray28(u8)
        labels = np.repeat(np.arange(len(CAPTIONS)), args.n)
        clf = PromptClassifiers()
        print("accuracy:", clf.accuracy(gray, labels))
        per = [clf.accuracy(gray[labels == c], labels[labels == c]) for c in range(len(CAPTIONS))]
        print(
            "per prompt:",
            " ".join(
                f"{c}:{(p['digit_accuracy'] if c < 10 else p['garment_accuracy']):.2f}"
                for c, p in enumerate(per)
            ),
        )


if __name__ == "__main__":
    main()
