"""Per-step cost of SD3 text compaction: the 256 zero "T5" tokens (no T5) run as one, or all of them.

Side by side and interleaved (round-robin, order alternated each round), on the same model,
conditioning and initial latents, diffguide's ``GuidedModel`` with ``compaction=TextCompaction()``
(what ``compact_text=True``, the default, runs) and without (``--no-compact-text``), Euler flow
steps at fixed sigmas:

* ``tiny-sd3``: the bundled model (16 image tokens, 77 CLIP + 256 zero tokens), CFG 4 at B = 1 and
  4, and CFG 4 + PAG 2 (diagonal, block 1) at B = 4;
* ``sd3-shaped``: a random ``SD3Transformer2DModel`` with SD3-medium's per-block shape (24 heads x
  64 = 1536 wide, ``joint_attention_dim`` 4096, 16 latent channels, patch 2) but ``--sd3-layers``
  blocks (default 1; the ratio barely depends on depth), at ``--sd3-size`` pixels (default 512:
  1024 image tokens; 1024: 4096), CFG 4 at B = 1, text = 77 random "CLIP" tokens + 256 zeros.

Reported: median per-step wall time of each side and the median over rounds of the same-round
ratio (every token / compacted); the final latents' max abs difference (a sanity line).

    python benchmarks/compact_text.py                    # 1 thread, 4 steps, 5 rounds
    python benchmarks/compact_text.py --quick            # seconds: tiny-sd3 B = 1 only, 2 rounds
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from diffguide import CFG, PAG, Conditioning, GenerateConfig, GuidedModel, GuidedPipeline
from diffguide.guidance.base import StepInfo
from diffguide.models.denoiser import FamilyDenoiser
from diffguide.models.families.sd3 import SD3Family
from diffguide.models.families.sd3_compact import TextCompaction

PROMPTS = ["a handwritten digit 4", "a photo of a sneaker", "a handwritten digit 7", "a photo of a bag"]


def sampler(
    model: torch.nn.Module, terms: list[Any], cond: Conditioning, uncond: Conditioning, noise: torch.Tensor
) -> Callable[[bool, int], tuple[float, torch.Tensor]]:
    """A function (compact, steps) -> (mean seconds per step, final latents)."""
    denoiser = FamilyDenoiser(SD3Family(), model, "flow")
    seeds = list(range(noise.shape[0]))

    def run(compact: bool, steps: int) -> tuple[float, torch.Tensor]:
        guided = GuidedModel(
            denoiser, terms, cond, uncond, seeds, compaction=TextCompaction() if compact else None
        )
        sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        x = noise.clone()
        with guided.installed(), torch.inference_mode():
            started = time.perf_counter()
            for i in range(steps):
                step = StepInfo(i, steps, sigmas[i], 1000 * sigmas[i], x=x, prediction="flow")
                v = guided(x, torch.tensor(1000 * sigmas[i]), step).guided
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            seconds = (time.perf_counter() - started) / steps
        if compact:
            assert guided.compaction is not None and guided.compaction.fallback is None
        return seconds, x

    return run


def compare(
    name: str, run: Callable[[bool, int], tuple[float, torch.Tensor]], rounds: int, steps: int
) -> dict:
    run(True, 1), run(False, 1)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    ratios = []
    out: dict[bool, torch.Tensor] = {}
    for r in range(rounds):
        for compact in (r % 2 == 0, r % 2 == 1):
            times[compact].append(run(compact, steps)[0])
        ratios.append(times[False][-1] / times[True][-1])
    for compact in (True, False):
        out[compact] = run(compact, steps)[1]
    row = {
        "setting": name,
        "every_token_ms": 1e3 * statistics.median(times[False]),
        "compacted_ms": 1e3 * statistics.median(times[True]),
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
        "max_abs_diff": float((out[True] - out[False]).abs().max()),
    }
    print(
        f"{name:34s} every token {row['every_token_ms']:8.2f} ms/step  compacted {row['compacted_ms']:8.2f} ms/step  "
        f"ratio {row['ratio']:.2f}x ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})  "
        f"latents max diff {row['max_abs_diff']:.1e}",
        flush=True,
    )
    return row


def tiny_sd3(rounds: int, steps: int, quick: bool) -> list[dict]:
    gp = GuidedPipeline.from_pretrained("tiny-sd3", device="cpu")
    rows = []
    settings = [("CFG", [CFG(4.0)], 1)] if quick else [
        ("CFG", [CFG(4.0)], 1), ("CFG", [CFG(4.0)], 4), ("CFG + PAG", [CFG(4.0), PAG(2.0, layers="b1")], 4)
    ]  # fmt: skip
    for label, terms, batch in settings:
        cond, uncond = gp.encode(GenerateConfig.create(PROMPTS[:batch], guidance=terms), 32, 32)
        assert uncond is not None
        noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        run = sampler(gp.pipe.transformer, terms, cond, uncond, noise)
        rows.append(compare(f"tiny-sd3 {label}, B={batch}", run, rounds, steps))
    return rows


def sd3_shaped(rounds: int, steps: int, layers: int, size: int) -> dict:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=size // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
    ).eval()  # fmt: skip
    for p in model.parameters():  # zero-initialised output layers would make the check vacuous
        if p.abs().max() == 0:
            p.data.normal_(0, 0.02)

    def embeds(seed: int) -> Conditioning:
        g = torch.Generator().manual_seed(seed)
        clip = torch.randn(1, 77, 4096, generator=g)
        clip[..., 2048:] = 0.0  # CLIP-L + CLIP-G: 2048 features, zero-padded to T5's 4096 as in diffusers
        return Conditioning(
            torch.cat([clip, torch.zeros(1, 256, 4096)], 1), torch.randn(1, 2048, generator=g)
        )

    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    run = sampler(model, [CFG(4.0)], embeds(2), embeds(3), noise)
    tokens = (size // 16) ** 2
    return compare(f"SD3-shaped {layers} blocks, {tokens} img tok, B=1", run, rounds, steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sd3-layers", type=int, default=1)
    ap.add_argument("--sd3-size", type=int, default=512)
    ap.add_argument("--no-sd3", action="store_true", help="tiny-sd3 only")
    ap.add_argument("--quick", action="store_true", help="tiny-sd3 CFG B=1, 2 rounds, 2 steps")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rounds, steps = (2, 2) if a.quick else (a.rounds, a.steps)
    print(f"torch {torch.__version__}, {a.threads} thread(s), {steps} steps, {rounds} rounds", flush=True)
    tiny_sd3(rounds, steps, a.quick)
    if not (a.quick or a.no_sd3):
        sd3_shaped(max(2, rounds // 2), 2, a.sd3_layers, a.sd3_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
