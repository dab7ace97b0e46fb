"""Validation prompt files: YAML, JSON, or plain text (one prompt per line).

YAML / JSON: a list of prompts, or a mapping with ``prompts`` (the list) and optionally
``family`` (which row of :data:`~diffguide.validation.presets.FAMILY_DEFAULTS` to use instead of
the model's own), ``seeds`` (one per prompt) and ``defaults`` (keys applied to every prompt).
A prompt is a string or a mapping with the keys of :data:`PROMPT_KEYS`. Every error is one line
naming the file and line: ``prompts.yaml:7: unknown key 'cfgg' ...``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..checks import is_int
from ..errors import ConfigError, DiffguideError
from ..guidance.base import GuidanceTerm
from ..guidance.cfg import CFG
from ..guidance.embedded import EmbeddedGuidance
from ..guidance.pag import PAG
from ..guidance.registry import term_class
from ..guidance.slg import SLG
from ..sampling.knobs import DynamicThreshold, parse_dynamic_threshold
from .presets import FAMILY_DEFAULTS

#: Keys a prompt entry (or ``defaults``) may have.
PROMPT_KEYS = (
    "prompt", "negative", "seed", "seeds", "size", "width", "height", "steps", "cfg", "pag", "slg",
    "embedded_guidance", "guidance", "scheduler", "shift", "eta", *("s_churn", "s_tmin", "s_tmax", "s_noise", "dynamic_thresholding"),
)  # fmt: skip
#: Sampler-knob keys (GenerateConfig fields of the same names; Karras churn on the euler scheduler).
KNOB_KEYS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
TOP_KEYS = ("prompts", "family", "seeds", "defaults")
#: A ``prompts`` string with one of these endings is a prompt file's path, otherwise a prompt.
PROMPT_FILES = (".yaml", ".yml", ".json", ".txt")


@dataclass(frozen=True)
class ValidationPrompt:
    """One validation prompt; None fields take the family default (or the model's native size)."""

    prompt: str
    negative: str = ""
    seeds: tuple[int, ...] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: tuple[GuidanceTerm, ...] | None = None
    scheduler: str | None = None
    shift: float | None = None
    eta: float | None = None
    knobs: tuple[tuple[str, float], ...] = ()  # (KNOB_KEYS name, value) given by the file
    dynamic_thresholding: DynamicThreshold | None = None
    where: str = ""  # "file:line" for errors


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[ValidationPrompt, ...]
    family: str | None = None  # a FAMILY_DEFAULTS row chosen by the file
    where: str = ""


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}" if where else message)


def _int(value: Any, key: str, where: str) -> int:
    if not is_int(value):
        raise _fail(where, f"'{key}' must be an integer, got {value!r}")
    return int(value)


def _float(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"'{key}' must be a number, got {value!r}")
    return float(value)


def _threshold(value: Any, where: str) -> DynamicThreshold | None:
    if value is None:
        return None
    try:
        return parse_dynamic_threshold(value, "'dynamic_thresholding'")
    except ConfigError as err:
        raise _fail(where, str(err)) from None


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(where, "'seeds' is empty")
    return tuple(_int(v, "seeds", where) for v in items)


def _size(value: Any, where: str) -> tuple[int, int]:
    if is_int(value):
        return int(value), int(value)
    if isinstance(value, list) and len(value) == 2:
        return _int(value[0], "size", where), _int(value[1], "size", where)
    raise _fail(where, f"'size' must be an integer or [width, height], got {value!r}")


def _terms(entry: Mapping[str, Any], where: str) -> tuple[GuidanceTerm, ...] | None:
    keys = [k for k in ("guidance", "cfg", "pag", "slg", "embedded_guidance") if k in entry]
    if not keys:
        return None
    terms: list[GuidanceTerm] = []
    try:
        for d in entry.get("guidance", []) or []:
            if not isinstance(d, dict):
                raise ConfigError(
                    f"a 'guidance' item must be a mapping like {{method: cfg, scale: 5}}, got {d!r}"
                )
            terms.append(term_class(d.get("method"), " in 'guidance'").from_dict(d))
        for key, cls in (("cfg", CFG), ("pag", PAG), ("slg", SLG), ("embedded_guidance", EmbeddedGuidance)):
            if key in entry:
                terms.append(cls(_float(entry[key], key, where)))
    except (ConfigError, TypeError) as err:
        raise _fail(where, str(err).splitlines()[0]) from None
    return tuple(terms)


def _entry(entry: Any, where: str, defaults: Mapping[str, Any]) -> ValidationPrompt:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict):
        raise _fail(where, f"a prompt must be a string or a mapping, got {type(entry).__name__}")
    for key in entry:
        if key not in PROMPT_KEYS:
            raise _fail(where, f"unknown key '{key}'; known: {', '.join(PROMPT_KEYS)}")
    merged = {**defaults, **entry}
    if not isinstance(merged.get("prompt"), str):
        raise _fail(where, "each prompt needs 'prompt' (a string)")
    negative = merged.get("negative", "")
    if not isinstance(negative, str):
        raise _fail(where, f"'negative' must be a string, got {negative!r}")
    if "seed" in merged and "seeds" in merged:
        raise _fail(where, "give 'seed' or 'seeds', not both")
    seeds = (
        _seeds(merged.get("seeds", merged.get("seed")), where) if {"seed", "seeds"} & set(merged) else None
    )
    width = height = None
    if "size" in merged:
        width, height = _size(merged["size"], where)
    width = _int(merged["width"], "width", where) if "width" in merged else width
    height = _int(merged["height"], "height", where) if "height" in merged else height
    scheduler = merged.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, str):
        raise _fail(where, f"'scheduler' must be a name, got {scheduler!r}")
    return ValidationPrompt(
        prompt=merged["prompt"],
        negative=negative,
        seeds=seeds,
        width=width,
        height=height,
        steps=_int(merged["steps"], "steps", where) if "steps" in merged else None,
        guidance=_terms(merged, where),
        scheduler=scheduler,
        shift=_float(merged["shift"], "shift", where) if "shift" in merged else None,
        eta=_float(merged["eta"], "eta", where) if "eta" in merged else None,
        knobs=tuple((k, _float(merged[k], k, where)) for k in KNOB_KEYS if k in merged),
        dynamic_thresholding=_threshold(merged.get("dynamic_thresholding"), where),
        where=where,
    )


def _with_seeds(prompts: list[ValidationPrompt], seeds: Any, where: str) -> list[ValidationPrompt]:
    """A top-level seed list: one per prompt (shorter or longer is an error)."""
    if not isinstance(seeds, list):
        raise _fail(where, f"top-level 'seeds' must be a list, one seed per prompt, got {seeds!r}")
    if len(seeds) != len(prompts):
        raise _fail(where, f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    return [
        p if p.seeds is not None else replace(p, seeds=(_int(s, "seeds", where),))
        for p, s in zip(prompts, seeds, strict=True)
    ]


# -- reading files with line numbers ------------------------------------------------------------
def _yaml_tree(text: str, name: str) -> tuple[Any, Any]:
    """(node, loader): the YAML node tree (for line numbers) and a loader to construct values."""
    import yaml

    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{name}{line}: not valid YAML/JSON: {problem}") from None
    return node, loader


def _line(name: str, node: Any) -> str:
    return f"{name}:{node.start_mark.line + 1}"


def _mapping(node: Any, loader: Any) -> dict[str, tuple[Any, Any]]:
    """key -> (value node, key node) of a YAML mapping node."""
    return {str(loader.construct_object(k, deep=True)): (v, k) for k, v in node.value}


def _from_tree(node: Any, loader: Any, name: str) -> PromptSet:
    import yaml

    if node is None:
        raise ConfigError(f"{name}: the prompt file is empty")
    family, seeds = None, None
    defaults: dict[str, Any] = {}
    seeds_where = ""
    if isinstance(node, yaml.MappingNode):
        top = _mapping(node, loader)
        for key, (_, knode) in top.items():
            if key not in TOP_KEYS:
                raise ConfigError(f"{_line(name, knode)}: unknown key '{key}'; known: {', '.join(TOP_KEYS)}")
        if "prompts" not in top:
            raise ConfigError(f"{_line(name, node)}: a prompt file mapping needs 'prompts' (a list)")
        if "family" in top:
            fnode = top["family"][0]
            family = loader.construct_object(fnode, deep=True)
            if family not in FAMILY_DEFAULTS:
                raise ConfigError(
                    f"{_line(name, fnode)}: unknown family default '{family}'; one of: {', '.join(FAMILY_DEFAULTS)}"
                )
        if "defaults" in top:
            dnode = top["defaults"][0]
            defaults = loader.construct_object(dnode, deep=True) or {}
            if not isinstance(defaults, dict):
                raise ConfigError(f"{_line(name, dnode)}: 'defaults' must be a mapping")
            for key in defaults:
                if key == "prompt" or key not in PROMPT_KEYS:
                    raise ConfigError(f"{_line(name, dnode)}: unknown key '{key}' in defaults")
        if "seeds" in top:
            seeds_where = _line(name, top["seeds"][0])
            seeds = loader.construct_object(top["seeds"][0], deep=True)
        node = top["prompts"][0]
    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError(f"{_line(name, node)}: expected a list of prompts")
    if not node.value:
        raise ConfigError(f"{_line(name, node)}: the prompt list is empty")
    prompts = [_entry(loader.construct_object(n, deep=True), _line(name, n), defaults) for n in node.value]
    if seeds is not None:
        prompts = _with_seeds(prompts, seeds, seeds_where)
    return PromptSet(tuple(prompts), family, name)


def _from_text(text: str, name: str) -> PromptSet:
    prompts = [
        ValidationPrompt(line.strip(), where=f"{name}:{n}")
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ConfigError(f"{name}: no prompts (one prompt per line; '#' starts a comment)")
    return PromptSet(tuple(prompts), None, name)


def load_prompts(path: str | Path) -> PromptSet:
    """Read a prompt file (``.yaml``/``.yml``, ``.json``, anything else: one prompt per line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DiffguideError(f"prompt file '{p}' does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DiffguideError(f"cannot read prompt file '{p}': {err}") from None
    name = str(p)
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{name}:{err.lineno}: not valid JSON: {err.msg}") from None
    if suffix in (".json", ".yaml", ".yml"):
        return _from_tree(*_yaml_tree(text, name), name)
    return _from_text(text, name)


def prompt_set(prompts: Any, seeds: int | Sequence[int] | None = None) -> PromptSet:
    """Normalise ``sample_validation``'s ``prompts``: a :class:`PromptSet`, a path, or a list of
    strings / :class:`ValidationPrompt` / mappings; ``seeds``: one for every prompt (an int) or one
    per prompt (a list), for prompts that set none."""
    if isinstance(prompts, Path) or (isinstance(prompts, str) and prompts.lower().endswith(PROMPT_FILES)):
        pset = load_prompts(prompts)
    elif isinstance(prompts, dict):
        pset = PromptSet((_entry(prompts, "prompt 0", {}),))
    elif isinstance(prompts, PromptSet):
        pset = prompts
    elif isinstance(prompts, str):
        pset = PromptSet((ValidationPrompt(prompts),))
    elif isinstance(prompts, Sequence) and prompts:
        items = [
            p if isinstance(p, ValidationPrompt) else _entry(p, f"prompt {i}", {})
            for i, p in enumerate(prompts)
        ]
        pset = PromptSet(tuple(items))
    else:
        raise ConfigError(
            f"prompts must be a prompt file, a prompt, or a non-empty list of prompts, got {prompts!r}"
        )
    if seeds is None:
        return pset
    if is_int(seeds):
        items = [p if p.seeds is not None else replace(p, seeds=(int(seeds),)) for p in pset.prompts]  # type: ignore[arg-type]
        return replace(pset, prompts=tuple(items))
    return replace(pset, prompts=tuple(_with_seeds(list(pset.prompts), list(seeds), "seeds")))  # type: ignore[arg-type]


__all__ = ["PROMPT_KEYS", "PromptSet", "ValidationPrompt", "load_prompts", "prompt_set"]
