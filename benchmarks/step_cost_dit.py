"""Per-step cost of guided sampling on transformers (SD3, Flux): diffguide vs diffusers vs the bare forward.

The transformer section of ``step_cost.py`` (same clock, method and report conventions; its
``StepClock``, ``Contender`` and ``paired`` are imported from there). One run times, side by side
and interleaved, on a random SD3-shaped ``SD3Transformer2DModel`` and a random Flux-shaped
``FluxTransformer2DModel`` (CPU, fixed thread count), at each batch size B:

SD3 (CFG 5, SLG 2.8 on blocks 7-9, the SD3.5 preset, scaled to the block count):
* ideal 2B / 3B       one bare ``transformer(...)`` on 2B rows (CFG) or 3B rows (CFG + one
                      perturbed branch): the cost floor when every branch shares one forward;
* diffguide CFG, CFG+SLG
                      ``GuidedModel`` + ``sampling.loop.run`` with the SD3 family adapter and
                      precomputed conditioning (what ``GuidedPipeline.generate(decode=False)`` runs
                      after encoding); SLG is a row-scoped block skip inside the one forward: the
                      SLG rows share blocks 0..6 with the conditional rows (prefix sharing) and
                      bypass the skipped blocks (which run on the other rows only);
* diffguide CFG+SLG, no prefix sharing
                      the same with ``prefix_sharing=False`` (the skipped blocks still run on the
                      other rows only);
* diffusers SD3 CFG / SLG
                      ``StableDiffusion3Pipeline`` given the embeddings, ``output_type="latent"``;
                      with ``skip_guidance_layers`` it runs the SLG branch as a second call on B rows.

Flux (dev-like: guidance embedding; embedded guidance 3.5, true CFG 4):
* ideal 1B / 2B       one bare forward on B rows (embedded guidance) or 2B rows (true CFG);
* diffguide embedded guidance, true CFG (+ embedded guidance): the Flux family adapter;
  true CFG's negative rows share the forward with the positive rows;
* diffusers Flux embedded / true CFG
                      ``FluxPipeline`` given the embeddings and packed latents,
                      ``guidance_scale=3.5`` and, for true CFG, ``true_cfg_scale=4`` with negative
                      embeddings: two transformer calls of B rows per step.

SLG's window is ``start=0, stop=1``: diffusers' strict rule ``N*start < i < N*stop`` (which
diffguide follows) runs it on steps 1..N-1, exactly the timed steps. All contenders of a model
share one transformer (checked unchanged after every run: attention processors, hooks, instance
forwards, parameter storage and version counters; and a checksum of every weight at the end),
the same prompt embeddings and initial latents, the same scheduler config and step count.

What is timed, the method and the clocks: as ``step_cost.py`` (its docstring and
benchmarks/README.md): the interval between consecutive ``scheduler.step`` returns (ideal loops:
between forwards), steps 1..N-1 of each run; one warm-up round, then ``--rounds`` rounds in
round-robin order rotated each round; medians of step times; ratios are medians over rounds of
same-round ratios of mean step times; wall (perf_counter) and process CPU time (process_time).

    python benchmarks/step_cost_dit.py                   # 2 threads, 5 steps, 4 rounds, B = 1, 2
    python benchmarks/step_cost_dit.py --quick           # tiny models, seconds (tests/ smoke test)
    python benchmarks/step_cost_dit.py --json out.json   # every step time, for later analysis
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the OpenMP runtime starts (torch import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import diffusers
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from step_cost import Contender, StepClock, finish, paired

from diffguide import CFG, SLG, Conditioning, EmbeddedGuidance, GuidedModel
from diffguide.models.denoiser import FamilyDenoiser
from diffguide.models.families.flux import FluxFamily
from diffguide.models.families.sd3 import SD3Family
from diffguide.sampling.loop import run as run_loop
from diffguide.sampling.noise import generators

CFG_SCALE, SLG_SCALE, TRUE_CFG, EMBEDDED = 5.0, 2.8, 4.0, 3.5
VAE_SCALE = 8  # the pipelines are built without a VAE, so their vae_scale_factor is 8
TARGET_IDEAL, TARGET_DIFFUSERS = 1.02, 1.0


@dataclass(frozen=True)
class DiTSizes:
    """Both transformers' shapes: width = heads x head_dim; latent side ``sample`` (VAE space)."""

    sd3_blocks: int
    flux_double: int
    flux_single: int
    heads: int
    head_dim: int
    sample: int
    text_tokens: int
    text_dim: int
    pooled_dim: int
    rope: tuple[int, int, int]  # Flux axes_dims_rope, sums to head_dim

    def slg_blocks(self) -> list[int]:
        """SD3.5's SLG blocks 7-9 of 24 as published for SD3.5 Medium; scaled to ``sd3_blocks``
        by the ratio to 12 (at 12 blocks: 7-9, the diffguide SD3 preset)."""
        lo, hi = round(7 * self.sd3_blocks / 12), round(9 * self.sd3_blocks / 12)
        return list(range(lo, min(hi, self.sd3_blocks - 1) + 1))

    def describe(self) -> str:
        width = self.heads * self.head_dim
        return (
            f"SD3Transformer2DModel({self.sd3_blocks} joint blocks, width {width} = {self.heads} heads x "
            f"{self.head_dim}, patch 2, 16 channels, {self.sample}x{self.sample} latent); "
            f"FluxTransformer2DModel({self.flux_double} double + {self.flux_single} single blocks, width "
            f"{width}, 64 packed channels, guidance embedding); text {self.text_tokens} tokens x "
            f"{self.text_dim}, pooled {self.pooled_dim}; seeds 0 / 1"
        )


FULL = DiTSizes(12, 4, 8, 6, 64, 32, 77, 256, 128, (16, 24, 24))
QUICK = DiTSizes(4, 1, 2, 2, 16, 8, 8, 32, 32, (4, 4, 8))


def _liven(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a sensible size everywhere (diffusers zero-initialises some modulations,
    which would hide what a skipped block or a guidance term changes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 8
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model.eval()


def sd3_model(s: DiTSizes) -> Any:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=s.sample,
        patch_size=2,
        in_channels=16,
        num_layers=s.sd3_blocks,
        attention_head_dim=s.head_dim,
        num_attention_heads=s.heads,
        joint_attention_dim=s.text_dim,
        caption_projection_dim=s.heads * s.head_dim,
        pooled_projection_dim=s.pooled_dim,
        out_channels=16,
        pos_embed_max_size=s.sample,
    )
    return _liven(model, 0)


def flux_model(s: DiTSizes) -> Any:
    torch.manual_seed(1)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=s.flux_double,
        num_single_layers=s.flux_single,
        attention_head_dim=s.head_dim,
        num_attention_heads=s.heads,
        joint_attention_dim=s.text_dim,
        pooled_projection_dim=s.pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=s.rope,
    )
    return _liven(model, 1)


def sd3_scheduler() -> Any:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler config


def flux_scheduler() -> Any:
    return FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def inputs(s: DiTSizes, batch: int) -> dict[str, torch.Tensor]:
    """Precomputed prompt embeddings (positive and negative) and initial latents, seed 1234."""
    g = torch.Generator().manual_seed(1234)
    return {
        "pe": torch.randn(batch, s.text_tokens, s.text_dim, generator=g),
        "ne": torch.randn(batch, s.text_tokens, s.text_dim, generator=g),
        "pp": torch.randn(batch, s.pooled_dim, generator=g),
        "np": torch.randn(batch, s.pooled_dim, generator=g),
        "noise": torch.randn(batch, 16, s.sample, s.sample, generator=g),
    }


# ---------------------------------------------------------------------------------------------
# the model must be unchanged by every run


class Guard:
    """What a run must leave as it found it: processors, hooks, instance forwards, weights."""

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        self.name, self.model = name, model
        self.processors = {k: type(v) for k, v in model.attn_processors.items()}
        self.params = self._params()
        self.checksum = self._checksum()

    def _params(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    def _checksum(self) -> float:
        with torch.no_grad():
            return float(sum(p.double().abs().sum() for p in self.model.parameters()))

    def check(self, full: bool = False) -> None:
        procs = {k: type(v) for k, v in self.model.attn_processors.items()}
        if procs != self.processors:
            changed = sorted(k for k in procs if procs[k] is not self.processors.get(k))
            raise RuntimeError(f"{self.name}: attention processors changed: {changed[:3]}")
        for mod_name, m in self.model.named_modules():
            fwd = m.__dict__.get("forward")
            wrapped = fwd is not None and getattr(fwd, "__func__", None) is not type(m).forward
            if m._forward_pre_hooks or m._forward_hooks or wrapped:
                raise RuntimeError(f"{self.name}: module '{mod_name}' left with hooks or a wrapped forward")
        if self._params() != self.params:
            raise RuntimeError(f"{self.name}: a parameter was replaced or modified in place")
        if full and self._checksum() != self.checksum:
            raise RuntimeError(f"{self.name}: weights changed (checksum)")


# ---------------------------------------------------------------------------------------------
# contenders


@dataclass
class DiTContender(Contender):
    model: str = ""  # "sd3" or "flux"
    rival: str | None = None  # key of the diffusers contender it is compared with


def _timesteps(scheduler: Any, steps: int, seq_len: int) -> list[torch.Tensor]:
    from diffguide.sampling.steppers import flow_set_timesteps

    flow_set_timesteps(scheduler, steps, "cpu", seq_len)
    return list(scheduler.timesteps)


class Runs:
    """Factories of the timed runs; each returns ``run(clock)``: one sampling run of ``steps`` steps."""

    def __init__(self, s: DiTSizes, steps: int, sd3: Any, flux: Any) -> None:
        self.s, self.steps, self.size = s, steps, s.sample * VAE_SCALE
        self.sd3_pipe = StableDiffusion3Pipeline(
            transformer=sd3,
            scheduler=sd3_scheduler(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        self.flux_pipe = FluxPipeline(
            transformer=flux,
            scheduler=flux_scheduler(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
        )
        for p in (self.sd3_pipe, self.flux_pipe):
            p.set_progress_bar_config(disable=True)
        self.families = {"sd3": (SD3Family(), self.sd3_pipe), "flux": (FluxFamily(), self.flux_pipe)}

    # -- the bare forward -----------------------------------------------------------------------
    def ideal(self, model: str, c: dict[str, torch.Tensor], k: int) -> Callable[[StepClock], Any]:
        """``steps`` bare forwards on the k*B rows [uncond, cond, cond, ...] (inputs prebuilt)."""
        ehs = torch.cat([c["ne"]] + [c["pe"]] * (k - 1)) if k > 1 else c["pe"]
        pooled = torch.cat([c["np"]] + [c["pp"]] * (k - 1)) if k > 1 else c["pp"]
        rows = ehs.shape[0]
        if model == "sd3":
            net = self.sd3_pipe.transformer
            x = torch.cat([c["noise"]] * k)
            ts = _timesteps(sd3_scheduler(), self.steps, (self.s.sample // 2) ** 2)

            def forward(t: torch.Tensor) -> Any:
                return net(
                    hidden_states=x,
                    timestep=t.expand(rows),
                    encoder_hidden_states=ehs,
                    pooled_projections=pooled,
                    return_dict=False,
                )
        else:
            from diffguide.models.families.flux import image_ids, pack

            net = self.flux_pipe.transformer
            x = pack(torch.cat([c["noise"]] * k))
            ts = _timesteps(flux_scheduler(), self.steps, x.shape[1])
            txt_ids, img_ids = (
                torch.zeros(ehs.shape[1], 3),
                image_ids(self.s.sample, self.s.sample, "cpu", x.dtype),
            )
            guidance = torch.full([rows], EMBEDDED)

            def forward(t: torch.Tensor) -> Any:
                return net(
                    hidden_states=x,
                    timestep=t.expand(rows) / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=ehs,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )

        def run(clock: StepClock) -> Any:
            with torch.inference_mode():
                for t in ts:
                    out = forward(t)
                    clock.tick()
            return out[0]

        return run

    # -- diffguide ------------------------------------------------------------------------------
    def diffguide(
        self, model: str, c: dict[str, torch.Tensor], terms: list[Any], share: bool = True
    ) -> Callable[[StepClock], Any]:
        """GuidedModel + sampling.loop.run with the family adapter, precomputed conditioning;
        ``share``: prefix sharing (GuidedModel's default) or not."""
        family, pipe = self.families[model]
        checked = family.guidance_terms(pipe, tuple(terms), has_negative=True)
        need_uncond = any(b.name == "uncond" for t in checked for b in t.branches())
        cond, uncond = family.model_inputs(
            pipe,
            checked,
            Conditioning(c["pe"], c["pp"]),
            Conditioning(c["ne"], c["np"]) if need_uncond else None,
            self.size,
            self.size,
        )
        seeds = list(range(c["pe"].shape[0]))
        noise = family.pack(c["noise"])

        def run(clock: StepClock) -> Any:
            denoiser = FamilyDenoiser(family, pipe.transformer, family.prediction(pipe))
            guided = GuidedModel(denoiser, checked, cond, uncond, seeds, prefix_sharing=share)
            stepper, sched = family.stepper(
                pipe,
                "euler",
                self.steps,
                shift=1.0,
                height=self.size,
                width=self.size,
                generators=generators(seeds),
                eta=0.0,
            )
            clock.attach(sched)
            return run_loop(guided, stepper, noise)  # Flux: packed, as FluxPipeline's latent output

        return run

    # -- diffusers ------------------------------------------------------------------------------
    def sd3_pipeline(self, c: dict[str, torch.Tensor], **extra: Any) -> Callable[[StepClock], Any]:
        pipe = self.sd3_pipe

        def run(clock: StepClock) -> Any:
            pipe.scheduler = clock.attach(sd3_scheduler())
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

    def flux_pipeline(self, c: dict[str, torch.Tensor], true_cfg: bool) -> Callable[[StepClock], Any]:
        from diffguide.models.families.flux import pack

        pipe, latents = self.flux_pipe, pack(c["noise"])
        extra: dict[str, Any] = {}
        if true_cfg:
            extra = {
                "negative_prompt_embeds": c["ne"],
                "negative_pooled_prompt_embeds": c["np"],
                "true_cfg_scale": TRUE_CFG,
            }

        def run(clock: StepClock) -> Any:
            pipe.scheduler = clock.attach(flux_scheduler())
            return pipe(
                prompt_embeds=c["pe"],
                pooled_prompt_embeds=c["pp"],
                latents=latents,
                num_inference_steps=self.steps,
                guidance_scale=EMBEDDED,
                height=self.size,
                width=self.size,
                output_type="latent",
                **extra,
            ).images

        return run


def build(s: DiTSizes, models: list[str], batches: list[int], steps: int) -> tuple[list[DiTContender], Runs]:
    runs = Runs(s, steps, sd3_model(s), flux_model(s))
    blocks = s.slg_blocks()
    slg_spec = f"b{blocks[0]}-{blocks[-1]}"
    slg = SLG(SLG_SCALE, layers=slg_spec, start=0.0, stop=1.0)
    hf_slg = {
        "skip_guidance_layers": blocks,
        "skip_layer_guidance_scale": SLG_SCALE,
        "skip_layer_guidance_start": 0.0,
        "skip_layer_guidance_stop": 1.0,
    }
    contenders: list[DiTContender] = []
    for b in batches:
        c = inputs(s, b)
        tables = {
            "sd3": [
                ("ideal2", "ideal: bare forward, 2B rows", 2, None, None, runs.ideal("sd3", c, 2)),
                (
                    "dg_cfg",
                    "diffguide CFG",
                    2,
                    "ideal2",
                    "hf_cfg",
                    runs.diffguide("sd3", c, [CFG(CFG_SCALE)]),
                ),
                ("hf_cfg", "diffusers SD3 pipeline CFG", 2, "ideal2", None, runs.sd3_pipeline(c)),
                ("ideal3", "ideal: bare forward, 3B rows", 3, None, None, runs.ideal("sd3", c, 3)),
                (
                    "dg_slg",
                    f"diffguide CFG+SLG ({slg_spec})",
                    3,
                    "ideal3",
                    "hf_slg",
                    runs.diffguide("sd3", c, [CFG(CFG_SCALE), slg]),
                ),
                (
                    "dg_slg_ns",
                    "diffguide CFG+SLG, no prefix sharing",
                    3,
                    "ideal3",
                    "hf_slg",
                    runs.diffguide("sd3", c, [CFG(CFG_SCALE), slg], share=False),
                ),
                (
                    "hf_slg",
                    "diffusers SD3 pipeline CFG+SLG",
                    3,
                    "ideal3",
                    None,
                    runs.sd3_pipeline(c, **hf_slg),
                ),
            ],
            "flux": [
                ("ideal1", "ideal: bare forward, 1B rows", 1, None, None, runs.ideal("flux", c, 1)),
                (
                    "dg_emb",
                    "diffguide embedded guidance",
                    1,
                    "ideal1",
                    "hf_emb",
                    runs.diffguide("flux", c, [EmbeddedGuidance(EMBEDDED)]),
                ),
                (
                    "hf_emb",
                    "diffusers Flux embedded guidance",
                    1,
                    "ideal1",
                    None,
                    runs.flux_pipeline(c, False),
                ),
                ("ideal2", "ideal: bare forward, 2B rows", 2, None, None, runs.ideal("flux", c, 2)),
                (
                    "dg_tcfg",
                    "diffguide true CFG",
                    2,
                    "ideal2",
                    "hf_tcfg",
                    runs.diffguide("flux", c, [CFG(TRUE_CFG), EmbeddedGuidance(EMBEDDED)]),
                ),
                (
                    "hf_tcfg",
                    "diffusers Flux true CFG (2 calls)",
                    2,
                    "ideal2",
                    None,
                    runs.flux_pipeline(c, True),
                ),
            ],
        }
        for model in models:
            for key, label, k, ideal, rival, run in tables[model]:
                contenders.append(
                    DiTContender(
                        key=f"{model}_{key}_b{b}",
                        label=label,
                        batch=b,
                        rows=k * b,
                        ideal=f"{model}_{ideal}_b{b}" if ideal else None,
                        run=run,
                        model=model,
                        rival=f"{model}_{rival}_b{b}" if rival else None,
                    )
                )
    return contenders, runs


# ---------------------------------------------------------------------------------------------
# report


def sanity(contenders: list[DiTContender], outputs: dict[str, torch.Tensor]) -> list[str]:
    """Same computation? diffguide vs the matching diffusers pipeline: final latents, same noise."""
    lines = []
    for c in contenders:
        if c.rival is None:
            continue
        a, b = outputs[c.key], outputs[c.rival]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise RuntimeError(f"non-finite latents from {c.key} or {c.rival}")
        diff = float((a - b).abs().max())
        lines.append(
            f"  {c.model} B={c.batch}: max |latents({c.label}) - latents(diffusers)| = {diff:.2e} "
            f"(latents' max |x| {float(b.abs().max()):.2f})"
        )
    for b in sorted({c.batch for c in contenders}):
        key, base = f"sd3_dg_slg_b{b}", f"sd3_dg_cfg_b{b}"
        if key in outputs:
            diff = float((outputs[key] - outputs[base]).abs().max())
            lines.append(f"  sd3 B={b}: SLG's effect, max |CFG+SLG - CFG| = {diff:.2e} (SLG ran)")
    return lines


def spread(xs: list[float]) -> float:
    """Interquartile range / median."""
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def ratio_range(a: DiTContender, b: DiTContender, clock: str) -> tuple[float, float, float]:
    """(median, min, max) over rounds of the same-round ratio of mean step times."""
    rs = [x / y for x, y in zip(a.runs[clock], b.runs[clock], strict=True)]
    return paired(a, b, clock), min(rs), max(rs)


def verdict(r: tuple[float, float, float], limit: float) -> str:
    med, lo, hi = r
    if hi <= limit:
        return "met"
    if med <= limit:
        return "met (median; some rounds above)"
    return "within noise" if lo <= limit else "NOT met"


def report(contenders: list[DiTContender], by_key: dict[str, DiTContender], rounds: int) -> dict[str, Any]:
    print(
        f"\nms/step: median of all timed steps (spread: interquartile range / median); ratios: median over "
        f"{rounds} rounds of the same-round ratio of mean step times [min-max over rounds]"
    )
    out: dict[str, Any] = {"contenders": {}, "targets": {}}
    for model in dict.fromkeys(c.model for c in contenders):
        for b in sorted({c.batch for c in contenders if c.model == model}):
            group = [c for c in contenders if c.model == model and c.batch == b]
            print(f"\n{model.upper()}, B={b}")
            header = (
                f"{'contender':36s} {'rows':>4s} | {'wall ms':>8s} {'spread':>6s} | {'CPU ms':>8s} {'spread':>6s} | "
                f"{'x ideal, wall':>18s} {'x ideal, CPU':>18s} | {'/ diffusers, wall':>18s} {'/ diffusers, CPU':>18s}"
            )
            print(header)
            print("-" * len(header))
            for c in group:
                row = f"{c.label:36s} {c.rows:4d} |"
                entry: dict[str, Any] = {"label": c.label, "rows": c.rows}
                for clock in ("wall", "cpu"):
                    xs = c.steps[clock]
                    entry[f"{clock}_median_ms"] = statistics.median(xs) * 1e3
                    entry[f"{clock}_spread"] = spread(xs)
                    row += f" {statistics.median(xs) * 1e3:8.1f} {spread(xs) * 100:5.1f}% |"
                for field_, other in (("x_ideal", c.ideal), ("x_diffusers", c.rival)):
                    cells = []
                    for clock in ("wall", "cpu"):
                        if other is None:
                            cells.append("-")
                            continue
                        r = ratio_range(c, by_key[other], clock)
                        entry[f"{field_}_{clock}"] = r
                        cells.append(f"{r[0]:.3f} [{r[1]:.2f}-{r[2]:.2f}]")
                    row += f" {cells[0]:>18s} {cells[1]:>18s} |"
                print(row.rstrip(" |"))
                out["contenders"][c.key] = entry
            print(
                f"targets: diffguide <= {TARGET_IDEAL}x ideal (same rows), <= {TARGET_DIFFUSERS}x diffusers"
            )
            for c in group:
                if not c.key.split("_", 1)[1].startswith("dg_"):
                    continue
                verdicts = {}
                for clock in ("wall", "cpu"):
                    vi = verdict(ratio_range(c, by_key[c.ideal or ""], clock), TARGET_IDEAL)
                    vd = verdict(ratio_range(c, by_key[c.rival or ""], clock), TARGET_DIFFUSERS)
                    verdicts[clock] = {"vs_ideal": vi, "vs_diffusers": vd}
                print(
                    f"  {c.label}: vs ideal {verdicts['cpu']['vs_ideal']} (CPU) / {verdicts['wall']['vs_ideal']} "
                    f"(wall); vs diffusers {verdicts['cpu']['vs_diffusers']} (CPU) / "
                    f"{verdicts['wall']['vs_diffusers']} (wall)"
                )
                out["targets"][c.key] = verdicts
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--steps", type=int, default=5, help="sampling steps per run; steps-1 are timed (default 5)"
    )
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round (default 4)")
    ap.add_argument("--batches", default="1,2", help="comma-separated batch sizes (default 1,2)")
    ap.add_argument("--models", default="sd3,flux", help="comma-separated: sd3, flux (default both)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--quick", action="store_true", help="tiny models, 3 steps, 1 round, batch 1 (smoke test)"
    )
    ap.add_argument("--json", help="write every step time and the summary to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.batches = 3, 1, "1"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.steps < 2 or args.rounds < 1:
        ap.error("need --steps >= 2 (step 0 is not timed) and --rounds >= 1")
    if not models or any(m not in ("sd3", "flux") for m in models):
        ap.error(f"--models: sd3 and/or flux, got {args.models!r}")
    sizes = QUICK if args.quick else FULL
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    torch.set_num_threads(args.threads)

    contenders, runs = build(sizes, models, batches, args.steps)
    by_key = {c.key: c for c in contenders}
    guards = [
        Guard("SD3 transformer", runs.sd3_pipe.transformer),
        Guard("Flux transformer", runs.flux_pipe.transformer),
    ]
    load_before = os.getloadavg()
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)])
    params = {
        name: sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
        for name, pipe in (("SD3", runs.sd3_pipe), ("Flux", runs.flux_pipe))
    }
    print(f"command: {command}")
    print(f"models: {sizes.describe()}")
    print(
        f"  {params['SD3']:.1f} M / {params['Flux']:.1f} M params; {(sizes.sample // 2) ** 2} image tokens; "
        f"SLG blocks {sizes.slg_blocks()} (transformer_blocks.N; diffusers skip_guidance_layers)"
    )
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load avg {load_before[0]:.2f}"
    )
    print(
        f"steps {args.steps} ({args.steps - 1} timed per run), rounds {args.rounds} (+1 warm-up), batches "
        f"{batches}, models {models}; SD3: CFG {CFG_SCALE}, SLG {SLG_SCALE} window 0..1; Flux: embedded "
        f"guidance {EMBEDDED}, true CFG {TRUE_CFG}; Euler (FlowMatchEulerDiscreteScheduler)",
        flush=True,
    )

    outputs: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for r in range(args.rounds + 1):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            clock = StepClock()
            out = c.run(clock)
            for g in guards:
                g.check()
            if r == 0:
                outputs[c.key] = out
            else:
                c.record(clock)
        for g in guards:
            g.check(full=True)
        print(
            f"  round {r}{' (warm-up)' if r == 0 else ''} done at {time.perf_counter() - t0:.0f} s, "
            f"load avg {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    print("\nsanity (same initial latents and embeddings, after the warm-up round):")
    for line in sanity(contenders, outputs):
        print(line)
    print("  models unchanged after every run (processors, hooks, forwards, parameters; checksum per round)")
    summary = report(contenders, by_key, args.rounds)
    finish(args, command, {"models": sizes.describe()}, batches, t0, load_before, summary, contenders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
