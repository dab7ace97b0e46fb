"""Per-step cost of guided sampling: diffguide vs diffusers vs the bare UNet forward.

One run times, side by side and interleaved, on a random SDXL-shaped UNet (CPU, fixed thread
count), at each batch size B:

* ideal kB              one bare ``unet(...)`` forward on k*B rows: the cost floor of CFG (k=2),
                        CFG+PAG (k=3) and CFG+PAG+TPG (k=4) when every branch shares one forward;
                        k=1 gives the bound for guiders that run one forward per branch;
* diffguide CFG, CFG+PAG, CFG+PAG+TPG
                        ``GuidedModel`` + ``sampling.loop.sample`` with precomputed conditioning
                        (what ``GuidedPipeline.generate(decode=False)`` runs after encoding), with
                        prefix sharing (the default: a perturbed branch reuses the conditional rows'
                        modules before its first perturbed one; PAG on ``mid`` shares the down
                        blocks, ``mid_block.resnets.0`` and the attention's ``proj_in``);
* diffguide CFG+PAG, CFG+TPG with and without prefix sharing (``prefix_sharing=False``), side
                        by side, with the bound the modules' time shares allow (measured before
                        the rounds: each unit's and each shared sub-unit's share of a bare 3B-row
                        forward; a branch that shares modules worth a fraction f of a forward
                        saves f/3 of a three-branch step);
* diffusers SDXL CFG    ``StableDiffusionXLPipeline`` given the embeddings, output_type="latent";
* diffusers PAG pipe    ``StableDiffusionXLPAGPipeline``, pag_applied_layers=["mid"], same inputs;
* modular PAG guider    the modular SDXL denoise pipeline (``StableDiffusionXLCoreDenoiseStep``
                        built offline, ``update_components`` with the local UNet and scheduler) with
                        ``guiders.PerturbedAttentionGuidance`` on every self-attention of the mid block
                        (LayerSkipConfig, fqn "mid_block.attentions.0.transformer_blocks"), perturbed
                        window start 0, stop 1 so that every timed step runs all three branches.

All contenders share one UNet (checked clean after every run) and get the same embeddings,
time ids and initial latents; CFG 5, PAG 3, TPG 3; Euler, diffusers' scheduler config.

What is timed: every contender ends each step with exactly one ``scheduler.step`` call (the ideal
loop: with its one forward). A wrapper records ``perf_counter`` and ``process_time`` after it; a
step's time is the interval between consecutive records. Step 0 (pipeline set-up, first-call
effects, and the modular guider's step 0, which its strict ``start < step`` test never
perturbs) and everything after the loop are therefore excluded; text encoding and VAE decode
never run. Each interval is one full step: UNet forward(s), perturbation bookkeeping, guidance
combine, scheduler step and the pipeline's per-step Python.

Method: fixed thread count, one warm-up round, then ``--rounds`` rounds in which every contender
runs once (``--steps`` steps) in round-robin order, rotated each round. Reported per contender:
the median of all its step intervals; ratios are medians over rounds of the ratio of the two
contenders' mean step times in the same round (paired, so slow drifts of the machine's load
cancel). ``OMP_WAIT_POLICY`` defaults to PASSIVE: on a CPU shared with other jobs, spinning
OpenMP threads make multi-threaded timings swing by 10x (set it to ACTIVE to override).

    python benchmarks/step_cost.py                  # 2 threads, 5 steps, 4 rounds, B = 1, 4
    python benchmarks/step_cost.py --quick          # tiny model, seconds (CI smoke)
    python benchmarks/step_cost.py --json out.json  # every step time, for later analysis
    python benchmarks/step_cost.py --prefix-only    # only the prefix-sharing rows (and their rivals)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the OpenMP runtime starts (torch import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import functools
import itertools
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

warnings.filterwarnings("ignore")

import diffusers  # noqa: E402
from diffusers import StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from diffguide import CFG, PAG, TPG, Conditioning, GuidedModel, UNetDenoiser  # noqa: E402
from diffguide.models.layers import forward_path, forward_units, runs_before  # noqa: E402
from diffguide.perturb import IdentityAttention, TokenShuffle  # noqa: E402
from diffguide.sampling.loop import sample  # noqa: E402
from diffguide.sampling.noise import generators  # noqa: E402
from diffguide.testing import _scheduler, sdxl_unet  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
logging.getLogger("diffusers").setLevel(logging.ERROR)

CFG_SCALE, PAG_SCALE, TPG_SCALE = 5.0, 3.0, 3.0
VAE_SCALE = 8  # the pipelines are built without a VAE, so their vae_scale_factor is 8
TARGET_IDEAL, TARGET_PIPE, TARGET_MODULAR = 1.02, 1.03, 0.70
TARGET_SHARED_PAG = 0.90  # diffguide CFG+PAG(mid) with prefix sharing / diffusers' PAG pipeline
PREFIX_KEYS = ("ideal3", "dg_pag", "dg_pag_ns", "hf_pag", "dg_tpg1", "dg_tpg1_ns")


@dataclass(frozen=True)
class ModelConfig:
    channels: tuple[int, ...]
    layers: tuple[int, ...]
    sample: int
    cross_dim: int = 64
    pooled_dim: int = 32

    def describe(self) -> str:
        return (
            f"diffguide.testing.sdxl_unet(seed=0, channels={self.channels}, layers={self.layers}, "
            f"sample={self.sample}, cross_dim={self.cross_dim}, pooled_dim={self.pooled_dim})"
        )

    def build(self) -> Any:
        return sdxl_unet(
            0,
            channels=self.channels,
            layers=self.layers,
            sample=self.sample,
            cross_dim=self.cross_dim,
            pooled_dim=self.pooled_dim,
        )


# SDXL: block_out_channels 320/640/1280, transformer layers (-, 2, 10), 128x128 latent.
FULL = ModelConfig(channels=(64, 128, 256), layers=(1, 2, 4), sample=32)
QUICK = ModelConfig(channels=(32, 64), layers=(1, 2), sample=16)


# ---------------------------------------------------------------------------------------------
# timing


class StepClock:
    """Records perf_counter and process_time after every ``scheduler.step`` of attached schedulers."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def attach(self, scheduler: Any) -> Any:
        original = type(scheduler).step.__get__(scheduler)

        @functools.wraps(original)  # keeps the signature: pipelines inspect it for eta / generator
        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.tick()
            return out

        scheduler.step = step
        return scheduler

    @staticmethod
    def _diff(xs: list[float]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(xs)]

    def intervals(self) -> dict[str, list[float]]:
        return {"wall": self._diff(self.wall), "cpu": self._diff(self.cpu)}


@dataclass
class Contender:
    key: str  # e.g. "dg_pag_b4"
    label: str
    batch: int
    rows: int  # rows evaluated per step, all forwards together
    ideal: str | None  # key of the ideal it is compared with
    run: Callable[[StepClock], Any]
    steps: dict[str, list[float]] = field(default_factory=lambda: {"wall": [], "cpu": []})
    runs: dict[str, list[float]] = field(default_factory=lambda: {"wall": [], "cpu": []})

    def record(self, clock: StepClock) -> None:
        for name, xs in clock.intervals().items():
            self.steps[name] += xs
            self.runs[name].append(sum(xs) / len(xs))


def paired(a: Contender, b: Contender, clock: str) -> float:
    """Median over rounds of (a's mean step time) / (b's mean step time) in the same round."""
    return statistics.median(x / y for x, y in zip(a.runs[clock], b.runs[clock], strict=True))


# ---------------------------------------------------------------------------------------------
# set-up


def conditioning(cfg: ModelConfig, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    h = cfg.sample * VAE_SCALE
    return {
        "pe": torch.randn(batch, 77, cfg.cross_dim, generator=g),
        "ne": torch.randn(batch, 77, cfg.cross_dim, generator=g),
        "pp": torch.randn(batch, cfg.pooled_dim, generator=g),
        "np": torch.randn(batch, cfg.pooled_dim, generator=g),
        "ids": torch.tensor([[h, h, 0, 0, h, h]], dtype=torch.float32).repeat(batch, 1),
        "noise": torch.randn(batch, 4, cfg.sample, cfg.sample, generator=g),
    }


def check_clean(unet: torch.nn.Module) -> None:
    """Every contender must leave the shared UNet as it found it."""
    bad = {
        k: type(v).__name__ for k, v in unet.attn_processors.items() if not isinstance(v, AttnProcessor2_0)
    }
    if bad:
        raise RuntimeError(f"UNet left with foreign attention processors: {bad}")
    for name, m in unet.named_modules():
        # diffusers' HookRegistry, removing a hook, stores the bound original forward on the instance
        fwd = m.__dict__.get("forward")
        wrapped = fwd is not None and getattr(fwd, "__func__", None) is not type(m).forward
        if m._forward_pre_hooks or m._forward_hooks or wrapped:
            raise RuntimeError(f"UNet module '{name}' left with hooks")


def quiet(blocks: Any) -> None:
    """Disable the progress bars of every (nested) modular block."""
    blocks._progress_bar_config = {"disable": True}
    for sub in getattr(blocks, "sub_blocks", {}).values():
        quiet(sub)


class Runs:
    """Factories of the timed runs; each returns ``run(clock)``: one sampling run of ``steps`` steps."""

    def __init__(self, unet: torch.nn.Module, steps: int, size: int) -> None:
        self.unet, self.steps, self.size = unet, steps, size

    def ideal(self, c: dict[str, torch.Tensor], k: int) -> Callable[[StepClock], Any]:
        """``steps`` bare UNet forwards on the k*B rows [uncond, cond, cond, ...] (inputs prebuilt)."""
        x = torch.cat([c["noise"]] * k)
        ehs = torch.cat([c["ne"]] + [c["pe"]] * (k - 1)) if k > 1 else c["pe"]
        pooled = torch.cat([c["np"]] + [c["pp"]] * (k - 1)) if k > 1 else c["pp"]
        added = {"text_embeds": pooled, "time_ids": c["ids"].repeat(k, 1)}
        sched = _scheduler()
        sched.set_timesteps(self.steps)

        def run(clock: StepClock) -> Any:
            with torch.inference_mode():
                for t in sched.timesteps:
                    out = self.unet(
                        x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False
                    )
                    clock.tick()
            return out[0]

        return run

    def diffguide(
        self, c: dict[str, torch.Tensor], terms: list[Any], share: bool = True
    ) -> Callable[[StepClock], Any]:
        """GuidedModel + sampling.loop.sample, precomputed conditioning (as generate() after encode);
        ``share``: prefix sharing (GuidedModel's default) or not."""
        cond = Conditioning(c["pe"], c["pp"], c["ids"])
        uncond = Conditioning(c["ne"], c["np"], c["ids"])
        seeds = list(range(c["pe"].shape[0]))

        def run(clock: StepClock) -> Any:
            guided = GuidedModel(UNetDenoiser(self.unet), terms, cond, uncond, seeds, prefix_sharing=share)
            sched = clock.attach(_scheduler())
            sched.set_timesteps(self.steps)
            return sample(guided, sched, c["noise"], generators(seeds))

        return run

    def pipeline(self, c: dict[str, torch.Tensor], pipe: Any, **extra: Any) -> Callable[[StepClock], Any]:
        """A diffusers pipeline given the embeddings and the initial latents; no decode."""

        def run(clock: StepClock) -> Any:
            pipe.scheduler = clock.attach(_scheduler())
            return pipe(
                prompt_embeds=c["pe"],
                negative_prompt_embeds=c["ne"],
                pooled_prompt_embeds=c["pp"],
                negative_pooled_prompt_embeds=c["np"],
                latents=c["noise"],
                num_inference_steps=self.steps,
                guidance_scale=CFG_SCALE,
                height=self.size,
                width=self.size,
                output_type="latent",
                **extra,
            ).images

        return run

    def modular(self, c: dict[str, torch.Tensor], modular: Any) -> Callable[[StepClock], Any]:
        """The modular SDXL denoise pipeline (its guider is set at build time); returns latents."""

        def run(clock: StepClock) -> Any:
            modular.update_components(scheduler=clock.attach(_scheduler()))
            return modular(
                prompt_embeds=c["pe"],
                negative_prompt_embeds=c["ne"],
                pooled_prompt_embeds=c["pp"],
                negative_pooled_prompt_embeds=c["np"],
                latents=c["noise"],
                num_inference_steps=self.steps,
                height=self.size,
                width=self.size,
                output="latents",
            )

        return run


def build(
    cfg: ModelConfig, batches: list[int], steps: int, prefix_only: bool = False
) -> tuple[list[Contender], torch.nn.Module]:
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep,
    )

    unet = cfg.build()
    unet.set_attn_processor(AttnProcessor2_0())
    parts = {
        "vae": None,
        "text_encoder": None,
        "text_encoder_2": None,
        "tokenizer": None,
        "tokenizer_2": None,
    }
    sdxl = StableDiffusionXLPipeline(unet=unet, scheduler=_scheduler(), add_watermarker=False, **parts)
    pag = StableDiffusionXLPAGPipeline(
        unet=unet, scheduler=_scheduler(), add_watermarker=False, pag_applied_layers=["mid"], **parts
    )
    for p in (sdxl, pag):
        p.set_progress_bar_config(disable=True)
    mid_blocks = len(unet.mid_block.attentions[0].transformer_blocks)
    guider = PerturbedAttentionGuidance(
        guidance_scale=CFG_SCALE,
        perturbed_guidance_scale=PAG_SCALE,
        perturbed_guidance_start=0.0,
        perturbed_guidance_stop=1.0,
        perturbed_guidance_config=LayerSkipConfig(
            indices=list(range(mid_blocks)),
            fqn="mid_block.attentions.0.transformer_blocks",
            skip_attention=False,
            skip_attention_scores=True,
            skip_ff=False,
        ),
    )
    modular = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    modular.update_components(unet=unet, scheduler=_scheduler(), guider=guider)
    quiet(modular._blocks)

    runs = Runs(unet, steps, cfg.sample * VAE_SCALE)
    cfg_t, pag_t, tpg_t = CFG(CFG_SCALE), PAG(PAG_SCALE), TPG(TPG_SCALE)
    contenders: list[Contender] = []
    for b in batches:
        c = conditioning(cfg, b)
        table = [
            ("ideal1", "ideal: bare forward, 1B rows", 1, None, runs.ideal(c, 1)),
            ("ideal2", "ideal: bare forward, 2B rows", 2, None, runs.ideal(c, 2)),
            ("dg_cfg", "diffguide CFG", 2, "ideal2", runs.diffguide(c, [cfg_t])),
            ("hf_cfg", "diffusers SDXL pipeline CFG", 2, "ideal2", runs.pipeline(c, sdxl)),
            ("ideal3", "ideal: bare forward, 3B rows", 3, None, runs.ideal(c, 3)),
            ("dg_pag", "diffguide CFG+PAG", 3, "ideal3", runs.diffguide(c, [cfg_t, pag_t])),
            (
                "dg_pag_ns",
                "diffguide CFG+PAG, no sharing",
                3,
                "ideal3",
                runs.diffguide(c, [cfg_t, pag_t], False),
            ),
            ("dg_tpg1", "diffguide CFG+TPG", 3, "ideal3", runs.diffguide(c, [cfg_t, tpg_t])),
            (
                "dg_tpg1_ns",
                "diffguide CFG+TPG, no sharing",
                3,
                "ideal3",
                runs.diffguide(c, [cfg_t, tpg_t], False),
            ),
            ("hf_pag", "diffusers PAG pipeline", 3, "ideal3", runs.pipeline(c, pag, pag_scale=PAG_SCALE)),
            ("hf_mod", "diffusers modular PAG guider", 3, "ideal3", runs.modular(c, modular)),
            ("ideal4", "ideal: bare forward, 4B rows", 4, None, runs.ideal(c, 4)),
            ("dg_tpg", "diffguide CFG+PAG+TPG", 4, "ideal4", runs.diffguide(c, [cfg_t, pag_t, tpg_t])),
        ]
        for key, label, k, ideal, run in table:
            if prefix_only and key not in PREFIX_KEYS:
                continue
            contenders.append(
                Contender(f"{key}_b{b}", label, b, k * b, f"{ideal}_b{b}" if ideal else None, run)
            )
    return contenders, unet


# ---------------------------------------------------------------------------------------------
# report


def sanity(by_key: dict[str, Contender], outputs: dict[str, torch.Tensor], batch: int) -> list[str]:
    """Same computation? diffguide vs the diffusers pipelines: final latents from the same noise."""
    lines = []
    for dg, hf in (("dg_cfg", "hf_cfg"), ("dg_pag", "hf_pag")):
        a, b = outputs[f"{dg}_b{batch}"], outputs[f"{hf}_b{batch}"]
        la, lb = by_key[f"{dg}_b{batch}"].label, by_key[f"{hf}_b{batch}"].label
        lines.append(f"  B={batch}: max |latents({la}) - latents({lb})| = {float((a - b).abs().max()):.2e}")
    return lines


def report(
    clock: str, contenders: list[Contender], by_key: dict[str, Contender], batches: list[int], rounds: int
) -> dict[str, Any]:
    """Print one table and the target verdicts for one clock; return them for the JSON."""
    what = "wall time (perf_counter)" if clock == "wall" else "process CPU time (process_time, all threads)"
    print(f"\nper-step {what}")
    print(
        "  ms/step: median of all timed steps; spread: interquartile range / median; best: fastest step; "
        f"x ideal: median over {rounds} rounds of the same-round ratio"
    )
    header = f"{'contender':30s}" + "".join(
        f"| B={b}: rows  ms/step spread    best x ideal " for b in batches
    )
    print(header)
    print("-" * len(header))
    out: dict[str, Any] = {"contenders": {}, "targets": {}}
    for label in dict.fromkeys(c.label for c in contenders):
        row = f"{label:30s}"
        for b in batches:
            c = next(c for c in contenders if c.label == label and c.batch == b)
            xs = c.steps[clock]
            m = statistics.median(xs)
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [m, m, m]
            ratio = paired(c, by_key[c.ideal], clock) if c.ideal else None
            rtxt = f"{ratio:6.3f}x" if ratio is not None else "     - "
            row += f"|      {c.rows:4d} {m * 1e3:8.1f} {(q[2] - q[0]) / m * 100:5.1f}% {min(xs) * 1e3:7.1f} {rtxt} "
            out["contenders"][c.key] = {
                "median_ms": m * 1e3,
                "min_ms": min(xs) * 1e3,
                "iqr_over_median": (q[2] - q[0]) / m,
                "ratio_to_ideal": ratio,
            }
        print(row)

    def ok(v: float, limit: float) -> str:
        return "met" if v <= limit else "NOT met"

    print(
        f"targets: diffguide <= {TARGET_IDEAL}x ideal; diffguide CFG+PAG <= {TARGET_PIPE}x diffusers PAG "
        f"pipeline and <= {TARGET_MODULAR}x modular PAG guider"
    )
    for b in batches:
        k = {name: by_key[f"{name}_b{b}"] for name in ("dg_cfg", "dg_pag", "dg_tpg", "hf_pag", "hf_mod")}
        vs_pipe, vs_mod = paired(k["dg_pag"], k["hf_pag"], clock), paired(k["dg_pag"], k["hf_mod"], clock)
        ideal = {n: out["contenders"][f"{n}_b{b}"]["ratio_to_ideal"] for n in ("dg_cfg", "dg_pag", "dg_tpg")}
        worst = max(ideal.values())
        # what batching can buy against one forward per branch: ideal 3B / (3 x ideal 1B)
        bound = paired(by_key[f"ideal3_b{b}"], by_key[f"ideal1_b{b}"], clock) / 3
        mod_over = paired(k["hf_mod"], by_key[f"ideal1_b{b}"], clock) / 3
        print(
            f"  B={b}: CFG+PAG / PAG pipeline = {vs_pipe:.3f}x [{ok(vs_pipe, TARGET_PIPE)}]; "
            f"/ modular guider = {vs_mod:.3f}x [{ok(vs_mod, TARGET_MODULAR)}]; "
            f"diffguide worst = {worst:.3f}x ideal [{ok(worst, TARGET_IDEAL)}]"
        )
        print(
            f"        batching bound: ideal 3B / (3 x ideal 1B) = {bound:.3f}; "
            f"modular guider / (3 x ideal 1B) = {mod_over:.3f}"
        )
        out["targets"][f"b{b}"] = {
            "pag_vs_pipeline": vs_pipe,
            "pag_vs_modular": vs_mod,
            "diffguide_vs_ideal": ideal,
            "ideal3_over_3x_ideal1": bound,
            "modular_over_3x_ideal1": mod_over,
        }
    return out


def unit_shares(
    unet: torch.nn.Module, c: dict[str, torch.Tensor], k: int, names: list[str], reps: int = 3
) -> dict[str, float]:
    """Each module's share of a bare forward on k*B rows (median over ``reps`` forwards, wall clock):
    the units, and the modules inside a unit that a branch shares (``names``)."""
    modules = dict(unet.named_modules())
    times: dict[str, list[float]] = {u: [] for u in names}
    totals: list[float] = []
    started: dict[str, float] = {}
    handles = []
    for u in names:
        handles.append(
            modules[u].register_forward_pre_hook(
                lambda m, a, u=u: started.__setitem__(u, time.perf_counter())
            )
        )
        handles.append(
            modules[u].register_forward_hook(
                lambda m, a, o, u=u: times[u].append(time.perf_counter() - started[u])
            )
        )
    x = torch.cat([c["noise"]] * k)
    ehs = torch.cat([c["ne"]] + [c["pe"]] * (k - 1))
    added = {"text_embeds": torch.cat([c["np"]] + [c["pp"]] * (k - 1)), "time_ids": c["ids"].repeat(k, 1)}
    try:
        with torch.inference_mode():
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                unet(
                    x,
                    torch.tensor(500.0),
                    encoder_hidden_states=ehs,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                totals.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    total = statistics.median(totals[1:])
    return {u: statistics.median(times[u][1:]) / total for u in names}


def flop_shares(
    unet: torch.nn.Module, c: dict[str, torch.Tensor], k: int, names: list[str]
) -> dict[str, float]:
    """Each module's share of the floating-point operations of a bare forward on k*B rows (torch's
    FlopCounterMode; the CPU attention kernel counted as attention): the same on every run, unlike
    the time shares on a loaded machine."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k_, v, *a, out_shape=None, **kw: (
            flop_counter.sdpa_flop_count(q, k_, v)
        )
    }
    x = torch.cat([c["noise"]] * k)
    ehs = torch.cat([c["ne"]] + [c["pe"]] * (k - 1))
    added = {"text_embeds": torch.cat([c["np"]] + [c["pp"]] * (k - 1)), "time_ids": c["ids"].repeat(k, 1)}
    with (
        torch.inference_mode(),
        flop_counter.FlopCounterMode(display=False, custom_mapping=attention) as count,
    ):
        unet(x, torch.tensor(500.0), encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)
    flops = count.get_flop_counts()
    root = type(unet).__name__
    total = sum(flops["Global"].values())
    return {u: sum(flops.get(f"{root}.{u}", {}).values()) / total for u in names}


def prefix_share(unet: torch.nn.Module, shares: dict[str, float], perturbation: Any) -> tuple[str, float]:
    """(fan-out module, the share of a forward the branch shares) for ``perturbation``'s first
    module: the units before its unit, and the steps before it inside (``runs_before``)."""
    first = perturbation.first_module(unet)
    path = forward_path(unet, first) if first is not None else []
    before = runs_before(unet, first) if first is not None else []
    return (path[-1][0] if path else "-"), sum(shares[u] for u in before)


def shared_modules(unet: torch.nn.Module, perturbations: list[Any]) -> list[str]:
    """The units, then the modules inside units that the perturbations' branches share."""
    units = forward_units(unet)
    inner = {
        n: None for p in perturbations for n in runs_before(unet, p.first_module(unet)) if n not in units
    }
    return units + list(inner)


def report_prefix(
    clock: str,
    by_key: dict[str, Contender],
    batches: list[int],
    bounds: dict[int, dict[str, tuple[str, float, float]]],
) -> dict[str, Any]:
    """Prefix sharing: measured ratios next to the bound from the unit shares."""
    print(
        f"\nprefix sharing, {'wall' if clock == 'wall' else 'process CPU'} time (median over rounds of same-round ratios)"
    )
    out: dict[str, Any] = {}
    for b in batches:
        k = {n: by_key[f"{n}_b{b}"] for n in PREFIX_KEYS}
        pag_unit, f_pag, g_pag = bounds[b]["pag"]
        tpg_unit, f_tpg, g_tpg = bounds[b]["tpg"]
        rows = {  # (measured, bound from the time shares, bound from the FLOP shares)
            "pag_shared_vs_pipeline": (paired(k["dg_pag"], k["hf_pag"], clock), 1 - f_pag / 3, 1 - g_pag / 3),
            "pag_shared_vs_unshared": (
                paired(k["dg_pag"], k["dg_pag_ns"], clock),
                1 - f_pag / 3,
                1 - g_pag / 3,
            ),
            "pag_unshared_vs_pipeline": (paired(k["dg_pag_ns"], k["hf_pag"], clock), 1.0, 1.0),
            "tpg_shared_vs_unshared": (
                paired(k["dg_tpg1"], k["dg_tpg1_ns"], clock),
                1 - f_tpg / 3,
                1 - g_tpg / 3,
            ),
        }
        print(
            f"  B={b}: PAG fans out at {pag_unit} (modules before it: {f_pag:.1%} of a forward's time, "
            f"{g_pag:.1%} of its FLOPs); TPG at {tpg_unit} ({f_tpg:.1%}, {g_tpg:.1%})"
        )
        for name, (measured, bound, flop_bound) in rows.items():
            verdict = ""
            if name == "pag_shared_vs_pipeline":
                verdict = f"  target <= {TARGET_SHARED_PAG}: {'met' if measured <= TARGET_SHARED_PAG else 'NOT met'}"
            print(
                f"    {name:26s} measured {measured:.3f}x   bound {bound:.3f}x (FLOPs {flop_bound:.3f}x){verdict}"
            )
        out[f"b{b}"] = {n: {"measured": m, "bound": bd, "flop_bound": fb} for n, (m, bd, fb) in rows.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--steps", type=int, default=5, help="sampling steps per run; steps-1 are timed (default 5)"
    )
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round (default 4)")
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 steps, 1 round, batch 1 (CI smoke)")
    ap.add_argument("--json", help="write every step time and the summary to this file")
    ap.add_argument(
        "--prefix-only",
        action="store_true",
        help="time only the prefix-sharing rows: ideal 3B, CFG+PAG and CFG+TPG with and without sharing, "
        "diffusers' PAG pipeline",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.batches = 3, 1, "1"
    if args.steps < 2 or args.rounds < 1:
        ap.error("need --steps >= 2 (step 0 is not timed) and --rounds >= 1")
    cfg = QUICK if args.quick else FULL
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    torch.set_num_threads(args.threads)

    contenders, unet = build(cfg, batches, args.steps, args.prefix_only)
    by_key = {c.key: c for c in contenders}
    load_before = os.getloadavg()
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")
    print(f"model: {cfg.describe()}")
    print(
        f"  latent {cfg.sample}x{cfg.sample}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params; "
        f"PAG layers: {len(IdentityAttention().targets(unet))} mid-block self-attentions (preset 'mid', "
        f"= diffusers pag_applied_layers=['mid']); TPG layers: {len(TokenShuffle().targets(unet))} "
        "transformer blocks (preset: all of down_blocks.2)"
    )
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load avg {load_before[0]:.2f}"
    )
    print(
        f"steps {args.steps} ({args.steps - 1} timed per run), rounds {args.rounds} (+1 warm-up), "
        f"batches {batches}, CFG {CFG_SCALE}, PAG {PAG_SCALE}, TPG {TPG_SCALE}",
        flush=True,
    )

    bounds: dict[int, dict[str, tuple[str, float, float]]] = {}
    for b in batches:
        probes = [IdentityAttention(), TokenShuffle()]
        names = shared_modules(unet, probes)
        shares = unit_shares(unet, conditioning(cfg, b), 3, names)
        flops = flop_shares(unet, conditioning(cfg, b), 3, names)
        bounds[b] = {
            "pag": (*prefix_share(unet, shares, probes[0]), prefix_share(unet, flops, probes[0])[1]),
            "tpg": (*prefix_share(unet, shares, probes[1]), prefix_share(unet, flops, probes[1])[1]),
        }
        for what, values in (("time", shares), ("FLOP", flops)):
            print(
                f"  B={b} unit (and shared sub-unit) {what} shares of a bare 3B-row forward: "
                + ", ".join(f"{u} {v:.1%}" for u, v in values.items())
            )

    outputs: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for r in range(args.rounds + 1):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            clock = StepClock()
            out = c.run(clock)
            check_clean(unet)
            if r == 0:
                outputs[c.key] = out
            else:
                c.record(clock)
        print(
            f"  round {r}{' (warm-up)' if r == 0 else ''} done at {time.perf_counter() - t0:.0f} s, "
            f"load avg {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    print("\nsanity (same initial latents and embeddings, after the warm-up round):")
    for b in batches:
        for line in [] if args.prefix_only else sanity(by_key, outputs, b):
            print(line)
        for a, z in (("dg_pag", "dg_pag_ns"), ("dg_tpg1", "dg_tpg1_ns"), ("dg_pag", "hf_pag")):
            diff = float((outputs[f"{a}_b{b}"] - outputs[f"{z}_b{b}"]).abs().max())
            print(f"  B={b}: max |latents({a}) - latents({z})| = {diff:.2e}")
    summary: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        if not args.prefix_only:
            summary[clock] = report(clock, contenders, by_key, batches, args.rounds)
        summary[f"prefix_{clock}"] = report_prefix(clock, by_key, batches, bounds)
    finish(args, command, {"model": cfg.describe()}, batches, t0, load_before, summary, contenders)
    return 0


def finish(
    args: Any,
    command: str,
    model: dict[str, Any],
    batches: list[int],
    t0: float,
    load_before: tuple[float, float, float],
    summary: dict[str, Any],
    contenders: list[Any],
) -> None:
    """Print the run's total time and load; with ``--json`` write the results file (both
    step-cost benchmarks)."""
    load_after = os.getloadavg()
    print(
        f"\ntotal {time.perf_counter() - t0:.0f} s; load avg (1 min) {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} cpus shared with other jobs"
    )
    if not args.json:
        return
    keys = ("label", "model", "batch", "rows", "ideal", "rival")
    doc = {
        "command": command,
        **model,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "steps": args.steps,
        "rounds": args.rounds,
        "batches": batches,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "summary": summary,
        "contenders": {
            c.key: {k: getattr(c, k) for k in keys if hasattr(c, k)}
            | {"step_s": c.steps, "run_mean_s": c.runs}
            for c in contenders
        },
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
