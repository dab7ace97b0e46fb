"""``diffguide guides``: the registered guidance terms, their parameters and defaults."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer


def _default(value: Any) -> Any:
    """A default as ``--guide`` reads it (JSON-safe with ``as_json``)."""
    from ..guidance.base import Window

    if isinstance(value, Window):
        return "whole run" if value == Window() else value.describe()
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def term_table() -> list[dict[str, Any]]:
    """One entry per registered method: its name, summary and parameters (type, default, range)."""
    from ..guidance import REGISTRY
    from ..guidance.term import default_of, field_types, parameters, type_name

    table = []
    for method, cls in REGISTRY.items():
        types_ = field_types(cls)
        params = []
        for f in parameters(cls):
            entry: dict[str, Any] = {"name": f.name, "type": type_name(types_[f.name])}
            entry["default"] = _default(default_of(f))
            if f.name in cls.ranges:
                entry["range"] = [_default(b) for b in cls.ranges[f.name]]
            params.append(entry)
        summary = (cls.__doc__ or "").replace("``", "").strip().split("\n\n")[0]
        table.append({"method": method, "summary": " ".join(summary.split()), "parameters": params})
    return table


def _text(value: Any) -> str:
    if value is None:
        return "none (preset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def guides(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the guidance terms that --guide accepts, with their parameters and defaults."""
    table = term_table()
    if as_json:
        typer.echo(json.dumps(table, indent=2))
        return
    for i, term in enumerate(table):
        if i:
            typer.echo("")
        typer.echo(f"{term['method']}: {term['summary']}")
        for p in term["parameters"]:
            bound = f"  in [{_text(p['range'][0])}, {_text(p['range'][1])}]" if "range" in p else ""
            typer.echo(f"  {p['name']}: {p['type']} = {_text(p['default'])}{bound}")
    typer.echo('\nuse: diffguide generate --guide "METHOD:key=value,key=value" (docs/cli.md)')
