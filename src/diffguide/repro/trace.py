"""Step traces: per-step tensors of a run, saved as one .safetensors file.

A trace records, for every model evaluation, the noise level, the latents before and after
the scheduler step, every branch's prediction, the guided prediction, and optionally the
outputs of selected modules (forward hooks, installed for the run and removed afterwards).
Keys are ``step_0003/latents_in``, ``step_0003/pred/cond``, ``step_0003/guided``,
``step_0003/module/mid_block.attentions.0/cond`` (a module's output rows, split per branch),
``step_0003/latents_out``; the file's
metadata holds the manifest and the per-step sigmas and timesteps as JSON.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from ..errors import DiffguideError
from ..io import write_new
from ..sampling.loop import StepState

STEP_FIELDS = ("latents_in", "module", "pred", "guided", "latents_out")


def step_key(index: int, name: str) -> str:
    return f"step_{index:04d}/{name}"


@dataclass
class TraceRecorder:
    """A sampling-loop callback that keeps every step's tensors (on the CPU)."""

    module_pattern: str | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)
    _pending: dict[str, list[Tensor]] = field(default_factory=dict)
    _calls: dict[str, int] = field(default_factory=dict)

    def __call__(self, state: StepState) -> None:
        i = state.step.index
        self.steps.append({"index": i, "sigma": state.step.sigma, "timestep": state.step.timestep})
        self.tensors[step_key(i, "latents_in")] = state.latents_in.detach().cpu().clone()
        branches = list(state.preds)  # the engine's row layout: branch k holds rows k*B..(k+1)*B
        for name, outs in self._pending.items():
            rows = torch.cat(outs)  # the chunks of one step, in row order
            if rows.ndim and rows.shape[0] % len(branches) == 0:
                for k, part in enumerate(rows.chunk(len(branches))):
                    self.tensors[step_key(i, f"module/{name}/{branches[k]}")] = part
            else:
                self.tensors[step_key(i, f"module/{name}")] = rows
        self._pending = {}
        for branch, pred in state.preds.items():
            self.tensors[step_key(i, f"pred/{branch}")] = pred.detach().cpu().clone()
        self.tensors[step_key(i, "guided")] = state.guided.detach().cpu().clone()
        self.tensors[step_key(i, "latents_out")] = state.latents_out.detach().cpu().clone()

    def on_retry(self) -> None:
        """The engine repeats this step's forwards (out-of-memory retry): drop the module outputs
        the abandoned attempt recorded, or they would be split into the wrong branches."""
        self._pending = {}
        self._calls = {}

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[list[str]]:
        """Record outputs of modules whose names match ``module_pattern`` (fnmatch syntax)."""
        if not self.module_pattern:
            yield []
            return
        names = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, self.module_pattern)]
        if not names:
            raise DiffguideError(
                f"--trace-modules '{self.module_pattern}' matches no module; patterns use fnmatch syntax "
                "on full names, e.g. 'mid_block.*' or 'down_blocks.1.attentions.0'"
            )
        modules = dict(model.named_modules())
        handles = []

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                if isinstance(out, Tensor):
                    # a module may run several times in one forward (a shared activation): key each call
                    n = self._calls.get(name, 0)
                    self._calls[name] = n + 1
                    key = name if n == 0 else f"{name}#{n}"
                    self._pending.setdefault(key, []).append(out.detach().cpu().clone())

            return hook

        def reset_calls(module: nn.Module, args: Any) -> None:
            self._calls = {}

        try:
            handles.append(model.register_forward_pre_hook(reset_calls))
            for name in names:
                handles.append(modules[name].register_forward_hook(make_hook(name)))
            yield names
        finally:
            for h in handles:
                h.remove()

    def save(self, path: str | Path, manifest: dict[str, Any]) -> Path:
        """Write the trace to ``path`` atomically; DiffguideError if ``path`` exists (nothing is
        overwritten). Check with :func:`check_trace_path` before sampling to fail early."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "diffguide-trace/1",
            "manifest": json.dumps(manifest),
            "steps": json.dumps(self.steps),
        }
        data = save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=meta)
        return write_new(path, data, "trace file")  # never overwrites (no-clobber, like images)


def check_trace_path(path: str | Path) -> None:
    """Fail before sampling if a trace cannot be saved at ``path`` without overwriting something."""
    p = Path(path)
    if p.is_dir():
        raise DiffguideError(f"--trace '{p}' is a folder; give a file name, e.g. '{p / 'trace.safetensors'}'")
    if p.exists() or p.is_symlink():
        raise DiffguideError(
            f"--trace '{p}' already exists; a trace never overwrites a file: choose a new name or remove it"
        )


@dataclass(frozen=True)
class Trace:
    tensors: dict[str, Tensor]
    steps: list[dict[str, float]]
    manifest: dict[str, Any]

    def keys_of_step(self, index: int) -> list[str]:
        """The step's keys in execution order: input, modules, branches, guided, output."""
        prefix = step_key(index, "")
        keys = [k for k in self.tensors if k.startswith(prefix)]
        return sorted(keys, key=lambda k: (STEP_FIELDS.index(k[len(prefix) :].split("/")[0]), keys.index(k)))


def is_trace(path: str | Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format", "").startswith("diffguide-trace")
    except Exception:
        return False


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.exists():
        raise DiffguideError(f"trace file '{path}' does not exist")
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if not meta.get("format", "").startswith("diffguide-trace"):
            raise DiffguideError(f"'{path}' is a safetensors file but not a diffguide trace")
        for key in f.keys():  # noqa: SIM118
            tensors[key] = f.get_tensor(key)
    return Trace(tensors, json.loads(meta["steps"]), json.loads(meta["manifest"]))
