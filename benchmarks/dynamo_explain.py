"""Graph breaks of the guided denoiser under ``torch.compile``: ``torch._dynamo.explain`` of one
model forward with the perturbations installed (CPU, a tiny SDXL-shaped UNet).

For each case the engine's first forward of a sampling run is explained (its rows, chunk plan and
``ctx.rows`` as the engine sets them), then the run goes on uncompiled. Cases: CFG alone (the
bare UNet), CFG+PAG(mid) and CFG+TPG(d1), each with and without prefix sharing. Printed per case: graphs,
graph breaks, and each distinct break reason (first line, with the count).

    python benchmarks/dynamo_explain.py            # about a minute per case on a loaded CPU
"""

from __future__ import annotations

import argparse
import collections
import time
import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore")

from diffguide import CFG, PAG, TPG, Conditioning, GuidedModel, UNetDenoiser  # noqa: E402
from diffguide.sampling.loop import sample  # noqa: E402
from diffguide.sampling.noise import generators  # noqa: E402
from diffguide.testing import _scheduler, sdxl_unet  # noqa: E402

CROSS, POOLED, SAMPLE = 64, 32, 16


class Explained:
    """Stands in for the engine's denoiser: explains the first call, then calls through."""

    def __init__(self, denoiser: Any) -> None:
        self.denoiser = denoiser
        self.result: Any = None

    def __getattr__(self, name: str) -> Any:  # prediction_type, model, ... of the real denoiser
        return getattr(self.denoiser, name)

    def __call__(self, *args: Any) -> Any:
        if self.result is None:
            torch._dynamo.reset()
            self.result = torch._dynamo.explain(self.denoiser)(*args)
        return self.denoiser(*args)


def explain(unet: torch.nn.Module, terms: list[Any], share: bool, batch: int) -> Any:
    g = torch.Generator().manual_seed(0)
    h = SAMPLE * 8
    ids = torch.tensor([[h, h, 0, 0, h, h]], dtype=torch.float32).repeat(batch, 1)
    cond = Conditioning(
        torch.randn(batch, 77, CROSS, generator=g), torch.randn(batch, POOLED, generator=g), ids
    )
    uncond = Conditioning(
        torch.randn(batch, 77, CROSS, generator=g), torch.randn(batch, POOLED, generator=g), ids
    )
    noise = torch.randn(batch, 4, SAMPLE, SAMPLE, generator=g)
    seeds = list(range(batch))
    guided = GuidedModel(UNetDenoiser(unet), terms, cond, uncond, seeds, prefix_sharing=share)
    probe = Explained(guided.denoiser)
    guided.denoiser = probe  # this engine instance only
    sched = _scheduler()
    sched.set_timesteps(2)
    with torch.inference_mode():
        sample(guided, sched, noise, generators(seeds))
    return probe.result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    unet = sdxl_unet(0, channels=(32, 64), layers=(1, 2), sample=SAMPLE, cross_dim=CROSS, pooled_dim=POOLED)
    cases = {
        "CFG (bare UNet)": ([CFG(5.0)], True),
        "CFG+PAG(mid), prefix sharing": ([CFG(5.0), PAG(3.0, layers="mid")], True),
        "CFG+PAG(mid), no prefix sharing": ([CFG(5.0), PAG(3.0, layers="mid")], False),
        "CFG+TPG(d1), prefix sharing": ([CFG(5.0), TPG(3.0, layers="d1")], True),
        "CFG+TPG(d1), no prefix sharing": ([CFG(5.0), TPG(3.0, layers="d1")], False),
    }
    print(f"torch {torch.__version__}; tiny SDXL-shaped UNet, batch {args.batch}, CPU")
    for label, (terms, share) in cases.items():
        t0 = time.perf_counter()
        out = explain(unet, terms, share, args.batch)
        reasons = collections.Counter(str(r.reason).splitlines()[0] for r in out.break_reasons)
        print(
            f"\n{label}: {out.graph_count} graphs, {out.graph_break_count} graph breaks "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        for reason, count in reasons.most_common():
            print(f"  {count:3d} x {reason[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
