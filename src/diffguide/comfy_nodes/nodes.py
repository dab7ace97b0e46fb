"""ComfyUI node classes, generated from diffguide's term registry (one node per method) plus the
"Guidance stack" node. Importing this module imports no ComfyUI code.

A node's inputs are its term's dataclass fields: a float is a FLOAT widget (the term's
``ranges`` as its bounds), a bool a BOOLEAN, a ``Literal`` a choice list, a string (or an
optional value) a STRING where the empty string means "none" (``layers``: the method's preset),
and a :class:`~diffguide.guidance.base.Window` four FLOAT widgets (``window_sigma_min``,
``window_sigma_max`` with -1 for "no bound", ``window_start``, ``window_end``). ``name`` is not
an input: the node names its branch after the method (``pag``, ``pag_2`` for a second one).
Every node returns the patched MODEL and a STRING: the dry run of its layers (each diffusers
module name and the ComfyUI module it is).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, get_args, get_origin

from ..errors import ConfigError
from ..guidance import REGISTRY
from ..guidance.base import Window
from ..guidance.term import Term, default_of, field_types, optional_of, parameters

CATEGORY = "diffguide"
#: methods without a node: Flux's embedded guidance is ComfyUI's own FluxGuidance node.
SKIP = frozenset({"embedded_guidance"})
WINDOW_KEYS = ("sigma_min", "sigma_max", "start", "end")
ONE_CALL = (
    "Its perturbed branch joins ComfyUI's batched model call (one model call per step); only when "
    "another node replaces calc_cond_batch does it fall back to one extra call per step."
)
_TIPS = {
    "scale": "strength s: adds s (c - p) (perturbation terms) to ComfyUI's CFG result",
    "layers": "diffguide layer spec (mid, d2.2-9,d3, b7-9, s3, ...); empty = the method's preset. "
    "The 'layers' output lists the modules it selects.",
    "window_sigma_max": "upper noise level of the window; -1 = no bound",
}


def _float_input(cls: type[Term], name: str, default: float) -> tuple[str, dict[str, Any]]:
    lo, hi = cls.ranges.get(name, (-1e4, 1e4))
    return "FLOAT", {"default": default, "min": lo, "max": min(hi, 1e4), "step": 0.01}


def _input(cls: type[Term], f: dataclasses.Field[Any], tp: Any) -> dict[str, tuple[Any, ...]]:
    default = default_of(f)
    inner, optional = optional_of(tp)
    if inner is Window:
        w = default if isinstance(default, Window) else Window()
        values = {**w.describe(), "sigma_max": -1.0 if math.isinf(w.sigma_max) else w.sigma_max}
        return {
            f"{f.name}_{k}": ("FLOAT", {"default": values[k], "min": -1.0 if k == "sigma_max" else 0.0,
                                        "max": 1e4, "step": 0.001})
            for k in WINDOW_KEYS
        }  # fmt: skip
    if optional or inner is str:
        return {f.name: ("STRING", {"default": "" if default is None else str(default)})}
    if inner is float:
        return {f.name: _float_input(cls, f.name, float(default))}
    if inner is bool:
        return {f.name: ("BOOLEAN", {"default": bool(default)})}
    if inner is int:
        return {f.name: ("INT", {"default": int(default), "min": -(2**31), "max": 2**31 - 1})}
    if get_origin(inner) is Literal:
        return {f.name: ([str(a) for a in get_args(inner)], {"default": str(default)})}
    if get_origin(inner) is tuple:  # e.g. FDG's scales: "10, 5"
        return {f.name: ("STRING", {"default": ", ".join(str(v) for v in default)})}
    raise TypeError(f"{cls.__name__}.{f.name}: no ComfyUI widget for {tp!r}")


#: Term fields that are no node input: the branch name, and ``post_cfg`` (where a PAG / SLG term
#: adds its delta: each node here is its own post-CFG function on the running result anyway).
NOT_WIDGETS = frozenset({"name", "post_cfg"})


def input_types(cls: type[Term]) -> dict[str, tuple[Any, ...]]:
    """The node inputs of a term class (``model`` first), with tooltips."""
    types_ = field_types(cls)
    out: dict[str, tuple[Any, ...]] = {"model": ("MODEL",)}
    for f in parameters(cls):
        if f.name in NOT_WIDGETS:
            continue
        for key, spec in _input(cls, f, types_[f.name]).items():
            if key in _TIPS and len(spec) > 1:
                spec = (spec[0], {**spec[1], "tooltip": _TIPS[key]})
            out[key] = spec
    return out


def term_from_inputs(cls: type[Term], values: dict[str, Any]) -> Term:
    """The term a node's widget values describe (a one-line ConfigError when they do not fit)."""
    from ..cli.guide import parse_value

    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    for f in parameters(cls):
        if f.name in NOT_WIDGETS:
            continue
        inner, optional = optional_of(types_[f.name])
        if inner is Window:
            w = {k: values[f"{f.name}_{k}"] for k in WINDOW_KEYS}
            sigma_max = math.inf if w["sigma_max"] < 0 else float(w["sigma_max"])
            kwargs[f.name] = Window(float(w["sigma_min"]), sigma_max, float(w["start"]), float(w["end"]))
            continue
        value = values[f.name]
        if get_origin(inner) is tuple:
            item = get_args(inner)[0]
            parts = [t.strip() for t in str(value).split(",") if t.strip()]
            value = tuple(parse_value(item, t, f"{cls.title()} {f.name}") for t in parts)
        elif optional or inner is str:
            text = str(value).strip()
            value = (
                None
                if text == "" and optional
                else parse_value(types_[f.name], text, f"{cls.title()} {f.name}")
            )
        elif inner is float:
            value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)


class _TermNode:
    """Base of the generated per-method nodes."""

    term_class: ClassVar[type[Term]]
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "layers")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": input_types(cls.term_class)}

    def apply(self, model: Any, **values: Any) -> tuple[Any, str]:
        from .patch import patch_model

        return patch_model(model, [term_from_inputs(self.term_class, values)])  # type: ignore[no-any-return]


def node_class(method: str, cls: type[Term]) -> type:
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.title()
    return type(
        f"Diffguide{cls.__name__}",
        (_TermNode,),
        {"term_class": cls, "DESCRIPTION": f"diffguide {cls.title()}: {doc} {ONE_CALL}"},
    )


class GuidanceStack:
    """One node, several terms: one ``NAME:key=value,...`` per line (the CLI's ``--guide``).
    All their deltas are added, then their corrections run, as diffguide combines a term list."""

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "layers")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "diffguide Guidance stack: one 'NAME:key=value,...' per line, e.g. 'pag:scale=2' and "
        "'tpg:scale=1,layers=d1'. " + ONE_CALL
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        tip = "one term per line, as diffguide's --guide: NAME or NAME:key=value,...; '#' starts a comment"
        return {
            "required": {
                "model": ("MODEL",),
                "guides": ("STRING", {"multiline": True, "default": "pag:scale=3", "tooltip": tip}),
            }
        }

    def apply(self, model: Any, guides: str) -> tuple[Any, str]:
        from ..cli.guide import parse_guide
        from .patch import patch_model

        lines = [ln.split("#", 1)[0].strip() for ln in guides.splitlines()]
        terms = [parse_guide(ln) for ln in lines if ln]
        if not terms:
            raise ConfigError("Guidance stack: no term given; write one NAME:key=value,... per line")
        return patch_model(model, terms)  # type: ignore[no-any-return]


def supported(cls: type[Term]) -> bool:
    """Whether the nodes can run the term: its default instance's perturbations are ones the pack
    implements on ComfyUI's models (identity attention, token shuffle, whole-block skip, query
    blur and shuffle, text-token shuffle)."""
    from ..perturb.block_skip import BlockSkip
    from ..perturb.identity_attention import IdentityAttention
    from ..perturb.layer_skip import LayerSkipBlocks
    from ..perturb.query_blur import QueryBlur
    from ..perturb.query_shuffle import QueryShuffle
    from ..perturb.text_shuffle import TextShuffle
    from ..perturb.token_shuffle import TokenShuffle

    try:
        branches = cls().branches()  # type: ignore[call-arg]
    except Exception:  # a term without defaults: no node
        return False
    known = (
        IdentityAttention,
        TokenShuffle,
        BlockSkip,
        LayerSkipBlocks,
        QueryBlur,
        QueryShuffle,
        TextShuffle,
    )
    return all(b.perturbation is None or type(b.perturbation) in known for b in branches)


def mappings() -> tuple[dict[str, type], dict[str, str]]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS for the registry as it is now."""
    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    for method, cls in REGISTRY.items():
        if method in SKIP or not supported(cls):
            continue
        key = f"Diffguide{cls.__name__}"
        classes[key] = node_class(method, cls)
        names[key] = f"diffguide {cls.title()}"
    classes["DiffguideGuidanceStack"] = GuidanceStack
    names["DiffguideGuidanceStack"] = "diffguide Guidance stack"
    return classes, names
