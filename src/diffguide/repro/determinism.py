"""``check-determinism``: run a generation again (and batch vs single, and under torch's
deterministic-algorithms flag) and report any difference with the diff report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from ..conditioning import ConditioningFile
from ..errors import ConfigError
from ..pipeline import GenerateConfig, GuidedPipeline
from .diff import DiffReport, compare

#: How far image i of a float32 batch may lie from its seed run alone, as a relative bound
#: ``|batch - alone| <= BATCH_TOLERANCE * (1 + |alone|)`` on the final latents. Batch composition
#: changes how CPU kernels block their sums; the guidance scales amplify that over the steps.
#: Measured by ``benchmarks/batch_vs_single.py`` on several kernel paths (docs/reproducibility.md,
#: "Batch vs single"); the bound is 3x the largest value measured (6.7e-5, forced SSE kernels).
BATCH_TOLERANCE = 2e-4


@dataclass(frozen=True)
class Check:
    name: str
    expectation: str  # "bit-identical" or "within 1e-5"
    report: DiffReport

    @property
    def ok(self) -> bool:
        return self.report.ok


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Turn on torch's deterministic algorithms (errors on nondeterministic ops), then restore."""
    before, warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def check_determinism(
    pipe: GuidedPipeline,
    cfg: GenerateConfig,
    *,
    batch_vs_single: bool = False,
    strict: bool = False,
    atol_batch: float = BATCH_TOLERANCE,
    conditioning: ConditioningFile | None = None,
) -> list[Check]:
    """Run ``cfg`` twice (must be bit-identical); optionally each image alone (within
    ``atol_batch`` relative to the latents' magnitude: batch composition changes CPU arithmetic
    slightly; bit-identical with ``cfg.batch_invariant``) and under
    ``torch.use_deterministic_algorithms(True)`` (bit-identical)."""
    if conditioning is not None and batch_vs_single:
        raise ConfigError(
            "--batch-vs-single runs each prompt alone; it cannot be combined with --conditioning"
        )
    if batch_vs_single and cfg.noise == "comfy":
        raise ConfigError(
            "--batch-vs-single needs per-image noise: the comfy noise policy draws one noise tensor for "
            "the whole batch from the seed, as ComfyUI's KSampler does, so image i of a batch has no "
            "single-image run to match; use the diffusers noise policy for this check"
        )
    ref = pipe.generate(cfg, decode=False, conditioning=conditioning).latents
    again = pipe.generate(cfg, decode=False, conditioning=conditioning).latents
    checks = [Check("rerun", "bit-identical", compare(again, ref, rtol=0.0, atol=0.0, name="rerun"))]
    if batch_vs_single and cfg.num_images > 1:
        for i in range(cfg.num_images):
            single = replace(
                cfg, prompts=(cfg.prompts[i],), negative_prompts=(cfg.negative_prompts[i],), seed=cfg.seed + i
            )
            lat = pipe.generate(single, decode=False).latents
            name = f"image {i} alone (seed {cfg.seed + i})"
            # |a - b| <= tol * (1 + |b|): batch composition changes CPU float32 rounding, and
            # guidance scales amplify it in proportion to the latents' magnitude
            tol = 0.0 if cfg.batch_invariant else atol_batch
            report = compare(lat, ref[i : i + 1], rtol=tol, atol=tol, name=name)
            checks.append(Check(name, "bit-identical" if tol == 0 else f"within {tol:g} (rel+abs)", report))
    if strict:
        with deterministic_algorithms():
            lat = pipe.generate(cfg, decode=False, conditioning=conditioning).latents
        report = compare(lat, ref, rtol=0.0, atol=0.0, name="deterministic algorithms")
        checks.append(Check("deterministic algorithms", "bit-identical", report))
    return checks
