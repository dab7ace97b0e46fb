"""What batch-invariant mode costs: a batch of B images sampled as one batch vs image by image.

Side by side in one run, interleaved round by round (the machine is noisy): the default batched
run (one forward per step over all B images' branches) and ``batch_invariant=True`` (one forward
per image per step, each image bit-identical to its seed alone). Prints per-run medians and the
ratio invariant / batched; docs/performance.md quotes it.

    python benchmarks/batch_invariant_cost.py                       # bundled model, B = 4, 20 steps
    python benchmarks/batch_invariant_cost.py --model sdxl-bench     # the SDXL-shaped benchmark UNet
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

from diffguide import CFG, PAG, TPG, GuidedPipeline, testing


def _pipe(name: str) -> GuidedPipeline:
    if name == "default":
        return GuidedPipeline.from_pretrained(Path(str(resources.files("diffguide") / "assets" / "tiny-sd")))
    pipe = testing.tiny_sdxl(seed=0)
    pipe.unet = testing.sdxl_unet(seed=0, channels=(64, 128, 256), layers=(1, 2, 4), sample=32)
    return GuidedPipeline(pipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["default", "sdxl-bench"], default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = _pipe(args.model)
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch)]
    settings = {
        "CFG": [CFG(4.0)],
        "CFG+PAG": [CFG(4.0), PAG(1.5)],
        "CFG+PAG+TPG": [CFG(4.0), PAG(1.5), TPG(1.0)],
    }
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, terms in settings.items():
            for invariant in (False, True):
                t0 = time.perf_counter()
                pipe.generate(prompts, guidance=terms, steps=args.steps, seed=0, decode=False,
                              batch_invariant=invariant)  # fmt: skip
                if r:
                    times.setdefault((name, invariant), []).append(time.perf_counter() - t0)
    print(f"model {args.model}, B = {args.batch}, {args.steps} steps, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'guidance':12} {'batched s':>10} {'invariant s':>12} {'ratio':>7}")
    for name in settings:
        a, b = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        print(f"{name:12} {a:10.3f} {b:12.3f} {b / a:7.2f}")


if __name__ == "__main__":
    main()
