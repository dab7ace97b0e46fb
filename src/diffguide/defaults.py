"""The one table of defaults, shared by the Python API and the command line.

:class:`GenerateConfig` (``pipeline.py``), :class:`~diffguide.guidance.cfg.CFG`,
:meth:`GuidedPipeline.from_pretrained` and ``diffguide generate`` all take their defaults
from :data:`DEFAULTS`, so a run with no options is the same run from both sides. They are
chosen for the bundled model (``diffguide.default_model()``): 20 Euler steps with CFG 4 is
the README's main job and its sample grid (docs/quality.md: CFG 3-5 is where prompt accuracy
saturates on this model). For SD1.5 checkpoints diffusers' pipelines use CFG 7.5 and 50 steps:
pass them explicitly.

This module imports no torch, diffusers or transformers (the CLI reads it to build ``--help``).
``python -m diffguide.defaults`` prints the table docs/cli.md quotes (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DiffguideError

#: Scheduler names (``sampling.schedulers.SCHEDULERS`` maps them to diffusers classes).
SCHEDULER_NAMES: tuple[str, ...] = (
    "euler",
    "euler_a",
    "heun",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
    "ddpm",
)
#: Noise policies: as diffusers' pipelines, or as ComfyUI's KSampler.
NOISE_POLICIES: tuple[str, ...] = ("diffusers", "comfy")
#: ComfyUI sigma schedules of the comfy noise policy (``sampling.comfy.COMFY_SCHEDULERS``).
COMFY_SCHEDULE_NAMES: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "simple",
    "sgm_uniform",
    "ddim_uniform",
    "kl_optimal",
)

DEFAULT_MODEL_NAME = "tiny-sd"  # src/diffguide/assets/tiny-sd, a diffusers folder shipped with the package
#: Models shipped with the package (diffusers folders under src/diffguide/assets/), selectable by name
#: (``--model tiny-sd3``, ``GuidedPipeline.from_pretrained("tiny-sd3")``): tiny-sd, a UNet (SD1.5
#: architecture, epsilon prediction), and tiny-sd3, a flow-matching transformer (SD3 architecture).
BUNDLED_MODELS: tuple[str, ...] = ("tiny-sd", "tiny-sd3")
AUTO_DEVICE = "cuda if available, else cpu"


def _setting(cli: str, api: str, meaning: str, shown: str | None = None) -> Any:
    return field(metadata={"cli": cli, "api": api, "meaning": meaning, "shown": shown})


@dataclass(frozen=True)
class Defaults:
    """Default of every run setting that both the API and the CLI expose."""

    steps: int = _setting("`-s, --steps`", "`steps=`", "sampling steps")
    cfg: float = _setting("`--cfg`", "`CFG()`, and `guidance=None`", "CFG scale (1 = off)")
    pag: float = _setting("`--pag`", "no PAG term", "PAG scale (0 = off)")
    tpg: float = _setting("`--tpg`", "no TPG term", "TPG scale (0 = off)")
    scheduler: str = _setting("`--scheduler`", "`scheduler=`", "sampler")
    seed: int = _setting("`--seed`", "`seed=`", "seed of image 0; image i uses seed + i")
    eta: float = _setting("`--eta`", "`eta=`", "DDIM eta")
    noise: str = _setting("`--noise`", "`noise=`", "noise policy")
    shift: float = _setting("`--shift`", "`shift=`", "sampling time shift (1 = off)")
    size: int | None = _setting(
        "`-W`, `-H`", "`width=`, `height=`", "image size in pixels", "the model's native size"
    )
    device: str | None = _setting("`--device`", "`from_pretrained(device=)`", "device", AUTO_DEVICE)
    dtype: str = _setting("`--dtype`", "`from_pretrained(dtype=)`", "weights and compute dtype")
    model: str | None = _setting(
        "`-m, --model`",
        "`from_pretrained()` path",
        "model ($DIFFGUIDE_MODEL on the CLI)",
        "the bundled tiny-sd (`diffguide.default_model()`)",
    )

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(meaning, default as shown, CLI option, API argument) per setting."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = f.metadata["shown"] or (f"`{value}`" if isinstance(value, str) else f"{value:g}")
            out.append((f.metadata["meaning"], shown, f.metadata["cli"], f.metadata["api"]))
        return out


DEFAULTS = Defaults(
    steps=20,
    cfg=4.0,
    pag=0.0,
    tpg=0.0,
    scheduler="euler",
    seed=0,
    eta=0.0,
    noise="diffusers",
    shift=1.0,
    size=None,
    device=None,
    dtype="float32",
    model=None,
)


def markdown_table(defaults: Defaults = DEFAULTS) -> str:
    """The defaults as the markdown table in docs/cli.md."""
    lines = ["| setting | default | CLI | Python |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in defaults.rows()]
    return "\n".join(lines)


def default_model() -> Path:
    """The bundled default model: a diffusers folder inside the package (``assets/tiny-sd``).

    A tiny SD1.5-architecture model trained on digits and garments (docs/default-model.md);
    ``GuidedPipeline.from_pretrained()`` with no path loads it.
    """
    return bundled_model(DEFAULT_MODEL_NAME)


def bundled_model(name: str) -> Path:
    """The folder of a model shipped with the package (one of :data:`BUNDLED_MODELS`)."""
    from importlib import resources

    if name not in BUNDLED_MODELS:
        raise DiffguideError(f"no bundled model '{name}' (bundled: {', '.join(BUNDLED_MODELS)})")
    folder = Path(str(resources.files("diffguide") / "assets" / name))
    if not (folder / "model_index.json").is_file():
        raise DiffguideError(f"this installation of diffguide has no bundled model ({folder} is missing)")
    return folder


def model_path(model: str | Path) -> str | Path:
    """``model`` itself, or the bundled model's folder when it is a bundled model's name
    (:data:`BUNDLED_MODELS`) and no file or folder of that name exists here."""
    if str(model) in BUNDLED_MODELS and not Path(model).exists():
        return bundled_model(str(model))
    return model


def default_device() -> str:
    """The default device: ``cuda`` when torch sees a CUDA device, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
