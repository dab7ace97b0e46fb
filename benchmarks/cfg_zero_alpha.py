"""CFG-Zero*'s optimized scale alpha = <c, u> / |u|^2 per image and step, on a bundled model.

The figure behind docs/tiny-sd3.md ("alpha is 0.97-0.99 at most steps"): sample with plain CFG and
read each step's conditional and unconditional predictions from the engine's callback, then apply
CFG-Zero*'s own ``optimized_scale`` to them. One image per prompt, the benchmark's 20 Euler steps.

    python benchmarks/cfg_zero_alpha.py                  # tiny-sd3, 4 prompts, CFG 3
    python benchmarks/cfg_zero_alpha.py --model tiny-sd  # the epsilon model
"""

from __future__ import annotations

import argparse

import torch

from diffguide import CFG, GuidedPipeline
from diffguide.guidance.cfg_zero_star import optimized_scale
from diffguide.sampling.loop import StepState

PROMPTS = ["a handwritten digit 3", "a photo of a dress", "a handwritten digit 8", "a photo of a sneaker"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[tuple[int, float, list[float]]] = []

    def record(state: StepState) -> None:
        alpha = optimized_scale(state.preds["cond"], state.preds["uncond"]).flatten().tolist()
        rows.append((state.step.index, state.step.sigma, alpha))

    gp = GuidedPipeline.from_pretrained(args.model)
    gp.generate(PROMPTS, "", guidance=[CFG(args.cfg)], steps=args.steps, seed=args.seed, callback=record)
    print(
        f"{args.model}, CFG {args.cfg}, {args.steps} steps, seeds {args.seed}..{args.seed + len(PROMPTS) - 1}"
    )
    for index, sigma, alpha in rows:
        print(f"step {index:2d}  sigma {sigma:7.3f}  alpha " + " ".join(f"{a:.3f}" for a in alpha))
    inner = [a for _, _, alpha in rows[:-1] for a in alpha]
    print(
        f"all but the last step: alpha {min(inner):.3f} .. {max(inner):.3f}, median {sorted(inner)[len(inner) // 2]:.3f}"
    )
    print(f"last step: alpha {min(rows[-1][2]):.3f} .. {max(rows[-1][2]):.3f}")


if __name__ == "__main__":
    main()
