"""``diffguide generate``: sample images with CFG / PAG / TPG and save them with manifests."""

from __future__ import annotations

import contextlib
import enum
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ..defaults import AUTO_DEVICE, COMFY_SCHEDULE_NAMES, DEFAULTS, NOISE_POLICIES, SCHEDULER_NAMES
from ..errors import ConfigError
from .common import (
    WINDOW_SYNTAX,
    DType,
    check_spec,
    library_noise_off,
    model_option,
    parse_lora,
    parse_window,
    plural,
    resolve_device,
    resolve_model,
)
from .guard import check_outputs, interruptible

if TYPE_CHECKING:  # heavy (torch, diffusers): imported where used, so `--help` stays fast
    from ..conditioning import ConditioningFile
    from ..guidance import Term, Window
    from ..pipeline import GenerateConfig, GuidedPipeline

Scheduler = enum.Enum("Scheduler", {name: name for name in SCHEDULER_NAMES}, type=str)  # type: ignore[misc]
Noise = enum.Enum("Noise", {name: name for name in NOISE_POLICIES}, type=str)  # type: ignore[misc]
DEFAULT_SCHEDULER, DEFAULT_NOISE, DEFAULT_DTYPE = (
    Scheduler(DEFAULTS.scheduler),
    Noise(DEFAULTS.noise),
    DType(DEFAULTS.dtype),
)

P_PROMPT, P_GUIDE, P_MODEL, P_OUT = "Prompt and sampling", "Guidance", "Model and device", "Output"


def build_guidance(
    *,
    cfg: float,
    cfg_rescale: float,
    cfg_window: str | None,
    pag: float,
    cfg_renorm: bool = False,
    pag_layers: str | None,
    pag_adaptive: float,
    pag_window: str | None,
    tpg: float,
    tpg_layers: str | None,
    tpg_window: str | None,
    slg: float = 0.0,
    slg_layers: str | None = None,
    slg_start: float | None = None,
    slg_stop: float | None = None,
    embedded_guidance: float | None = None,
) -> list[Term]:
    """The guidance terms the options ask for; a term whose scale means "off" is left out."""
    from ..guidance import CFG, PAG, SLG, TPG, EmbeddedGuidance, Window

    def window(spec: str | None, option: str) -> Window:
        return Window() if spec is None else parse_window(spec, option)

    terms: list[Term] = []
    if cfg != 1.0:
        terms.append(CFG(cfg, cfg_rescale, window(cfg_window, "--cfg-window"), renorm=cfg_renorm))
    elif cfg_rescale or cfg_window or cfg_renorm:
        raise ConfigError("--cfg-rescale/--cfg-window/--cfg-renorm given but --cfg is 1 (CFG off): set --cfg")
    if pag != 0.0:
        terms.append(
            PAG(pag, check_spec(pag_layers, "--pag-layers"), pag_adaptive, window(pag_window, "--pag-window"))
        )
    elif pag_layers is not None or pag_adaptive or pag_window:
        raise ConfigError(
            "--pag-layers/--pag-adaptive/--pag-window given but --pag is 0 (PAG off): set --pag"
        )
    if tpg != 0.0:
        terms.append(TPG(tpg, check_spec(tpg_layers, "--tpg-layers"), window(tpg_window, "--tpg-window")))
    elif tpg_layers is not None or tpg_window:
        raise ConfigError("--tpg-layers/--tpg-window given but --tpg is 0 (TPG off): set --tpg")
    if slg != 0.0:
        term = SLG(slg, check_spec(slg_layers, "--slg-layers"))
        start = term.start if slg_start is None else slg_start
        terms.append(SLG(slg, term.layers, start, term.stop if slg_stop is None else slg_stop))
    elif slg_layers is not None or slg_start is not None or slg_stop is not None:
        raise ConfigError("--slg-layers/--slg-start/--slg-stop given but --slg is 0 (SLG off): set --slg")
    if embedded_guidance is not None:
        terms.append(EmbeddedGuidance(embedded_guidance))
    return terms


def generate(
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            "-p",
            metavar="TEXT",
            help="Prompt; repeat for several prompts (one image each).",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    negative_prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--negative-prompt",
            "-N",
            metavar="TEXT",
            help="Negative prompt: one for all images, or one per image.",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            "-n",
            help="Number of images. Image i uses seed + i.",
            show_default="one per prompt",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    batch_invariant: Annotated[
        bool,
        typer.Option(
            "--batch-invariant",
            help="Sample each image alone, so image i is bit-identical to its seed run alone "
            "(costs one forward per image per step; see docs/performance.md).",
            rich_help_panel=P_PROMPT,
        ),
    ] = False,
    steps: Annotated[
        int, typer.Option("--steps", "-s", help="Sampling steps (1..1000).", rich_help_panel=P_PROMPT)
    ] = DEFAULTS.steps,
    width: Annotated[
        int | None,
        typer.Option(
            "--width",
            "-W",
            help="Width in pixels, a multiple of 8.",
            show_default="the model's native size",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option(
            "--height",
            "-H",
            help="Height in pixels, a multiple of 8.",
            show_default="the model's native size",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", min=0, help="Seed of the first image; image i uses seed + i.", rich_help_panel=P_PROMPT
        ),
    ] = DEFAULTS.seed,
    scheduler: Annotated[
        Scheduler, typer.Option("--scheduler", help="Sampler.", rich_help_panel=P_PROMPT)
    ] = DEFAULT_SCHEDULER,
    eta: Annotated[
        float, typer.Option("--eta", help="DDIM eta (0 = deterministic).", rich_help_panel=P_PROMPT)
    ] = DEFAULTS.eta,
    s_churn: Annotated[
        float,
        typer.Option(
            "--s-churn", help="Karras churn (diffusers policy, euler; 0 = off).", rich_help_panel=P_PROMPT
        ),
    ] = 0.0,
    s_tmin: Annotated[
        float, typer.Option("--s-tmin", help="Churn only at sigma >= this.", rich_help_panel=P_PROMPT)
    ] = 0.0,
    s_tmax: Annotated[
        float | None,
        typer.Option(
            "--s-tmax", help="Churn only at sigma <= this (default: no bound).", rich_help_panel=P_PROMPT
        ),
    ] = None,
    s_noise: Annotated[
        float,
        typer.Option(
            "--s-noise",
            help="Noise scale of churn (euler) or comfy euler_a's ancestral noise.",
            rich_help_panel=P_PROMPT,
        ),
    ] = 1.0,
    ancestral_eta: Annotated[
        float,
        typer.Option(
            "--ancestral-eta", help="Comfy policy euler_a's eta (KSampler: 1).", rich_help_panel=P_PROMPT
        ),
    ] = 1.0,
    dynamic_thresholding: Annotated[
        str | None,
        typer.Option(
            "--dynamic-thresholding",
            metavar="P[:MAX]",
            help="Imagen dynamic thresholding of x0 at percentile P, s up to MAX (default 1; ddim, dpmpp_2m, unipc, ddpm).",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    noise: Annotated[
        Noise,
        typer.Option(
            "--noise",
            help="Noise policy: diffusers (per-image CPU generators, as diffusers) or comfy (as ComfyUI's KSampler; --scheduler euler, euler_a, heun or dpmpp_2m, schedule from --schedule).",
            rich_help_panel=P_PROMPT,
        ),
    ] = DEFAULT_NOISE,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule",
            help="With --noise comfy: ComfyUI sigma schedule (" + ", ".join(COMFY_SCHEDULE_NAMES) + ").",
            show_default="normal",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    shift: Annotated[
        float,
        typer.Option(
            "--shift",
            help="Sampling time shift s (SD3's t' = s t / (1 + (s - 1) t)); 1 = off, > 1 more steps at high noise. euler, heun, dpmpp_2m.",
            rich_help_panel=P_PROMPT,
        ),
    ] = DEFAULTS.shift,
    cfg: Annotated[
        float | None,
        typer.Option(
            "--cfg",
            help="CFG scale w in [0, 100]; 1 = off (no unconditional branch). Not given on Flux: off, as "
            "FluxPipeline (true CFG needs --cfg and a negative prompt).",
            show_default=str(DEFAULTS.cfg),
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    cfg_rescale: Annotated[
        float, typer.Option("--cfg-rescale", help="CFG rescale phi in [0, 1].", rich_help_panel=P_GUIDE)
    ] = 0.0,
    cfg_window: Annotated[
        str | None,
        typer.Option(
            "--cfg-window",
            metavar="WINDOW",
            help="When CFG is active: " + WINDOW_SYNTAX + ".",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    cfg_renorm: Annotated[
        bool,
        typer.Option(
            "--cfg-renorm",
            help="Keep the conditional prediction's per-token norm (Qwen-Image's true CFG, as diffusers).",
            rich_help_panel=P_GUIDE,
        ),
    ] = False,
    pag: Annotated[
        float, typer.Option("--pag", help="PAG scale in [0, 100]; 0 = off.", rich_help_panel=P_GUIDE)
    ] = DEFAULTS.pag,
    pag_layers: Annotated[
        str | None,
        typer.Option(
            "--pag-layers",
            metavar="SPEC",
            help="PAG layers, e.g. 'mid' or 'd2.2-9'.",
            show_default="preset, see 'diffguide layers'",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    pag_adaptive: Annotated[
        float,
        typer.Option(
            "--pag-adaptive",
            help="Adaptive PAG: scale_t = max(0, s - a (1000 - t)); 0 = constant.",
            rich_help_panel=P_GUIDE,
        ),
    ] = 0.0,
    pag_window: Annotated[
        str | None,
        typer.Option(
            "--pag-window",
            metavar="WINDOW",
            help="When PAG is active (same syntax as --cfg-window).",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    tpg: Annotated[
        float, typer.Option("--tpg", help="TPG scale in [0, 100]; 0 = off.", rich_help_panel=P_GUIDE)
    ] = DEFAULTS.tpg,
    tpg_layers: Annotated[
        str | None,
        typer.Option(
            "--tpg-layers",
            metavar="SPEC",
            help="TPG layers.",
            show_default="preset, see 'diffguide layers'",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    tpg_window: Annotated[
        str | None,
        typer.Option(
            "--tpg-window",
            metavar="WINDOW",
            help="When TPG is active (same syntax as --cfg-window).",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    slg: Annotated[
        float,
        typer.Option(
            "--slg",
            help="Skip Layer Guidance scale in [0, 100] (transformer models; SD3.5: 2.8); 0 = off.",
            rich_help_panel=P_GUIDE,
        ),
    ] = 0.0,
    slg_layers: Annotated[
        str | None,
        typer.Option(
            "--slg-layers",
            metavar="SPEC",
            help="SLG blocks, e.g. b7-9.",
            show_default="preset, see 'diffguide layers'",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    slg_start: Annotated[
        float | None,
        typer.Option(
            "--slg-start",
            help="SLG from this fraction of the steps (strict, as diffusers' SD3 pipeline: N*start < i < N*stop).",
            show_default="0.01",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    slg_stop: Annotated[
        float | None,
        typer.Option(
            "--slg-stop",
            help="SLG until this fraction of the steps.",
            show_default="0.2",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    guide: Annotated[
        list[str] | None,
        typer.Option(
            "--guide",
            metavar="NAME[:KEY=VALUE,...]",
            help="Any registered guidance term, e.g. 'pag:scale=2,layers=mid' or 'tpg:layers=[d2.2-9,d3]' "
            "(a piece without '=' continues the previous value); repeatable. 'diffguide guides' lists "
            "the terms and their parameters; see docs/cli.md.",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    embedded_guidance: Annotated[
        float | None,
        typer.Option(
            "--embedded-guidance",
            help="Embedded guidance scale, a model input of guidance-distilled models (Flux dev: "
            "diffusers' guidance_scale, ComfyUI's FluxGuidance); an error on models without one.",
            show_default="3.5 on such models",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    max_rows: Annotated[
        int | None,
        typer.Option(
            "--max-rows",
            help="Run at most this many rows per forward (memory cap).",
            show_default="all rows in one forward",
            rich_help_panel=P_GUIDE,
        ),
    ] = None,
    no_prefix_sharing: Annotated[
        bool,
        typer.Option(
            "--no-prefix-sharing",
            help="Run every perturbed branch through every layer, instead of reusing the conditional "
            "branch's layers before its first perturbed one (equal within float rounding; recorded "
            "in the manifest; --trace-modules turns sharing off).",
            rich_help_panel=P_GUIDE,
        ),
    ] = False,
    no_compact_text: Annotated[
        bool,
        typer.Option(
            "--no-compact-text",
            help="Run every text token, instead of running SD3's repeated trailing text tokens (the 256 "
            "zero T5 tokens without T5) as one token with a log(count) attention bias (exact within "
            "float rounding; recorded in the manifest).",
            rich_help_panel=P_GUIDE,
        ),
    ] = False,
    model: Annotated[Path | None, model_option(panel=P_MODEL)] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="For a single-file checkpoint: a local diffusers folder of the same architecture.",
            rich_help_panel=P_MODEL,
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            metavar="PATH[:SCALE]",
            help="LoRA .safetensors, optional scale (default 1); repeatable.",
            rich_help_panel=P_MODEL,
        ),
    ] = None,
    dtype: Annotated[
        DType, typer.Option("--dtype", help="Weights and compute dtype.", rich_help_panel=P_MODEL)
    ] = DEFAULT_DTYPE,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu, cuda, cuda:N or mps.",
            show_default=AUTO_DEVICE,
            rich_help_panel=P_MODEL,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for torch (recorded in the manifest). Default: torch's, except 1 for "
            "models under 10M parameters on the CPU, where more threads only add synchronisation.",
            show_default="torch's default",
            rich_help_panel=P_MODEL,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (created).", rich_help_panel=P_OUT)
    ] = Path("outputs"),
    prefix: Annotated[
        str, typer.Option("--prefix", help="File name prefix.", rich_help_panel=P_OUT)
    ] = "diffguide",
    save_latents: Annotated[
        bool,
        typer.Option(
            "--save-latents",
            help="Also save each image's final latents (.safetensors).",
            rich_help_panel=P_OUT,
        ),
    ] = False,
    conditioning: Annotated[
        Path | None,
        typer.Option(
            "--conditioning",
            help="Precomputed prompt embeddings (.safetensors; .pt only via weights_only) used instead of "
            "encoding --prompt; see docs/reproducibility.md.",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    init_latents: Annotated[
        Path | None,
        typer.Option(
            "--init-latents",
            help="Start from these latents (img2img): a .safetensors file with one model-space latent tensor "
            "(batch 1 or one per image; --save-latents writes one) or ComfyUI's SaveLatent file; see --strength.",
            rich_help_panel=P_PROMPT,
        ),
    ] = None,
    strength: Annotated[
        float,
        typer.Option(
            "--strength",
            help="With --init-latents: how much of the schedule to run, in (0, 1]. diffusers policy: the last "
            "int(steps * strength) steps from the latents noised to that level; comfy policy: KSampler's denoise. "
            "1 = from pure noise.",
            rich_help_panel=P_PROMPT,
        ),
    ] = 1.0,
    save_workflow: Annotated[
        Path | None,
        typer.Option(
            "--save-workflow",
            help="Also write the run as a ComfyUI workflow (API-format .json; comfy noise policy, single-file "
            "checkpoint); 'diffguide comfy run' gives the same latents.",
            rich_help_panel=P_OUT,
        ),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Record every step (sigma, latents, each branch's prediction, guided prediction) to this "
            ".safetensors file; compare two with 'diffguide diff'.",
            rich_help_panel=P_OUT,
        ),
    ] = None,
    trace_modules: Annotated[
        str | None,
        typer.Option(
            "--trace-modules",
            metavar="PATTERN",
            help="With --trace: also record outputs of modules matching this fnmatch pattern, e.g. 'mid_block.*'.",
            rich_help_panel=P_OUT,
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress bar or messages; only the saved paths.", rich_help_panel=P_OUT
        ),
    ] = False,
) -> None:
    """Generate images and save each as PNG + JSON manifest (+ latents).

    Prints the saved files, one per line: for each image its .png, .json and, with
    --save-latents, .safetensors.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..io import save_result
    from ..repro.trace import TraceRecorder, check_trace_path

    if trace_modules and trace is None:
        raise ConfigError("--trace-modules needs --trace FILE")
    if trace is not None and batch_invariant:
        raise ConfigError(
            "--trace records the steps of one batch; with --batch-invariant each image is sampled alone: "
            "trace one image at a time (-n 1 with its seed)"
        )
    if trace is not None:
        check_trace_path(trace)  # no-clobber: refuse before loading the model and sampling
    if save_workflow is not None and init_latents is not None:
        raise ConfigError(
            "--save-workflow cannot express --init-latents yet (a LoadLatent node); drop one of them"
        )
    if save_workflow is not None and save_workflow.suffix != ".json":
        raise ConfigError(f"--save-workflow must end in .json, got '{save_workflow}'")
    run = prepare(locals())
    pipe, config_, console = run.pipe, run.config, run.console
    workflow = None
    if save_workflow is not None:  # refused before sampling when a workflow cannot express the run
        from ..comfy_workflow.writer import generate_workflow

        loras = tuple(parse_lora(spec) for spec in lora or [])
        workflow = generate_workflow(
            pipe, config_, resolve_model(model), loras, dtype.value, run.conditioning
        )
    recorder = TraceRecorder(trace_modules) if trace is not None else None
    started = time.perf_counter()
    with (
        Progress(
            TextColumn("sampling"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=quiet or not console.is_terminal,
        ) as progress,
        recorder.hooks(pipe.unet) if recorder else contextlib.nullcontext(),
    ):
        task = progress.add_task("sampling", total=None)

        def on_step(state: Any) -> None:
            progress.update(task, total=state.step.count, completed=state.step.index + 1)
            if recorder is not None:
                recorder(state)

        result = interruptible(
            lambda: pipe.generate(config_, callback=on_step, conditioning=run.conditioning)
        )

    pngs = save_result(result, out, prefix=prefix, save_latents=save_latents)
    for png in pngs:
        typer.echo(str(png))
        typer.echo(str(png.with_suffix(".json")))
        if save_latents:
            typer.echo(str(png.with_suffix(".safetensors")))
    if recorder is not None and trace is not None:
        typer.echo(str(recorder.save(trace, result.manifests[0])))
    if workflow is not None and save_workflow is not None:
        from ..io import replace_atomic

        save_workflow.parent.mkdir(parents=True, exist_ok=True)
        typer.echo(str(replace_atomic(save_workflow, json.dumps(workflow, indent=2).encode())))
    console.print(
        f"done in {time.perf_counter() - started:.1f}s: {len(pngs)} image(s), "
        f"{result.forward_calls} model forward calls, in {out}"
    )


@dataclass
class Run:
    pipe: GuidedPipeline
    config: GenerateConfig
    console: Console
    conditioning: ConditioningFile | None


def prepare(opts: dict[str, Any]) -> Run:
    """Validate the generate options, load the model, dry-run the layer specs."""

    from .. import app
    from ..conditioning import load_conditioning
    from ..models.presets import default_layers
    from ..pipeline import GenerateConfig
    from ..sampling.init import load_init_latents
    from .guide import merge_terms, parse_guide

    o = SimpleNamespace(**opts)
    prompt, quiet, dtype = o.prompt, o.quiet, o.dtype
    # Everything that can be checked without the model is checked before loading it.
    guides = [parse_guide(spec) for spec in o.guide or []]
    default_cfg = o.cfg is None and not any(t.method == "cfg" for t in guides)  # --guide cfg:... is CFG
    cfg = (DEFAULTS.cfg if default_cfg else 1.0) if o.cfg is None else o.cfg
    terms = build_guidance(
        cfg=cfg, cfg_rescale=o.cfg_rescale, cfg_window=o.cfg_window,
        cfg_renorm=o.cfg_renorm,
        pag=o.pag, pag_layers=o.pag_layers, pag_adaptive=o.pag_adaptive, pag_window=o.pag_window,
        tpg=o.tpg, tpg_layers=o.tpg_layers, tpg_window=o.tpg_window,
        slg=o.slg, slg_layers=o.slg_layers, slg_start=o.slg_start, slg_stop=o.slg_stop,
        embedded_guidance=o.embedded_guidance,
    )  # fmt: skip
    terms = merge_terms(terms, guides)
    if not prompt and o.conditioning is None:
        raise ConfigError(
            "give a prompt: --prompt TEXT (repeat it for several prompts), or --conditioning FILE"
        )
    if o.max_rows is not None and o.max_rows < 1:
        raise ConfigError(f"--max-rows must be >= 1, got {o.max_rows}")
    conditioning = load_conditioning(o.conditioning) if o.conditioning is not None else None
    init = getattr(o, "init_latents", None)
    knobs_init = {"init_latents": None if init is None else load_init_latents(init)}
    if init is not None or getattr(o, "strength", 1.0) != 1.0:
        knobs_init["strength"] = o.strength
    if not prompt:
        prompt = [conditioning.metadata.get("prompt", "<conditioning file>")] if conditioning else []
    knobs = {
        k: getattr(o, k) for k in ("s_churn", "s_tmin", "s_tmax", "s_noise", "ancestral_eta") if hasattr(o, k)
    }
    if getattr(o, "dynamic_thresholding", None) is not None:
        from ..sampling.knobs import parse_dynamic_threshold

        knobs["dynamic_thresholding"] = parse_dynamic_threshold(o.dynamic_thresholding)
    config_ = GenerateConfig.create(
        prompt if len(prompt) > 1 else prompt[0],
        o.negative_prompt or "",
        num_images=o.batch,
        guidance=terms,
        default_cfg=default_cfg,
        steps=o.steps,
        width=o.width,
        height=o.height,
        seed=o.seed,
        scheduler=o.scheduler.value,
        eta=o.eta,
        **knobs,
        **knobs_init,
        max_rows=o.max_rows,
        noise=o.noise.value,
        schedule=o.schedule,
        shift=o.shift,
        batch_invariant=o.batch_invariant,
        # module traces need every row through every module
        prefix_sharing=not getattr(o, "no_prefix_sharing", False) and not getattr(o, "trace_modules", None),
        compact_text=not getattr(o, "no_compact_text", False),
    )
    if "out" in opts:  # generate (check-determinism writes nothing): outputs checked before loading
        check_outputs(o, config_.num_images, config_.seed)
    loras = [parse_lora(spec) for spec in o.lora or []]
    device_ = resolve_device(o.device)
    model_path = resolve_model(o.model)

    console = Console(stderr=True, quiet=quiet, highlight=False)
    request = app.ModelRequest(str(model_path), DType(dtype).value, device_, o.config, tuple(loras))
    with library_noise_off(), console.status(f"loading {model_path}"):
        pipe = app.load_model(request)
    app.set_threads(pipe, o.threads)  # tiny models on the CPU: one thread (more cost more than they save)
    # dry run of every perturbation: a bad layer fails here, before sampling
    by_name = {t.name: t for t in terms}
    for choice in app.dry_run_layers(pipe, tuple(terms)):
        term = by_name[choice.term]
        preset = term.preset  # the presets.Method whose layers the term's perturbation defaults to
        spec = choice.spec or (f"preset {default_layers(pipe.model, preset)}" if preset else "default")  # type: ignore[arg-type]
        count = len(choice.modules)
        console.print(f"{choice.term} layers: {spec} -> {count} {plural(count, term.layer_kind)}")
    if config_.init_latents is not None:  # the file's shape vs the model's latents: before sampling
        from ..sampling.init import check_init_latents

        check_init_latents(pipe, config_)
    size = pipe.default_size()
    noise_desc = f"{config_.noise} noise" + (f" ({config_.schedule} schedule)" if config_.schedule else "")
    console.print(
        f"{config_.num_images} image(s), {config_.width or size}x{config_.height or size}, "
        f"{config_.steps} steps {config_.scheduler}, {noise_desc}, seed {config_.seed}, on {device_} {dtype.value}"
    )

    return Run(pipe, config_, console, conditioning)
