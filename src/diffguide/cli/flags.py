"""typer command and group classes whose help shows no value placeholder for flags.

typer's rich help prints a type column for every option, ``<bool>`` for flags such as
``--quiet`` or ``--help`` that take no value. These classes give flag options an empty
metavar when the command's parameters are listed, so the column stays blank for them.
Register commands with ``cls=FlagCommand`` and sub-apps with ``typer.Typer(cls=FlagGroup)``.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup


def _blank_flag_metavars(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class FlagCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))


class FlagGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))
