"""Where do two runs diverge? Compare two step traces tensor by tensor, in execution order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .diff import DiffReport, compare
from .trace import Trace, step_key


@dataclass(frozen=True)
class StepRow:
    """Errors of one step: max abs error of each recorded tensor, and whether all are close."""

    index: int
    sigma_a: float
    sigma_b: float
    errors: dict[str, float | None]
    ok: bool


@dataclass(frozen=True)
class TraceDiff:
    steps: list[StepRow]
    first: DiffReport | None  # the first tensor beyond tolerance, in execution order
    first_step: int | None
    only_a: list[str]
    only_b: list[str]
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.first is None and not self.only_a and not self.only_b

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rtol": self.rtol,
            "atol": self.atol,
            "first_divergence": None
            if self.first is None
            else {"step": self.first_step, "tensor": self.first.name, "report": self.first.to_dict()},
            "steps": [vars(s) for s in self.steps],
            "only_a": self.only_a,
            "only_b": self.only_b,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def diff_traces(a: Trace, b: Trace, rtol: float = 1e-5, atol: float = 1e-6) -> TraceDiff:
    """Compare trace ``a`` with the reference ``b`` step by step; find the first divergence."""
    rows: list[StepRow] = []
    first: DiffReport | None = None
    first_step: int | None = None
    count = min(len(a.steps), len(b.steps))
    for i in range(count):
        errors: dict[str, float | None] = {}
        ok = True
        for key in a.keys_of_step(i):
            if key not in b.tensors:
                continue
            short = key[len(step_key(i, "")) :]
            report = compare(a.tensors[key], b.tensors[key], rtol=rtol, atol=atol, name=short)
            errors[short] = report.max_abs_err if report.comparable else None
            if not report.ok:
                ok = False
                if first is None:
                    first, first_step = report, i
        rows.append(StepRow(i, a.steps[i]["sigma"], b.steps[i]["sigma"], errors, ok))
    only_a = sorted(set(a.tensors) - set(b.tensors))
    only_b = sorted(set(b.tensors) - set(a.tensors))
    return TraceDiff(rows, first, first_step, only_a, only_b, rtol, atol)


def render_trace_diff(d: TraceDiff, console: Any) -> None:
    from rich.table import Table

    if d.first is None:
        console.print(
            f"[green]no divergence[/green] beyond rtol={d.rtol}, atol={d.atol} in {len(d.steps)} steps"
        )
    else:
        console.print(
            f"[red]first divergence[/red]: step {d.first_step}, tensor [bold]{d.first.name}[/bold] "
            f"(max abs err {_fmt(d.first.max_abs_err)}, {d.first.violations} elements beyond tolerance)"
        )
        if d.first.reason:
            console.print(f"reason: {d.first.reason}")
    columns = ["latents_in", "guided", "latents_out"]
    preds = sorted({k for s in d.steps for k in s.errors if k.startswith("pred/")})
    table = Table(title="max abs error per step")
    for col in ["step", "sigma A", "sigma B", *columns[:2], *preds, columns[2], "ok"]:
        table.add_column(col, justify="right")
    for s in d.steps:
        cells = [_fmt(s.errors.get(c)) for c in [*columns[:2], *preds, columns[2]]]
        table.add_row(
            str(s.index), f"{s.sigma_a:.4g}", f"{s.sigma_b:.4g}", *cells, "yes" if s.ok else "[red]no[/red]"
        )
    console.print(table)
    if d.only_a or d.only_b:
        console.print(f"only in A: {len(d.only_a)} tensors; only in B: {len(d.only_b)} tensors")
        for k in (d.only_a + d.only_b)[:10]:
            console.print(f"  {k}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
