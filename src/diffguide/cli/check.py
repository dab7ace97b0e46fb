"""``diffguide check-determinism <generate options>``: run twice and report any difference."""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any, get_type_hints

import typer

from . import generate as gen

# Options of `generate` that only concern saving files: accepted, so that a generate command
# line can be pasted as it is, and ignored.
_OUTPUT_ONLY = {"out", "prefix", "save_latents", "trace", "trace_modules"}


def check_determinism(
    batch_vs_single: Annotated[
        bool,
        typer.Option(
            "--batch-vs-single",
            help="Also run each image alone (seed + i); must agree within the batch tolerance "
            "(2e-4 relative, docs/reproducibility.md), bit for bit with --batch-invariant.",
        ),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Also run with torch.use_deterministic_algorithms(True); must be bit-identical."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    **options: Any,
) -> int:
    """Run a generation twice (same options as `generate`) and report whether the results are
    bit-identical; optionally batch vs single images and torch's deterministic-algorithms mode.
    Exit code 0 when every check holds, 1 otherwise."""
    from ..repro.determinism import check_determinism as run_checks

    run = gen.prepare({k: v for k, v in options.items() if k not in _OUTPUT_ONLY})
    checks = run_checks(
        run.pipe, run.config, batch_vs_single=batch_vs_single, strict=strict, conditioning=run.conditioning
    )
    if as_json:
        typer.echo(
            json.dumps([{"check": c.name, "expect": c.expectation, **c.report.to_dict()} for c in checks])
        )
    else:
        from rich.table import Table

        table = Table(title="determinism")
        for col in ("check", "expectation", "max abs err", "result"):
            table.add_column(col)
        for c in checks:
            err = c.report.max_abs_err
            table.add_row(
                c.name, c.expectation, "-" if err is None else f"{err:.3g}", "ok" if c.ok else "DIFFERS"
            )
        run.console.quiet = False
        run.console.print(table)
    return 0 if all(c.ok for c in checks) else 1


def _borrow_generate_options() -> None:
    """Give check-determinism its own options followed by every option of `generate`
    (typer reads the signature, with resolved annotations)."""
    hints = get_type_hints(gen.generate, include_extras=True)
    hints.update(get_type_hints(check_determinism, include_extras=True))
    own = [p for p in inspect.signature(check_determinism).parameters.values() if p.kind is not p.VAR_KEYWORD]
    borrowed = list(inspect.signature(gen.generate).parameters.values())
    params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in own + borrowed
    ]
    check_determinism.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
    check_determinism.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}


_borrow_generate_options()
