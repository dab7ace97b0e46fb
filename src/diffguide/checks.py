"""Checks of user input that several layers share: types and ranges of run parameters, seeds,
devices, chunking schedules, and warnings about prompts and sizes the model cannot honour.

Every check raises :class:`~diffguide.errors.ConfigError` with a one-line message that names
the wrong value; nothing here touches a model or a file.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

from .errors import ConfigError

#: torch generators take seeds in [0, 2**64 - 1]; image i of a batch uses seed + i.
MAX_SEED = 2**64 - 1
#: A side longer than this many times the model's native side gets a warning.
SIZE_WARN_FACTOR = 4


class DiffguideWarning(UserWarning):
    """Something the run will do that the user probably did not mean (shown once per occurrence)."""


class PromptTruncatedWarning(DiffguideWarning):
    """A prompt is longer than the text encoder's window; the tail is dropped."""


class SizeWarning(DiffguideWarning):
    """The requested size is far beyond the model's native size."""


class GuidanceWarning(DiffguideWarning):
    """A guidance setting that is known to misbehave on this kind of model."""


def is_int(value: Any) -> bool:
    """A true integer (``bool`` and ``2.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    if not is_int(value):
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return int(value)


def check_number(value: Any, name: str, *, finite: bool = True) -> float:
    """A real number (not a bool, not a string); finite unless ``finite=False``."""
    if isinstance(value, bool) or not isinstance(value, Real) or (finite and not math.isfinite(float(value))):
        raise ConfigError(
            f"{name} must be a {'finite ' if finite else ''}number, got {type(value).__name__} {value!r}"
        )
    return float(value)


def check_seeds(seed: Any, count: int) -> None:
    """``seed`` .. ``seed + count - 1`` all fit a torch generator (0 .. 2**64 - 1)."""
    check_int(seed, "seed", low=0, high=MAX_SEED)
    if seed + count - 1 > MAX_SEED:
        raise ConfigError(
            f"seed {seed} + {count} images overflows 64 bits (image i uses seed + i; the largest seed is "
            f"2**64 - 1 = {MAX_SEED}): use a seed <= {MAX_SEED - count + 1}"
        )


def check_texts(values: Any, name: str) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, str) for v in values):
        kinds = ", ".join(sorted({type(v).__name__ for v in values})) if isinstance(values, tuple) else ""
        raise ConfigError(f"{name} must be strings, got {kinds or type(values).__name__}")


def check_prompt_arg(prompt: Any, name: str) -> None:
    """A prompt argument: one string or a list/tuple of strings."""
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise ConfigError(
            f"{name} must be a string or a list of strings, got {type(prompt).__name__} {prompt!r}"
        )


def check_guidance(terms: Iterable[Any]) -> None:
    from .guidance.base import GuidanceTerm

    for term in terms:
        if not isinstance(term, GuidanceTerm):
            raise ConfigError(
                f"guidance must be a list of guidance terms such as CFG(5.0), PAG(3.0), TPG(3.0); "
                f"got {type(term).__name__} {term!r}"
            )


def check_rows_schedule(schedule: Mapping[Any, Any] | None) -> dict[int, int]:
    """{model evaluation >= 0: rows per forward >= 1}, as a manifest's out_of_memory_fallbacks."""
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping):
        raise ConfigError(f"rows_schedule must be a dict {{evaluation: rows}}, got {type(schedule).__name__}")
    for k, v in schedule.items():
        if not is_int(k) or k < 0 or not is_int(v) or v < 1:
            raise ConfigError(
                f"rows_schedule entry {k!r}: {v!r} is invalid: keys are model evaluations >= 0, values rows >= 1"
            )
    return dict(schedule)


_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def check_device(name: Any) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and available on this machine."""
    import torch

    if not isinstance(name, str) or not _DEVICE.fullmatch(name.strip().lower()):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps")
    name = name.strip().lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available here; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available here; use --device cpu")
    return name


def warn_long_prompts(
    windows: Sequence[tuple[str, Any, int]], prompts: Iterable[str], what: str = "prompt"
) -> None:
    """One :class:`PromptTruncatedWarning` per distinct prompt longer than a text encoder's window.

    ``windows``: (tokenizer's component name, tokenizer, tokens its encoder reads) per text
    encoder (:meth:`Family.text_windows`). On a model with one encoder the message says "the text
    encoder"; with several it names the encoders that drop tokens and those that read them all
    (SD3's T5 reads 256 tokens where its CLIP encoders read 77)."""
    usable = [(name, tok, limit) for name, tok, limit in windows if tok is not None and 0 < limit < 100_000]
    if not usable:
        return
    seen: set[str] = set()
    for i, prompt in enumerate(prompts):
        if prompt in seen:
            continue
        seen.add(prompt)
        counts = [(name, limit, _count(tok, prompt)) for name, tok, limit in usable]
        cut = [(name, limit, count) for name, limit, count in counts if count > limit]
        if not cut:
            continue
        text = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        if len(cut) == len(counts) and len({(limit, count) for _, limit, count in cut}) == 1:
            _, limit, count = cut[0]  # every encoder has the same window (SD1.5; SDXL's two CLIPs)
            reads = "the text encoder reads" if len(cut) == 1 else "the text encoders read"
            detail = f"has {count} tokens; {reads} {limit}: the last {count - limit} are dropped"
        else:
            parts = [f"{name} reads {limit} of its {count} tokens" for name, limit, count in cut]
            whole = [f"{name} (up to {limit})" for name, limit, count in counts if count <= limit]
            detail = (
                "is cut: " + ", ".join(parts) + ("; all of it reaches " + ", ".join(whole) if whole else "")
            )
        warnings.warn(f"{what} {i} ('{text}') {detail}", PromptTruncatedWarning, stacklevel=3)


def _count(tokenizer: Any, prompt: str) -> int:
    """Tokens of ``prompt`` with the start and end tokens."""
    return len(tokenizer(prompt, truncation=False, verbose=False).input_ids)


def warn_size(width: int, height: int, native: int) -> None:
    """A :class:`SizeWarning` when a side exceeds ``SIZE_WARN_FACTOR`` times the native side."""
    if max(width, height) > SIZE_WARN_FACTOR * native:
        warnings.warn(
            f"{width}x{height} is more than {SIZE_WARN_FACTOR}x the model's native {native}x{native}: "
            f"expect repeated or broken images and a run about {(width * height) // native**2}x longer per step "
            "(attention costs grow faster still)",
            SizeWarning,
            stacklevel=3,
        )


def check_types(cfg: Any) -> None:
    """The types of a :class:`~diffguide.pipeline.GenerateConfig`'s fields, and its seeds (the
    config's own ``validate`` checks ranges and consistency once the types are right)."""
    check_texts(cfg.prompts, "prompts")
    check_texts(cfg.negative_prompts, "negative prompts")
    if not isinstance(cfg.guidance, tuple):
        raise ConfigError(f"guidance must be a tuple of terms, got {type(cfg.guidance).__name__}")
    check_guidance(cfg.guidance)
    check_int(cfg.steps, "steps")
    for name in ("width", "height", "max_rows"):
        value = getattr(cfg, name)
        if value is not None:
            check_int(value, name)
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise ConfigError(f"max_rows must be >= 1, got {cfg.max_rows}")
    for name in ("prefix_sharing", "compact_text"):
        if not isinstance(getattr(cfg, name, True), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    check_number(cfg.eta, "eta", finite=False)  # ranges (NaN included) are the config's own checks
    check_number(cfg.shift, "shift", finite=False)
    for name in ("scheduler", "noise"):
        if not isinstance(getattr(cfg, name), str):
            raise ConfigError(f"{name} must be a name (a string), got {getattr(cfg, name)!r}")
    if cfg.schedule is not None and not isinstance(cfg.schedule, str):
        raise ConfigError(f"schedule must be a name (a string) or None, got {cfg.schedule!r}")
    # the comfy policy's ancestral sampler also seeds a generator with seed + 1
    extra = 1 if cfg.noise == "comfy" and cfg.scheduler == "euler_a" else 0
    check_seeds(cfg.seed, max(len(cfg.prompts), 1) + extra)
