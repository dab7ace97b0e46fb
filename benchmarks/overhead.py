"""Where diffguide's step time goes beyond the bare forward (companion of step_cost.py).

Three measurements on the same random SDXL-shaped UNet as ``step_cost.py``:

1. step vs forward, paired: ``GuidedModel(x, t, step)`` and one bare forward on the same k*B
   rows, called alternately in one loop (so both see the same machine load); the median over
   pairs of guided / bare, for wall and process CPU time.
2. attribution (cProfile, process CPU time): the CPU time per step spent in diffguide's own Python (engine, terms,
   perturbation wrappers and hooks) and in the torch calls it makes directly (row cat/split,
   randperm, gather, the identity-attention projections); everything else is the UNet.
3. the per-row split in one perturbed self-attention layer (mid block, 3B rows of 64 tokens):
   the layer's own processor on all 3B rows, diffguide's row wrapper (own processor on 2B rows +
   identity attention on B rows), diffusers' ``PAGCFGIdentitySelfAttnProcessor2_0``, alternated;
   and the TPG hook (row split, B permutations, gather, re-assembly) on the 4B rows entering a
   down_blocks.2 transformer block.
4. diffguide CFG+PAG step vs diffusers' PAG pipeline step, paired: the pipeline's per-step
   work (a forward on [u, c, c] rows of a copy of the UNet carrying diffusers'
   ``PAGCFGIdentitySelfAttnProcessor2_0`` on the mid block, then ``u + w (c - u) + s (c - p)``)
   alternated call by call with ``GuidedModel(x, t, step)``; median of per-pair ratios.

    python benchmarks/overhead.py [--threads 2] [--batches 1,4] [--pairs 8] [--parts 1,3,4]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import cProfile
import pstats
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

warnings.filterwarnings("ignore")

from diffusers.models.attention_processor import (  # noqa: E402
    AttnProcessor2_0,
    PAGCFGIdentitySelfAttnProcessor2_0,
)
from step_cost import FULL, conditioning  # noqa: E402

from diffguide import CFG, PAG, TPG, Conditioning, GuidedModel, UNetDenoiser  # noqa: E402
from diffguide.guidance.base import StepInfo  # noqa: E402
from diffguide.perturb.base import BranchRows, ForwardContext  # noqa: E402
from diffguide.perturb.identity_attention import _RowIdentityProcessor  # noqa: E402
from diffguide.perturb.token_shuffle import TokenShuffle  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/src/diffguide"


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def alternate(fns: dict[str, Callable[[], Any]], n: int) -> dict[str, dict[str, list[float]]]:
    """Call every fn once per iteration, n iterations (after one warm-up); wall and cpu per call."""
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for i in range(n + 1):
        for k, fn in fns.items():
            w0, c0 = clocks()
            fn()
            w1, c1 = clocks()
            if i:
                out[k]["wall"].append(w1 - w0)
                out[k]["cpu"].append(c1 - c0)
    return out


def med_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def own_time(profile: cProfile.Profile) -> float:
    """Seconds spent in diffguide's functions plus builtins called directly from them."""
    st = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = 0.0
    for (path, _, _), (_, _, tt, _, callers) in st.items():
        if path.startswith(SRC):
            total += tt
        elif path == "~":  # a builtin: count the share called from diffguide code
            total += sum(v[2] for (cpath, _, _), v in callers.items() if cpath.startswith(SRC))
    return total


def guided_model(unet: Any, c: dict[str, torch.Tensor], terms: list[Any]) -> GuidedModel:
    cond = Conditioning(c["pe"], c["pp"], c["ids"])
    uncond = Conditioning(c["ne"], c["np"], c["ids"])
    return GuidedModel(UNetDenoiser(unet), terms, cond, uncond, list(range(c["pe"].shape[0])))


def steps_vs_forward(unet: Any, batches: list[int], pairs: int) -> None:
    print(
        "\n1-2. guided step vs bare forward on the same rows (paired), and diffguide-owned CPU time per step"
    )
    print(
        f"{'terms':16s} {'B':>2s} {'rows':>4s} {'bare ms':>9s} {'step/bare wall':>15s} {'cpu':>7s}"
        f" {'own ms/step':>12s} {'own %':>6s}"
    )
    step = StepInfo(1, 10, 5.0, 500.0)
    t = torch.tensor(500.0)
    for b in batches:
        c = conditioning(FULL, b)
        for name, terms in (
            ("CFG", [CFG(5.0)]),
            ("CFG+PAG", [CFG(5.0), PAG(3.0)]),
            ("CFG+PAG+TPG", [CFG(5.0), PAG(3.0), TPG(3.0)]),
        ):
            k = len(terms) + 1
            g = guided_model(unet, c, terms)
            x = torch.cat([c["noise"]] * k)
            ehs = torch.cat([c["ne"]] + [c["pe"]] * (k - 1))
            added = {
                "text_embeds": torch.cat([c["np"]] + [c["pp"]] * (k - 1)),
                "time_ids": c["ids"].repeat(k, 1),
            }
            with g.installed(), torch.inference_mode():
                r = alternate(
                    {
                        "guided": lambda g=g, x0=c["noise"]: g(x0, t, step),
                        "bare": lambda x=x, ehs=ehs, added=added: unet(
                            x, t, encoder_hidden_states=ehs, added_cond_kwargs=added
                        ),
                    },
                    pairs,
                )
                # CPU-time profile: a preemption must not be charged to the call it interrupts
                prof = cProfile.Profile(time.process_time)
                c0 = time.process_time()
                prof.enable()
                for _ in range(3):
                    g(c["noise"], t, step)
                prof.disable()
                per_step = (time.process_time() - c0) / 3
            own = own_time(prof) / 3
            print(
                f"{name:16s} {b:2d} {k * b:4d} {statistics.median(r['bare']['wall']) * 1e3:9.1f} "
                f"{med_ratio(r['guided']['wall'], r['bare']['wall']):14.3f}x "
                f"{med_ratio(r['guided']['cpu'], r['bare']['cpu']):6.3f}x {own * 1e3:12.2f} {own / per_step * 100:5.2f}%"
            )


def attention_split(unet: Any, batches: list[int], iters: int) -> None:
    print("\n3. one mid-block self-attention on 3B rows (PAG rows last), and the TPG hook on 4B rows")
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    tokens = (FULL.sample // 4) ** 2
    ch = FULL.channels[-1]
    own, pag_proc = AttnProcessor2_0(), PAGCFGIdentitySelfAttnProcessor2_0()
    block = unet.down_blocks[2].attentions[0].transformer_blocks[0]
    print(
        f"{'B':>2s} {'own proc, 3B rows':>18s} {'diffguide split':>16s} {'diffusers PAG proc':>19s}"
        f" {'TPG hook':>9s} {'block fwd 4B':>13s}   (medians, ms, wall)"
    )
    for b in batches:
        h = torch.randn(3 * b, tokens, ch)
        ctx = ForwardContext(tuple(range(b)))
        ctx.rows = {"pag": BranchRows(slice(2 * b, 3 * b), tuple(range(b)))}
        wrapper = _RowIdentityProcessor(own, "pag", ctx)
        h4 = torch.randn(4 * b, tokens, ch)
        ctx4 = ForwardContext(tuple(range(b)))
        ctx4.rows = {"tpg": BranchRows(slice(3 * b, 4 * b), tuple(range(b)))}
        ts = TokenShuffle("down_blocks.2.attentions.0.transformer_blocks.0")
        with torch.inference_mode(), ts.install(unet, "tpg", ctx4):
            hook = next(iter(block._forward_pre_hooks.values()))
            ehs = torch.randn(4 * b, 77, FULL.cross_dim)
            r = alternate(
                {
                    "own": lambda h=h: own(attn, h),
                    "split": lambda h=h, wrapper=wrapper: wrapper(attn, h),
                    "pag": lambda h=h: pag_proc(attn, h),
                    "tpg": lambda h4=h4, hook=hook: hook(block, (h4,), {}),
                    "block": lambda h4=h4, ehs=ehs: block(h4, encoder_hidden_states=ehs),
                },
                iters,
            )
        m = {k: statistics.median(v["wall"]) * 1e3 for k, v in r.items()}
        print(
            f"{b:2d} {m['own']:18.3f} {m['split']:16.3f} {m['pag']:19.3f} {m['tpg']:9.3f} {m['block']:13.3f}"
        )


def pag_pipeline_step(unet: Any, c: dict[str, torch.Tensor], w: float, s: float) -> Callable[[], Any]:
    """What StableDiffusionXLPAGPipeline does per step with CFG: one forward on [u, c, c] rows
    with diffusers' PAG processors on the mid block's self-attention, then the combination."""
    pag_unet = copy.deepcopy(unet)
    for name, module in pag_unet.named_modules():
        if name.startswith("mid_block.") and name.endswith("attn1"):
            module.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    x = torch.cat([c["noise"]] * 3)
    ehs = torch.cat([c["ne"], c["pe"], c["pe"]])
    added = {"text_embeds": torch.cat([c["np"], c["pp"], c["pp"]]), "time_ids": c["ids"].repeat(3, 1)}
    t = torch.tensor(500.0)

    def step() -> torch.Tensor:
        u, cond, p = pag_unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample.chunk(3)
        return u + w * (cond - u) + s * (cond - p)

    return step


def versus_pag_pipeline(unet: Any, batches: list[int], pairs: int) -> None:
    print("\n4. diffguide CFG+PAG step vs diffusers' PAG pipeline step (paired; w = 5, s = 3)")
    print(
        f"{'B':>2s} {'rows':>4s} {'pipeline ms':>12s} {'diffguide/pipeline wall':>24s} {'cpu':>7s} {'max |diff|':>11s}"
    )
    step = StepInfo(1, 10, 5.0, 500.0)
    t = torch.tensor(500.0)
    for b in batches:
        c = conditioning(FULL, b)
        g = guided_model(unet, c, [CFG(5.0), PAG(3.0)])
        theirs = pag_pipeline_step(unet, c, 5.0, 3.0)
        with g.installed(), torch.inference_mode():
            diff = (g(c["noise"], t, step).guided - theirs()).abs().max().item()
            r = alternate({"diffguide": lambda g=g, x0=c["noise"]: g(x0, t, step), "pipeline": theirs}, pairs)
        print(
            f"{b:2d} {3 * b:4d} {statistics.median(r['pipeline']['wall']) * 1e3:12.1f} "
            f"{med_ratio(r['diffguide']['wall'], r['pipeline']['wall']):23.3f}x "
            f"{med_ratio(r['diffguide']['cpu'], r['pipeline']['cpu']):6.3f}x {diff:11.2e}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--pairs", type=int, default=8, help="alternations in part 1")
    ap.add_argument("--iters", type=int, default=50, help="alternations in part 3")
    ap.add_argument("--parts", default="1,3,4", help="which parts to run (2 runs with 1)")
    args = ap.parse_args()
    parts = {int(x) for x in args.parts.split(",")}
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    unet = FULL.build()
    unet.set_attn_processor(AttnProcessor2_0())
    print(
        f"model: {FULL.describe()}; threads {args.threads}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    if 1 in parts:
        steps_vs_forward(unet, batches, args.pairs)
    if 3 in parts:
        attention_split(unet, batches, args.iters)
    if 4 in parts:
        versus_pag_pipeline(unet, batches, args.pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
