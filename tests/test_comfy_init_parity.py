"""KSampler ``denoise`` < 1 and a ``LoadLatent`` input (ComfyUI's SaveLatent file): ``diffguide comfy run``
vs ComfyUI's own nodes on the same workflow JSON (tests/comfy_workflow_support.py drives ComfyUI).

ComfyUI computes the sigmas of ``int(steps / denoise)`` steps and keeps the last ``steps + 1``; x starts
as ``noise_scaling(sigma_0, noise, process_latent_in(latent))``. Cases: a flow model (AuraFlow, 4-D
latent), Qwen-Image (5-D latent, Wan21 per-channel mean/std) and an epsilon model (SDXL, where ComfyUI
adds the latent also at denoise 1); final LATENTs within 1e-4 (SDXL: the model-space bound of
test_comfy_workflow_parity). Skipped only when ComfyUI core is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_workflow_support import (
    aura_workflow,
    comfy_execute,
    load_comfy_nodes,
    qwen_workflow,
    sdxl_pag_workflow,
)
from safetensors.torch import save_file
from test_comfy_workflow_parity import _sdxl_check, aura_models, models, sdxl  # noqa: F401 (fixtures)

from diffguide import ConfigError
from diffguide.comfy_workflow import WorkflowError, execute, explain, load

TOL = 1e-4


def save_latent(path, x, version: bool = True):
    """A .latent file as ComfyUI's SaveLatent writes it."""
    tensors = {"latent_tensor": x.contiguous()}
    if version:
        tensors["latent_format_version_0"] = torch.tensor([])
    save_file(tensors, str(path))
    return path


def with_latent(wf, path, denoise):
    """The workflow on LoadLatent(path's name) (ComfyUI's input directory set to its folder; diffguide
    finds it next to the workflow file) with KSampler's denoise."""
    wf = json.loads(json.dumps(wf))
    if path is not None:
        load_comfy_nodes().folder_paths.set_input_directory(str(path.parent))
        wf["7"] = {"class_type": "LoadLatent", "inputs": {"latent": path.name}}
    wf["8"]["inputs"]["denoise"] = denoise
    return wf


def write(tmp_path, wf):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    return path


AURA_CASES = {
    "LoadLatent, denoise 0.6": (True, 0.6),
    "LoadLatent, denoise 1": (True, 1.0),
    "empty, denoise 0.5": (False, 0.5),
}


@pytest.mark.parametrize("case", list(AURA_CASES))
def test_auraflow_denoise_matches_comfyui(aura_models, tmp_path, case):  # noqa: F811
    loaded, denoise = AURA_CASES[case]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 2
    path = save_latent(tmp_path / "start.latent", x) if loaded else None
    wf = with_latent(aura_workflow(aura_models), path, denoise)
    run = load(write(tmp_path, wf), aura_models)
    ours = execute(run).latents
    theirs = comfy_execute(wf, aura_models)
    diff = (ours - theirs).abs().max().item()
    print(f"AuraFlow workflow [{case}]: max abs diff {diff:.3g} (|latent| max {theirs.abs().max():.3g})")
    assert ours.shape == theirs.shape == (1, 4, 16, 16)
    assert diff <= TOL
    if denoise < 1:
        assert run.config.strength == denoise
        assert any(f"denoise {denoise:g}" in line for line in explain(run))
        full = execute(load(write(tmp_path, with_latent(wf, None, 1.0)), aura_models)).latents
        assert (full - theirs).abs().max() > 100 * TOL  # denoise changed ComfyUI's result


def test_qwen_loadlatent_denoise_matches_comfyui(models, tmp_path):  # noqa: F811
    x = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    wf = with_latent(qwen_workflow(models), save_latent(tmp_path / "q.latent", x), 0.5)
    ours = execute(load(write(tmp_path, wf), models)).latents
    theirs = comfy_execute(wf, models)
    diff = (ours - theirs).abs().max().item()
    print(f"Qwen-Image workflow [LoadLatent, denoise 0.5]: max abs diff {diff:.3g}")
    assert ours.shape == theirs.shape == (1, 16, 1, 8, 8)
    assert diff <= TOL


@pytest.mark.parametrize("denoise", [0.6, 1.0])
def test_sdxl_loadlatent_denoise_matches_comfyui(sdxl, tmp_path, denoise):  # noqa: F811
    """An epsilon model: ComfyUI adds the latent to the scaled noise also at denoise 1."""
    gp, models_dir = sdxl
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3
    old = save_latent(tmp_path / "old.latent", x * 0.18215, version=False)  # LoadLatent's old-format rule
    wf = with_latent(sdxl_pag_workflow(models_dir), old, denoise)
    ours = execute(load(write(tmp_path, wf), models_dir), gp).latents
    theirs = comfy_execute(wf, models_dir)
    assert ours.shape == theirs.shape == (1, 4, 16, 16)
    _sdxl_check(f"SDXL PAG workflow [LoadLatent, denoise {denoise:g}]", ours, theirs)


def test_loadlatent_errors(aura_models, tmp_path):  # noqa: F811
    wf = aura_workflow(aura_models)
    missing = with_latent(wf, tmp_path / "nope.latent", 0.5)
    with pytest.raises(
        WorkflowError, match=r"^node 7 \(LoadLatent\): latent file '.*nope.latent' does not exist$"
    ):
        load(write(tmp_path, missing), aura_models)
    plain = tmp_path / "plain.safetensors"
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, str(plain))
    with pytest.raises(
        WorkflowError, match=r"is not a ComfyUI latent file \(SaveLatent's 'latent_tensor' key\)"
    ):
        load(write(tmp_path, with_latent(wf, plain, 0.5)), aura_models)
    with pytest.raises(WorkflowError, match=r"^node 8 \(KSampler\): denoise must be in \(0, 1\], got 0$"):
        load(write(tmp_path, with_latent(wf, None, 0.0)), aura_models)
    wide = save_latent(tmp_path / "wide.latent", torch.zeros(1, 16, 16, 16))  # an SD3 latent for AuraFlow
    run = load(write(tmp_path, with_latent(wf, wide, 0.5)), aura_models)
    with pytest.raises(ConfigError) as err:
        execute(run)
    assert str(err.value) == (
        "initial latents have shape [1, 16, 16, 16]; this model at 128x128 px takes [1, 4, 16, 16]"
    )
