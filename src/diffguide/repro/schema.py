"""The schema of a manifest as far as ``replay`` acts on it, checked before anything is loaded.

A manifest is read from a file the user hands us, so every field replay uses is validated
here: its type, its range, and that it is consistent with the rest (an image index within
the batch). A wrong field is a :class:`~diffguide.errors.ConfigError` that names it, e.g.
``manifest field environment.threads: must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..checks import check_device, check_rows_schedule, is_int
from ..errors import ConfigError, DiffguideError
from ..guidance.base import GuidanceTerm
from ..guidance.registry import term_from_dict
from ..pipeline import GenerateConfig

DTYPES = ("float32", "float16", "bfloat16")
REQUIRED = ("prompts", "negative_prompts", "guidance", "steps", "seed", "scheduler")


def _bad(name: str, why: str, value: Any) -> ConfigError:
    shown = repr(value)
    return ConfigError(
        f"manifest field {name}: {why}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    )


def _section(m: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = m.get(name, {})
    if not isinstance(value, Mapping):
        raise _bad(name, "must be an object", value)
    return value


@dataclass(frozen=True)
class ReplaySpec:
    """What replay needs from a manifest, validated."""

    config: GenerateConfig
    index: int
    source: str | None
    loras: tuple[tuple[str, float], ...]
    dtype: str
    device: str
    threads: int | None
    fallbacks: dict[int, int]
    latents_hash: str | None
    hashes: dict[str, str]


def config_from_manifest(manifest: Mapping[str, Any]) -> GenerateConfig:
    """The :class:`GenerateConfig` a manifest was made with: every recorded field of the config
    (older manifests lack newer fields, which keep their defaults, except ``prefix_sharing`` and
    ``compact_text``: a manifest without one was made before it existed, so it replays without it)."""
    p = _section(manifest, "parameters")
    missing = [k for k in REQUIRED if k not in p]
    if missing:
        raise DiffguideError(f"manifest lacks {missing}; it was not written by a compatible diffguide")
    for key in ("prompts", "negative_prompts", "guidance"):
        if not isinstance(p[key], (list, tuple)):
            raise _bad(f"parameters.{key}", "must be a list", p[key])
    kwargs = {f.name: p[f.name] for f in fields(GenerateConfig) if f.name in p}
    kwargs.setdefault("prefix_sharing", False)  # manifests before the switch were made without sharing
    kwargs.setdefault("compact_text", False)  # and before text compaction, with every text token
    kwargs.update(
        prompts=tuple(p["prompts"]),
        negative_prompts=tuple(p["negative_prompts"]),
        guidance=tuple(_term(d, i) for i, d in enumerate(p["guidance"])),
    )
    if isinstance(p.get("comfy_sampling"), Mapping):  # a ComfyUI ModelSampling* override
        from ..sampling.comfy import ComfyShift

        try:
            kwargs["comfy_sampling"] = ComfyShift(**p["comfy_sampling"])
        except TypeError as err:
            raise _bad(
                "parameters.comfy_sampling", "must be {kind, shift, multiplier}", p["comfy_sampling"]
            ) from err
    if isinstance(p.get("dynamic_thresholding"), Mapping):
        from ..sampling.knobs import DynamicThreshold

        try:
            kwargs["dynamic_thresholding"] = DynamicThreshold(**p["dynamic_thresholding"])
        except TypeError as err:
            raise _bad(
                "parameters.dynamic_thresholding",
                "must be {percentile, max_value}",
                p["dynamic_thresholding"],
            ) from err
    if "init_latents" in kwargs:  # img2img: the recorded file again, checked against its hash
        from ..sampling.init import replay_init_latents

        kwargs["init_latents"] = replay_init_latents(p["init_latents"])
    try:
        return GenerateConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"manifest field parameters: {err}") from None


def _term(d: Any, i: int) -> GuidanceTerm:
    if not isinstance(d, Mapping):
        raise _bad(f"parameters.guidance[{i}]", "must be an object", d)
    try:
        return term_from_dict(d)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise _bad(f"parameters.guidance[{i}]", f"is not a guidance term ({err})", d) from None
    except ConfigError as err:
        raise ConfigError(f"manifest field parameters.guidance[{i}]: {err}") from None


def validate_manifest(manifest: Mapping[str, Any], *, device: str | None = None) -> ReplaySpec:
    """Check every field replay acts on; ``device`` overrides the recorded one (checked instead)."""
    config = config_from_manifest(manifest)
    image, env, model = (
        _section(manifest, "image"),
        _section(manifest, "environment"),
        _section(manifest, "model"),
    )
    index = image.get("index", 0)
    if not is_int(index) or not 0 <= index < config.num_images:
        raise _bad("image.index", f"must be an integer in [0, {config.num_images}) (the batch size)", index)
    source = model.get("source")
    if source is not None and not (isinstance(source, str) and source):
        raise _bad("model.source", "must be a path", source)
    dtype = env.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _bad("environment.dtype", f"must be one of {', '.join(DTYPES)}", dtype)
    threads = env.get("threads")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise _bad("environment.threads", "must be an integer >= 1", threads)
    chosen = device if device is not None else env.get("device", "cpu")
    try:
        chosen = check_device(chosen)
    except ConfigError as err:
        raise ConfigError(
            f"{'--device' if device is not None else 'manifest field environment.device'}: {err}"
        ) from None
    return ReplaySpec(
        config=config,
        index=index,
        source=source,
        loras=_loras(model.get("loras", [])),
        dtype=dtype,
        device=chosen,
        threads=threads,
        fallbacks=_fallbacks(_section(manifest, "engine").get("out_of_memory_fallbacks", {})),
        latents_hash=_optional_str(_section(manifest, "output").get("latents_hash"), "output.latents_hash"),
        hashes=_hashes(model.get("hashes", {})),
    )


def _loras(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, (list, tuple)):
        raise _bad("model.loras", "must be a list", value)
    out = []
    for i, lo in enumerate(value):
        ok = isinstance(lo, Mapping) and isinstance(lo.get("path"), str)
        scale = lo.get("scale", 1.0) if isinstance(lo, Mapping) else None
        if (
            not ok
            or isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
        ):
            raise _bad(f"model.loras[{i}]", "must be {path: str, scale: finite number}", lo)
        out.append((lo["path"], float(scale)))
    return tuple(out)


def _fallbacks(value: Any) -> dict[int, int]:
    name = "engine.out_of_memory_fallbacks"
    if not isinstance(value, Mapping):
        raise _bad(name, "must be an object {model evaluation: rows}", value)
    schedule: dict[Any, Any] = {}
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise _bad(name, "keys must be model evaluations >= 0", k)
        schedule[int(k)] = v
    try:
        return check_rows_schedule(schedule)
    except ConfigError as err:
        raise ConfigError(f"manifest field {name}: {err}") from None


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(name, "must be a string", value)
    return value


def _hashes(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise _bad("model.hashes", "must map component names to hash strings", value)
    return dict(value)
