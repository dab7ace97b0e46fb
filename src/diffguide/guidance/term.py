"""Self-describing guidance terms: the :class:`Term` base class and the method registry.

A method is one file, ``guidance/<method>.py``, holding a frozen dataclass that derives from
:class:`Term` and registers itself::

    @register("mytest")
    @dataclass(frozen=True)
    class MyTest(Term):
        scale: float = 1.0
        window: Window = field(default_factory=Window)
        name: str = "mytest"
        def branches(self): return (UNCOND,)
        def delta(self, preds, step): return self.scale * (preds["cond"] - preds["uncond"])

Every module of the ``diffguide.guidance`` package is imported with the package, so the file
alone makes the method known to the CLI (``--guide "mytest:scale=2"``, ``diffguide guides``),
manifests and replay, the A1111 text and the quality benchmark's settings.

Everything else comes from the dataclass fields: ``describe()`` (the manifest entry:
``method`` and each init field, a :class:`Window` as its dict), ``from_dict()`` (its inverse,
unknown keys are an error) and the checks of ``__post_init__`` (finite floats within
``ranges``, booleans, strings, ``Literal`` choices, windows; then the :meth:`Term.validate`
hook). Defaults: no extra branch, active inside ``window`` while :meth:`Term.scale_at` is not
``off``, ``post`` the identity.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from torch import Tensor

from ..errors import ConfigError
from .base import Branch, Predictions, StepInfo, Window, check_finite

#: Registered methods, in registration order (the built-ins first): method name -> class.
REGISTRY: dict[str, type[Term]] = {}

_METHOD = re.compile(r"^[a-z][a-z0-9_]*$")
T = TypeVar("T", bound="type[Term]")


def register(method: str) -> Callable[[T], T]:
    """Class decorator: register a frozen :class:`Term` dataclass under ``method`` (the name in
    manifests and in ``--guide METHOD:...``). Apply it on top of ``@dataclass(frozen=True)``."""
    if not _METHOD.match(method):
        raise ValueError(f"method name '{method}' must be lower-case letters, digits and '_'")

    def add(cls: T) -> T:
        params = getattr(cls, "__dataclass_params__", None)
        if not (isinstance(cls, type) and issubclass(cls, Term)) or params is None or not params.frozen:
            raise TypeError(f"@register('{method}') needs a frozen dataclass deriving from Term, got {cls!r}")
        known = REGISTRY.get(method)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"guidance method '{method}' is already registered by {known.__qualname__}")
        cls.method = method
        REGISTRY[method] = cls
        return cls

    return add


def bounds(**ranges: tuple[float, float]) -> Mapping[str, tuple[float, float]]:
    """A term's ``ranges`` (read-only): ``bounds(scale=(0.0, 100.0))``."""
    return types.MappingProxyType(ranges)


def parameters(cls: type[Term]) -> tuple[dataclasses.Field[Any], ...]:
    """The term's parameters: its dataclass fields that ``__init__`` takes."""
    return tuple(f for f in dataclasses.fields(cast(Any, cls)) if f.init)


_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type[Term]) -> dict[str, Any]:
    """Each parameter's type, resolved (``from __future__ import annotations`` leaves strings)."""
    if cls not in _TYPES:
        hints = get_type_hints(cls)
        _TYPES[cls] = {f.name: hints[f.name] for f in parameters(cls)}
    return _TYPES[cls]


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def optional_of(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` (or ``Optional[X]``), else ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    """How a parameter type reads in help and errors: float, bool, str, window, a|b, ... or none."""
    inner, optional = optional_of(tp)
    if get_origin(inner) is Literal:
        name = "|".join(str(a) for a in get_args(inner))
    elif inner is Window:
        name = "window"
    elif get_origin(inner) is tuple:
        args = get_args(inner)
        item = type_name(args[0]) if args else "value"
        name = f"{item} list" if len(args) == 2 and args[1] is Ellipsis else f"{item} list of {len(args)}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def _item(tp: Any, index: int, value: Any) -> Any:
    """Item ``index`` of a tuple parameter read from JSON: an integer where a float is due as float."""
    args = get_args(tp)
    kind = args[0] if len(args) == 2 and args[1] is Ellipsis else args[index] if index < len(args) else None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class Term:
    """Base class of guidance terms (frozen dataclasses; see the module docstring).

    Class attributes a method may set:

    * ``label``: the term in messages and the A1111 text ("CFG scale must be ..."); default the
      method name in capitals;
    * ``off``: the ``scale`` that means "no guidance" (CFG: 1, others 0);
    * ``ranges``: ``{parameter: (lo, hi)}`` checked for float parameters (``hi`` may be inf);
    * ``optional``: parameters written to the manifest only when not at their default (added
      after manifests existed without them);
    * ``hidden``: parameters never written to the manifest;
    * ``preset`` / ``layer_kind``: for perturbation terms, the layer preset their perturbation
      uses when no layers are given (a :data:`diffguide.models.presets.Method`) and what its
      layers are ("self-attention modules"), for the CLI's dry-run line.
    """

    method: ClassVar[str] = ""
    label: ClassVar[str] = ""
    off: ClassVar[float] = 0.0
    ranges: ClassVar[Mapping[str, tuple[float, float]]] = {}
    optional: ClassVar[frozenset[str]] = frozenset()
    hidden: ClassVar[frozenset[str]] = frozenset()
    preset: ClassVar[str | None] = None
    layer_kind: ClassVar[str] = "layers"

    name: str
    scale: float
    window: Window

    # -- checks ------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        types_ = field_types(type(self))
        for f in parameters(type(self)):
            self._check(f.name, types_[f.name], getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Checks across parameters (a one-line :class:`ConfigError`); none by default."""

    @classmethod
    def title(cls) -> str:
        return cls.label or cls.method.upper()

    def _check(self, key: str, tp: Any, value: Any) -> None:
        what = f"{self.title()} {key}"
        inner, optional = optional_of(tp)
        if value is None and optional:
            return
        if inner is float:
            check_finite(what, value)
            lo, hi = self.ranges.get(key, (-math.inf, math.inf))
            if not lo <= value <= hi:
                bound = f">= {lo:g}" if math.isinf(hi) else f"in [{lo:g}, {hi:g}]"
                raise ConfigError(f"{what} must be {bound}, got {value}")
        elif inner is bool and not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        elif inner is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{what} must be an integer, got {value!r}")
        elif inner is str and not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {value!r}")
        elif inner is Window and not isinstance(value, Window):
            raise ConfigError(f"{what} must be a Window, got {value!r}")
        elif get_origin(inner) is Literal and value not in get_args(inner):
            choices = ", ".join(str(a) for a in get_args(inner))
            raise ConfigError(f"{what} must be one of {choices}, got {value!r}")

    # -- behaviour (defaults) ----------------------------------------------------------------
    def branches(self) -> tuple[Branch, ...]:
        """Branches this term needs besides ``cond``: none by default."""
        return ()

    def scale_at(self, step: StepInfo) -> float:
        """The strength at this step (``scale``; PAG's adaptive scale varies it)."""
        return self.scale

    def active(self, step: StepInfo) -> bool:
        """Inside the window, with a strength other than ``off``."""
        return self.window.contains(step) and self.scale_at(step) != self.off

    def delta(self, preds: Predictions, step: StepInfo) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no delta")

    def post(self, guided: Tensor, preds: Predictions, step: StepInfo) -> Tensor:
        """Identity: most terms only add a delta."""
        return guided

    # -- manifests ---------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        """The manifest entry: ``method``, then every parameter (a window as its dict)."""
        out: dict[str, object] = {"method": self.method}
        for f in parameters(type(self)):
            value = getattr(self, f.name)
            if f.name in self.hidden or (f.name in self.optional and value == default_of(f)):
                continue
            out[f.name] = value.describe() if isinstance(value, Window) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Term:
        """Inverse of :meth:`describe` (``method`` is ignored; a missing parameter is its default)."""
        types_ = field_types(cls)
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "method":
                continue
            if key not in types_:
                raise ConfigError(
                    f"{cls.method} has no parameter '{key}'; its parameters: {', '.join(types_)}"
                )
            inner, _ = optional_of(types_[key])
            if inner is Window and value is not None:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{cls.method} {key} must be a window object, got {value!r}")
                value = Window.from_dict(value)
            elif inner is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # JSON writes 3.0 as 3 in other tools
            elif get_origin(inner) is tuple and isinstance(value, list | tuple):
                value = tuple(_item(inner, i, v) for i, v in enumerate(value))  # JSON stores lists
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def a1111(cls, d: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``(key, value)`` pairs of the A1111 ``parameters`` text for a manifest entry."""
        return [(f"{cls.title()} scale", f"{float(d['scale']):g}")] if "scale" in d else []
