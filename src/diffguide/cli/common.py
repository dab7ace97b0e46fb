"""Option parsing shared by commands: model path, device, dtype, windows, LoRAs, layer specs."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..defaults import default_device, default_model, model_path
from ..errors import ConfigError, DiffguideError, LayerSpecError
from ..quiet import library_noise_off as library_noise_off  # re-exported for the commands

if TYPE_CHECKING:  # torch and the guidance package load lazily: `diffguide --help` needs neither
    from ..guidance.base import Window

MODEL_ENVVAR = "DIFFGUIDE_MODEL"


def model_option(
    help: str = "Diffusers model folder, single-file .safetensors checkpoint, or a bundled model's name "
    "(tiny-sd, tiny-sd3).",
    panel: str | None = None,
) -> Any:
    """The ``--model/-m`` option every model-loading command shares (env: DIFFGUIDE_MODEL)."""
    return typer.Option(
        "--model",
        "-m",
        envvar=MODEL_ENVVAR,
        help=help,
        show_default="the bundled tiny-sd",
        rich_help_panel=panel,
    )


KINDS = {
    "pag": "self-attention modules",
    "tpg": "transformer blocks",
    "slg": "transformer blocks",
}  # what each method's layers are


def plural(count: int, noun: str) -> str:
    """``noun`` (a plural) made singular for a count of 1: 'transformer blocks' -> 'transformer block'."""
    return noun.removesuffix("s") if count == 1 else noun


class DType(enum.StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def default_model_path() -> Path | None:
    """The bundled default model folder, or None while the package ships none."""
    try:
        return default_model()
    except DiffguideError:
        return None


def resolve_model(model: Path | None) -> Path:
    if model is not None:
        return Path(model_path(model))
    default = default_model_path()
    if default is None:
        raise DiffguideError(
            f"no default model yet: pass --model (a diffusers folder or a .safetensors file) or set ${MODEL_ENVVAR}"
        )
    return default


def resolve_device(name: str | None) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked by :func:`diffguide.checks.check_device`);
    None picks cuda when available, else cpu."""
    from ..checks import check_device

    return default_device() if name is None else check_device(name)


def _float(text: str, default: float, option: str, spec: str) -> float:
    text = text.strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{option} '{spec}': '{text}' is not a number") from None
    if math.isnan(value):
        raise ConfigError(f"{option} '{spec}': NaN is not a valid bound")
    return value


WINDOW_SYNTAX = (
    "START:END (fractions of the run, e.g. 0:0.5) and/or sigma:LO:HI (e.g. sigma:1:), comma-separated; "
    "an empty bound is open"
)


def parse_window(spec: str, option: str = "window") -> Window:
    """Parse a window option into a :class:`Window`.

    Comma-separated parts; a term is active where ALL parts hold:

    * ``START:END``: fractions of the run, ``START <= i/n < END`` at model evaluation i of n
      (``0:0.5`` = first half, ``0.25:`` = from a quarter on; empty bounds mean 0 and 1);
    * ``sigma:LO:HI``: noise levels ``LO <= sigma <= HI`` (``sigma:1:`` = sigma >= 1,
      ``sigma::5`` = sigma <= 5).
    """
    from ..guidance.base import Window

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{option}: empty window; use {WINDOW_SYNTAX}")
    start, end, lo, hi = 0.0, 1.0, 0.0, math.inf
    seen: set[str] = set()
    for part in parts:
        fields = part.split(":")
        kind = "sigma" if fields[0].strip().lower() == "sigma" else "fraction"
        if kind in seen:
            raise ConfigError(f"{option} '{spec}': two {kind} ranges; give at most one of each")
        seen.add(kind)
        if kind == "sigma":
            if len(fields) != 3:
                raise ConfigError(f"{option} '{spec}': '{part}' should be sigma:LO:HI, e.g. sigma:1:14")
            lo, hi = _float(fields[1], 0.0, option, spec), _float(fields[2], math.inf, option, spec)
        else:
            if len(fields) != 2:
                raise ConfigError(f"{option} '{spec}': '{part}' is not a window; use {WINDOW_SYNTAX}")
            start, end = _float(fields[0], 0.0, option, spec), _float(fields[1], 1.0, option, spec)
    try:
        return Window(sigma_min=lo, sigma_max=hi, start=start, end=end)
    except ConfigError as err:
        raise ConfigError(f"{option} '{spec}': {err}") from None


def parse_lora(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (the last ``:`` followed by a number is the scale; default 1)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def check_spec(spec: str | None, option: str) -> str | None:
    """A layer spec as given; an empty one is an error (it would otherwise mean the preset)."""
    if spec is not None and not spec.replace(",", "").strip():
        raise LayerSpecError(f"{option}: empty layer spec; name at least one layer (e.g. 'mid' or 'd2.2-9')")
    return spec
