"""``--guide "NAME:key=value,key=value"``: any registered guidance term from the command line.

Syntax: the method name, then optionally ``:`` and comma-separated ``key=value`` parameters
(the term's dataclass fields; ``diffguide guides`` lists them). Values are read by the field's
type: numbers, ``true``/``false``, text, ``none`` for an optional value (a layer spec's preset),
one of a fixed set of words, windows in the ``--cfg-window`` syntax, and lists (tuple fields, e.g.
FDG's ``scales``) as comma-separated values, best in brackets: ``fdg:scales=[10,5],parallel_weights=[1,0.5]``.

Layer specs and windows contain commas themselves. A comma-separated piece without ``=``
continues the previous value, so ``pag:layers=d2.2-9,d3,scale=2`` gives layers ``d2.2-9,d3``;
a value may also be wrapped in brackets or quotes to make that explicit:
``tpg:layers=[d2.2-9,d3]``, ``cfg:window='0:0.5,sigma:1:'``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from ..errors import ConfigError
from .common import parse_window

if TYPE_CHECKING:
    from ..guidance.term import Term

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
PAIRS = {"[": "]", "'": "'", '"': '"'}


def split_pairs(body: str) -> list[str]:
    """``key=value`` pieces of ``body``: commas inside brackets or quotes do not split, and a
    piece without ``=`` belongs to the previous value."""
    pieces: list[str] = []
    current, closing = "", ""
    for char in body:
        if closing:
            closing = "" if char == closing else closing
            current += char
        elif char in PAIRS:
            closing = PAIRS[char]
            current += char
        elif char == ",":
            pieces.append(current)
            current = ""
        else:
            current += char
    pieces.append(current)
    merged: list[str] = []
    for piece in pieces:
        if "=" in piece or not merged:
            merged.append(piece)
        else:
            merged[-1] += "," + piece
    return [p for p in (m.strip() for m in merged) if p]


def unwrap(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] in PAIRS and text[-1] == PAIRS[text[0]]:
        return text[1:-1].strip()
    return text


def parse_value(tp: Any, text: str, what: str) -> Any:
    """``text`` read as a value of type ``tp`` (a ConfigError naming ``what`` otherwise)."""
    from ..guidance.base import Window
    from ..guidance.term import optional_of, type_name

    inner, optional = optional_of(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    if inner is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{what}: '{text}' is not a number") from None
        if math.isnan(value):
            raise ConfigError(f"{what}: '{text}' is not a number")
        return value
    if inner is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{what}: '{text}' is not an integer") from None
    if inner is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConfigError(f"{what}: '{text}' is not true or false")
    if inner is Window:
        return parse_window(text, what)
    if get_origin(inner) is Literal:
        choices = [str(a) for a in get_args(inner)]
        if text not in choices:
            raise ConfigError(f"{what}: '{text}' is not one of {', '.join(choices)}")
        return text
    if inner is str:
        return text
    if get_origin(inner) is tuple:
        return parse_tuple(inner, text, what)
    raise ConfigError(f"{what}: parameters of type {type_name(tp)} cannot be given on the command line")


def parse_tuple(tp: Any, text: str, what: str) -> tuple[Any, ...]:
    """``text`` (``a,b,...``, optionally in brackets) as a ``tuple[X, ...]`` or fixed-length tuple."""
    body = unwrap(text)
    items = [item.strip() for item in body.split(",")] if body else []
    if "" in items:
        raise ConfigError(f"{what}: '{text}' has an empty item; give comma-separated values like [10,5]")
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        kinds = [args[0]] * len(items)
    elif len(items) != len(args):
        raise ConfigError(f"{what}: '{text}' has {len(items)} values, {len(args)} are needed")
    else:
        kinds = list(args)
    return tuple(parse_value(kind, item, what) for kind, item in zip(kinds, items, strict=True))


def parse_guide(spec: str) -> Term:
    """One ``--guide`` value as a term: ``NAME`` or ``NAME:key=value,...``."""
    from ..guidance.registry import REGISTRY, term_class
    from ..guidance.term import field_types

    option = f"--guide '{spec}'"
    method, _, body = spec.partition(":")
    method = method.strip()
    if method not in REGISTRY:
        raise ConfigError(f"{option}: unknown guidance method '{method}'; known: {', '.join(REGISTRY)}")
    cls = term_class(method)
    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    for piece in split_pairs(body):
        key, eq, text = piece.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{option}: '{piece}' is not key=value; {method} takes {', '.join(types_)}")
        if key not in types_:
            raise ConfigError(f"{option}: {method} has no parameter '{key}'; it takes {', '.join(types_)}")
        if key in kwargs:
            raise ConfigError(f"{option}: {method} {key} is given twice")
        kwargs[key] = parse_value(types_[key], unwrap(text), f"{option}: {method} {key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None


def merge_terms(flags: Sequence[Term], guides: Sequence[Term]) -> list[Term]:
    """The short flags' terms, then the ``--guide`` terms; two terms of one name are an error."""
    seen: dict[str, str] = {t.name: f"--{t.method.replace('_', '-')}" for t in flags}
    for term in guides:
        if term.name in seen:
            raise ConfigError(
                f"two guidance terms are named '{term.name}' ({seen[term.name]} and --guide {term.method}); "
                f'drop one, or give the --guide term another name, e.g. --guide "{term.method}:name={term.name}2"'
            )
        seen[term.name] = f"--guide {term.method}"
    return [*flags, *guides]
