"""Name the stage where two runs part: inputs, model, sampling, guidance, sampler step.

From two traces (each carries its run's manifest), in the order a run executes:

1. inputs: conditioning values (hash per side) and metadata (e.g. ComfyUI's ``attention_mask``
   entry), the noise policy, and the initial latents (``step_0000/latents_in``);
2. model: the weights after LoRA (hash per component), the LoRAs and their strengths, the dtype;
   and, per step, branch predictions that differ on equal inputs;
3. sampling: the sigmas after the shift (the model sampling's config);
4. guidance: the terms (e.g. CFGNorm present or not) and, per step, the guided prediction when
   every branch prediction agrees (before vs after CFGNorm / post-CFG terms);
5. sampler step: the latents after the step when the guided prediction agrees.

Each finding carries the metrics of a tensor comparison where there is one: max and mean abs
error, max and mean relative error (``|a - b| / (|b| + eps)``; where the largest relative
error sits on a near-zero reference element, the report says so: it is inflated, not a cause).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .diff import DiffReport, compare
from .trace import Trace, step_key

STAGES = ("inputs", "model", "sampling", "guidance", "sampler step")


@dataclass(frozen=True)
class Finding:
    stage: str
    what: str
    detail: str
    step: int | None = None
    report: DiffReport | None = None

    def line(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        text = f"{self.stage}{where}: {self.what}: {self.detail}"
        r = self.report
        if r is not None and r.max_abs_err is not None:
            text += (
                f" (max abs {r.max_abs_err:.3g}, mean abs {r.mean_abs_err:.3g}, "
                f"max rel {r.max_rel_err:.3g}, mean rel {r.mean_rel_err:.3g})"
            )
            if r.near_zero_note:
                text += " [max rel inflated: on a near-zero reference element]"
        return text


def _get(d: Any, *path: str) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _differs(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str)


def _static(ma: dict[str, Any], mb: dict[str, Any]) -> list[Finding]:
    out = []
    for side in ("cond", "uncond"):
        if _differs(_get(ma, "conditioning", side), _get(mb, "conditioning", side)):
            out.append(Finding("inputs", f"conditioning values ({side})", "tensor hashes differ"))
    meta_a, meta_b = _get(ma, "conditioning", "metadata") or {}, _get(mb, "conditioning", "metadata") or {}
    if _differs(meta_a, meta_b):
        keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
        out.append(
            Finding("inputs", "conditioning metadata", f"differs in {', '.join(keys)}: {meta_a} vs {meta_b}")
        )
    na, nb = ma.get("noise", {}), mb.get("noise", {})
    keys = sorted(k for k in set(na) | set(nb) if na.get(k) != nb.get(k))
    if keys:
        out.append(
            Finding("inputs", "noise", "; ".join(f"{k}: {na.get(k)!r} vs {nb.get(k)!r}" for k in keys))
        )
    ha, hb = _get(ma, "model", "hashes") or {}, _get(mb, "model", "hashes") or {}
    for comp in sorted(set(ha) | set(hb)):
        if ha.get(comp) != hb.get(comp):
            out.append(Finding("model", f"weights of {comp} (after LoRA)", "hashes differ"))
    la, lb = _get(ma, "model", "loras") or [], _get(mb, "model", "loras") or []
    if _differs(la, lb):
        fmt = lambda ls: [f"{lo.get('path', '?').rsplit('/', 1)[-1]}@{lo.get('scale')}" for lo in ls]  # noqa: E731
        out.append(Finding("model", "LoRA", f"{fmt(la)} vs {fmt(lb)}"))
    da, db = _get(ma, "environment", "dtype"), _get(mb, "environment", "dtype")
    if da != db:
        out.append(Finding("model", "dtype", f"{da} vs {db}"))
    sa, sb = ma.get("scheduler", {}), mb.get("scheduler", {})
    if _differs(sa.get("sigmas"), sb.get("sigmas")) or _differs(sa.get("config"), sb.get("config")):
        rep = None
        if sa.get("sigmas") and sb.get("sigmas") and len(sa["sigmas"]) == len(sb["sigmas"]):
            rep = compare(torch.tensor(sa["sigmas"]), torch.tensor(sb["sigmas"]), name="sigmas")
        out.append(
            Finding(
                "sampling",
                "sigmas after the shift",
                f"config {sa.get('config')} vs {sb.get('config')}",
                report=rep,
            )
        )
    ga, gb = _get(ma, "parameters", "guidance"), _get(mb, "parameters", "guidance")
    if _differs(ga, gb):
        out.append(
            Finding(
                "guidance",
                "terms",
                f"{[t.get('method') for t in ga or []]} vs {[t.get('method') for t in gb or []]}",
            )
        )
    return out


def _steps(a: Trace, b: Trace, rtol: float, atol: float) -> list[Finding]:
    """The first step where a tensor differs, named by the stage that made it differ."""
    for i in range(min(len(a.steps), len(b.steps))):
        sa, sb = a.steps[i], b.steps[i]
        if sa.get("sigma") != sb.get("sigma") or sa.get("timestep") != sb.get("timestep"):
            return [Finding("sampling", "noise level", f"sigma {sa.get('sigma')} vs {sb.get('sigma')}", i)]
        key = step_key(i, "latents_in")
        if key in a.tensors and key in b.tensors:
            r = compare(a.tensors[key], b.tensors[key], rtol, atol, name=key)
            if not r.ok:
                what = "initial noise" if i == 0 else "latents entering the step"
                return [Finding("inputs" if i == 0 else "sampler step", what, "differ", i, r)]
        preds = sorted(k for k in a.tensors if k.startswith(step_key(i, "pred/")) and k in b.tensors)
        for k in preds:
            r = compare(a.tensors[k], b.tensors[k], rtol, atol, name=k)
            if not r.ok:
                return [
                    Finding("model", f"prediction {k.split('/', 1)[1]}", "differs on equal latents", i, r)
                ]
        key = step_key(i, "guided")
        r = compare(a.tensors[key], b.tensors[key], rtol, atol, name=key)
        if not r.ok:
            return [Finding("guidance", "guided prediction", "differs on equal branch predictions", i, r)]
        key = step_key(i, "latents_out")
        r = compare(a.tensors[key], b.tensors[key], rtol, atol, name=key)
        nxt_a, nxt_b = _next_sigma(a, i), _next_sigma(b, i)
        if not r.ok and nxt_a != nxt_b:
            return [Finding("sampling", "the step's target noise level", f"sigma {nxt_a} vs {nxt_b}", i, r)]
        if not r.ok:
            return [
                Finding(
                    "sampler step", "latents after the step", "differ on an equal guided prediction", i, r
                )
            ]
    return []


def _next_sigma(t: Trace, i: int) -> float | None:
    sigmas = _get(t.manifest, "scheduler", "sigmas") or []
    return sigmas[i + 1] if i + 1 < len(sigmas) else None


def diagnose(a: Trace, b: Trace, rtol: float = 1e-5, atol: float = 1e-6) -> list[Finding]:
    """Every difference found: first the run's settings that differ (causes), in stage order, then
    the first step and tensor where the traces differ (the symptom, named by its stage). The first
    finding is where the runs part. Empty: the runs agree."""
    # the dtype first: it also changes the inputs' hashes (conditioning is cast to the model's dtype)
    static = sorted(_static(a.manifest, b.manifest), key=lambda f: (f.what != "dtype", STAGES.index(f.stage)))
    return static + _steps(a, b, rtol, atol)
