"""One job's run, shared by the in-process worker and the Ray Serve replicas: its files resolved,
the model (with its LoRAs) from the cache, :func:`diffguide.app.generate` with a step callback that
emits the job's ``step`` events (previews as asked), records the trace when asked, and stops the
run (:class:`JobCancelled`) at the first step after ``cancelled()`` turns true."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import app
from ..pipeline import GenerationResult
from ..repro.trace import TraceRecorder
from .models import ModelCache
from .previews import preview_png, vae_preview_png
from .schema import JobRequest
from .uploads import resolve

Emit = Callable[[dict[str, Any]], None]


class JobCancelled(Exception):
    """Raised from the step callback to stop a run."""


@dataclass
class JobRun:
    """A finished run: its result and, when asked for, its trace (saved with the job's files)."""

    result: GenerationResult
    trace: TraceRecorder | None


def run_job(
    req: JobRequest,
    cache: ModelCache,
    uploads: Path,
    threads: int | None,
    preview_every: int,
    emit: Emit,
    cancelled: Callable[[], bool],
) -> JobRun:
    files = resolve(req, uploads)
    cfg = req.to_config(files.prompt, files.init_latents)
    pipe = cache.get(req.model, files.loras)
    recorder = TraceRecorder(req.trace_modules) if req.trace else None
    vae_every = req.vae_preview_every
    size = (cfg.height or pipe.default_size(), cfg.width or pipe.default_size())
    per_image = cfg.batch_invariant and cfg.num_images > 1
    done = 0

    def on_step(state: Any) -> None:
        nonlocal done
        if cancelled():
            raise JobCancelled()
        done += 1
        total = state.step.count * (cfg.num_images if per_image else 1)
        event: dict[str, Any] = {"event": "step", "step": done, "steps": total}
        x = state.latents_out
        if preview_every and x.dim() == 4 and (done % preview_every == 0 or done == total):
            event["preview"] = preview_png(x[0])
        if vae_every and (done % vae_every == 0 or done == total):
            tiny = cache.tiny_vae(req.model)
            event["vae_preview"] = vae_preview_png(pipe, pipe.family.unpack(x[:1], *size), tiny)
        if recorder is not None:
            recorder(state)
        emit(event)

    model = app.ModelRequest(str(cache.path(req.model)), device=cache.device, loras=files.loras)
    request = app.GenerateRequest(model, cfg, files.conditioning, threads)
    with recorder.hooks(pipe.unet) if recorder is not None else contextlib.nullcontext():
        result = app.generate(request, pipe, callback=on_step)
    return JobRun(result, recorder)
