"""Reference implementations for the prediction-combining guidance terms: diffusers' guiders and
ComfyUI's node functions, called on given tensors (no model), with the scale conventions mapped."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import comfy_support
import pytest
import torch

# Imported by comfy_api.latest (video types) and comfy.ldm.cascade at module level (through
# nodes_model_advanced), never used by the guidance nodes.
_NODE_STANDINS = ("av", "torchvision", "torchaudio")


def comfy_node_module(name: str) -> Any:
    """``comfy_extras.<name>``, with import-only stand-ins for missing _NODE_STANDINS (removed again)."""
    try:
        comfy_support.load_comfy()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    missing = [n for n in _NODE_STANDINS if importlib.util.find_spec(n) is None]
    standin_dir = Path(tempfile.mkdtemp(prefix="diffguide-comfy-node-standins-"))
    for mod in missing:
        (standin_dir / mod).mkdir()
        (standin_dir / mod / "__init__.py").write_text(comfy_support._LENIENT_STANDIN)
    sys.path.insert(0, str(standin_dir))
    try:
        return importlib.import_module(f"comfy_extras.{name}")
    finally:
        for mod in list(sys.modules):
            if mod.split(".")[0] in missing:
                del sys.modules[mod]
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ not in missing]
        sys.path.remove(str(standin_dir))
        shutil.rmtree(standin_dir, ignore_errors=True)


class Patcher:
    """The ModelPatcher methods the guidance nodes call (clone() is itself), filling model_options."""

    def __init__(self) -> None:
        self.model_options: dict[str, Any] = {}

    def clone(self) -> Patcher:
        return self

    def set_model_sampler_pre_cfg_function(
        self, fn: Callable, disable_cfg1_optimization: bool = False
    ) -> None:
        self.model_options.setdefault("sampler_pre_cfg_function", []).append(fn)

    def set_model_sampler_cfg_function(self, fn: Callable, disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_cfg_function"] = fn

    def set_model_sampler_post_cfg_function(
        self, fn: Callable, disable_cfg1_optimization: bool = False
    ) -> None:
        self.model_options.setdefault("sampler_post_cfg_function", []).append(fn)


def comfy_guided(
    patcher: Patcher, x: torch.Tensor, sigma: float, c0: torch.Tensor, u0: torch.Tensor, w: float
):
    """ComfyUI's own ``comfy.samplers.sampling_function`` (pre-CFG hooks, cfg_function, post-CFG
    hooks) with the model's x0 predictions c0, u0 given (``sampler_calc_cond_batch_function``), at
    its model input x: the guided x0."""
    from comfy.samplers import sampling_function

    options = dict(patcher.model_options)
    options["sampler_calc_cond_batch_function"] = lambda args: [c0, u0]
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    return sampling_function(None, x, s, [{}], [{}], w, model_options=options)


def diffusers_guided(
    guider: Any, c: torch.Tensor, u: torch.Tensor, step: int = 0, steps: int = 10
) -> torch.Tensor:
    """A diffusers guider's ``forward`` at one step (its state set as the modular pipelines do)."""
    guider.set_state(step, steps, torch.tensor(999))
    return guider.forward(c, u).pred
