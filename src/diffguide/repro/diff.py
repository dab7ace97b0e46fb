"""Compare two tensors (or two files of tensors) and explain the difference.

:func:`compare` is the core: one pair of tensors -> a frozen :class:`DiffReport` with absolute and
relative errors, a note when the relative error is inflated by a near-zero reference, an
``allclose`` verdict with torch's semantics, the largest differences with their indices,
per-channel statistics and NaN/Inf counts. A shape mismatch is a result (``ok=False`` with a
reason), not an exception. :func:`compare_dicts` applies it to every common key of two dicts of
tensors (two safetensors files, two step traces) and lists the keys only one side has.

:func:`load_tensors` reads .safetensors, .npy, .npz and .pt/.pth; .pt/.pth only through
``torch.load(weights_only=True)``: diffguide never unpickles arbitrary Python objects.
:func:`run_diff_cli` is what ``diffguide diff A B`` runs.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor

from ..errors import DiffguideError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ChannelStat",
    "DiffReport",
    "DiffSetReport",
    "TopDiff",
    "compare",
    "compare_dicts",
    "load_tensors",
    "render_report",
    "run_diff_cli",
]

SUPPORTED_EXTENSIONS = (".safetensors", ".npy", ".npz", ".pt", ".pth", ".png")

#: An element counts as "near zero" when |reference| < NEAR_ZERO_REL * mean(|reference|) (or < atol).
NEAR_ZERO_REL = 1e-3

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _convert_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (
        "If you trust the file, convert it yourself in a separate Python session, e.g. "
        f"python -c \"import torch; from safetensors.torch import save_file; x = torch.load('{path}', "
        "weights_only=False); "
        "save_file({'tensor': x.contiguous()} if isinstance(x, torch.Tensor) else "
        "{k: v.contiguous() for k, v in x.items() if isinstance(v, torch.Tensor)}, "
        f"'{out}')\" "
        f"and diff {out.name} instead."
    )


def _from_numpy(arr: np.ndarray, path: Path, key: str) -> Tensor:
    if arr.dtype.kind not in "biufc":
        raise DiffguideError(f"{path}: array {key!r} has dtype {arr.dtype}, which is not numeric")
    try:
        return torch.from_numpy(np.ascontiguousarray(arr).copy())
    except TypeError as exc:
        raise DiffguideError(
            f"{path}: array {key!r} has dtype {arr.dtype}, which torch cannot hold: {exc}"
        ) from exc


def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, Tensor):
        out[prefix or "tensor"] = obj.detach().cpu()
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}" if prefix else str(i), out)
    # other leaves (numbers, strings, None) carry no tensor data: skipped


def _load_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if found or "Unsupported class" in msg:
            what = f" (first one: {found.group(1)})" if found else ""
            raise DiffguideError(
                f"{path} contains arbitrary Python objects{what}, not just tensors. diffguide loads .pt/.pth "
                "files only with torch.load(weights_only=True) and will not unpickle them: unpickling can run "
                "arbitrary code. " + _convert_hint(path)
            ) from None
        raise DiffguideError(
            f"{path} is not a readable PyTorch file (torch.load with weights_only=True failed: "
            f"{msg.strip().splitlines()[-1] if msg.strip() else type(exc).__name__})"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DiffguideError(f"{path} is not a readable PyTorch file: {type(exc).__name__}: {exc}") from None
    out: dict[str, Tensor] = {}
    _flatten(obj, "", out)
    if not out:
        raise DiffguideError(f"{path} holds no tensors (it loaded as {type(obj).__name__})")
    return out


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors in a file, by name, on the CPU.

    - ``.safetensors``: every tensor, under its own name.
    - ``.npy``: the single array, under ``"tensor"``. ``.npz``: every array, under its name.
      (Object arrays are refused: numpy would need pickle.)
    - ``.pt``/``.pth``: ``torch.load(weights_only=True)`` only. A bare tensor is ``"tensor"``;
      nested dicts/lists are flattened to ``"a/b/0"`` keys; non-tensor leaves are skipped. A file that
      holds other Python objects is refused with a :class:`DiffguideError` saying how to convert it.
    - ``.png``: the pixels as float32 (1, C, H, W) in 0..255 under ``"image"`` (RGB, RGBA or grey as
      stored; palette images are converted to RGB), so two saved images compare pixel by pixel.
    """
    path = Path(path)
    if not path.exists():
        raise DiffguideError(f"{path}: no such file")
    if not path.is_file():
        raise DiffguideError(f"{path}: not a regular file")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DiffguideError(
            f"{path}: unsupported file type {ext or '(no extension)'!r}; diffguide diff reads "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise DiffguideError(f"{path}: the file is empty")
    if ext == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DiffguideError(f"{path} is not a valid safetensors file: {exc}") from None
    if ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise DiffguideError(
                    f"{path} holds a NumPy object array (arbitrary Python objects); diffguide will not "
                    "unpickle it. Save a numeric array instead (np.save with a numeric dtype)."
                ) from None
            raise DiffguideError(f"{path} is not a valid .npy file: {exc}") from None
        except (OSError, EOFError) as exc:
            raise DiffguideError(f"{path} is not a valid .npy file: {exc}") from None
        return {"tensor": _from_numpy(arr, path, "tensor")}
    if ext == ".npz":
        out: dict[str, Tensor] = {}
        try:
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    out[key] = _from_numpy(npz[key], path, key)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise DiffguideError(
                    f"{path} holds NumPy object arrays (arbitrary Python objects); diffguide will not unpickle "
                    "them. Save numeric arrays instead."
                ) from None
            raise DiffguideError(f"{path} is not a valid .npz file: {exc}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DiffguideError(f"{path} is not a valid .npz file: {exc}") from None
        if not out:
            raise DiffguideError(f"{path} holds no arrays")
        return out
    if ext == ".png":
        return {"image": _load_png(path)}
    return _load_torch(path)


def _load_png(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode in ("P", "CMYK", "YCbCr") else im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DiffguideError(f"{path} is not a readable PNG image: {exc}") from None
    pixels = torch.from_numpy(arr.astype(np.float32))
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # (H, W, C)
    return pixels.permute(2, 0, 1)[None].contiguous()  # (1, C, H, W)


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopDiff:
    """One of the largest absolute differences."""

    index: tuple[int, ...]
    a: float
    b: float
    abs_err: float
    rel_err: float


@dataclass(frozen=True)
class ChannelStat:
    """Error statistics of one channel (index along dim 1)."""

    channel: int
    max_abs_err: float
    mean_abs_err: float
    violations: int


@dataclass(frozen=True)
class DiffReport:
    """The comparison of ``a`` against the reference ``b``.

    ``ok`` is True when the tensors are comparable (same shape, numeric) and ``allclose`` holds.
    Errors are computed in float64 over the elements where both sides are finite (``None`` when there
    are none). Relative error is ``|a - b| / (|b| + eps)``.
    """

    name: str | None
    ok: bool
    comparable: bool
    reason: str | None
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    rtol: float
    atol: float
    eps: float
    numel: int = 0
    compared: int = 0
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    max_rel_err: float | None = None
    mean_rel_err: float | None = None
    max_rel_err_excl_near_zero: float | None = None
    mean_abs_b: float | None = None
    near_zero_threshold: float | None = None
    near_zero_count: int = 0
    near_zero_fraction: float = 0.0
    near_zero_note: str | None = None
    allclose: bool = False
    violations: int = 0
    violation_fraction: float = 0.0
    top: tuple[TopDiff, ...] = ()
    per_channel: tuple[ChannelStat, ...] = ()
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _fail(name, a, b, rtol, atol, eps, reason, notes=()) -> DiffReport:
    return DiffReport(
        name=name,
        ok=False,
        comparable=False,
        reason=reason,
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=_dtype_name(a),
        dtype_b=_dtype_name(b),
        rtol=rtol,
        atol=atol,
        eps=eps,
        numel=a.numel(),
        notes=tuple(notes),
    )


def compare(
    a: Tensor,
    b: Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    eps: float = 1e-8,
    *,
    name: str | None = None,
    top_k: int = 5,
    near_zero: float | None = None,
    equal_nan: bool = False,
) -> DiffReport:
    """Compare ``a`` with the reference ``b``.

    ``allclose`` has ``torch.allclose`` semantics: every element satisfies
    ``|a - b| <= atol + rtol * |b|`` (equal infinities count as close; NaN never does unless
    ``equal_nan``). With equal floating dtypes it is evaluated in that dtype, exactly as
    ``torch.allclose(a, b, rtol, atol)``; with different dtypes both sides are cast to float64 first
    (and a note says so).

    ``near_zero``: the |b| below which an element counts as near zero; default
    ``max(atol, 1e-3 * mean|b|)``. When the largest relative error sits on such an element,
    ``near_zero_note`` explains that the relative error is inflated by a near-zero reference.
    """
    if not all(math.isfinite(t) and t >= 0 for t in (rtol, atol, eps)):
        raise DiffguideError(f"tolerances must be finite numbers >= 0 (rtol={rtol}, atol={atol}, eps={eps})")
    a = a.detach().cpu()
    b = b.detach().cpu()
    notes: list[str] = []
    for side, t in (("a", a), ("b", b)):
        if t.is_complex():
            return _fail(
                name, a, b, rtol, atol, eps, f"{side} is complex ({t.dtype}); only real tensors are compared"
            )
    if tuple(a.shape) != tuple(b.shape):
        if a.numel() == b.numel():
            notes.append(
                "same number of elements: maybe a dimension was squeezed/unsqueezed or the tensor was reshaped"
            )
        elif a.dim() == b.dim():
            dims = [i for i in range(a.dim()) if a.shape[i] != b.shape[i]]
            notes.append(f"shapes differ in dim(s) {dims}")
        return _fail(
            name, a, b, rtol, atol, eps, f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}", notes
        )
    if a.dtype != b.dtype:
        notes.append(f"dtypes differ ({_dtype_name(a)} vs {_dtype_name(b)}): compared in float64")
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    numel = a.numel()

    # allclose, torch semantics
    if a.dtype == b.dtype and a.is_floating_point():
        close = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    else:
        close = torch.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=equal_nan)
    violations = int((~close).sum())

    nan_a, nan_b = int(torch.isnan(a64).sum()), int(torch.isnan(b64).sum())
    inf_a, inf_b = int(torch.isinf(a64).sum()), int(torch.isinf(b64).sum())
    finite = torch.isfinite(a64) & torch.isfinite(b64)
    compared = int(finite.sum())
    if compared < numel:
        notes.append(
            f"{numel - compared} element(s) with NaN/Inf on either side are left out of the error statistics"
        )

    abs_err = (a64 - b64).abs()
    abs_b = b64.abs()
    rel_err = abs_err / (abs_b + eps)
    abs_f = abs_err[finite]
    rel_f = rel_err[finite]
    b_f = abs_b[finite]

    stats: dict[str, Any] = {}
    top: list[TopDiff] = []
    per_channel: list[ChannelStat] = []
    near_zero_note = None
    nz_count = 0
    if compared > 0:
        mean_abs_b = float(b_f.mean())
        threshold = near_zero if near_zero is not None else max(atol, NEAR_ZERO_REL * mean_abs_b)
        near = b_f < threshold
        nz_count = int(near.sum())
        max_rel = float(rel_f.max())
        rel_far = rel_f[~near]
        max_rel_far = float(rel_far.max()) if rel_far.numel() else None
        stats = {
            "max_abs_err": float(abs_f.max()),
            "mean_abs_err": float(abs_f.mean()),
            "max_rel_err": max_rel,
            "mean_rel_err": float(rel_f.mean()),
            "max_rel_err_excl_near_zero": max_rel_far,
            "mean_abs_b": mean_abs_b,
            "near_zero_threshold": threshold,
        }
        if nz_count and max_rel > rtol and bool(near[int(rel_f.argmax())]):
            at = int(rel_f.argmax())
            excl = (
                f"excluding them, the max relative error is {max_rel_far:.3g}"
                if max_rel_far is not None
                else "every element is near zero"
            )
            how = (
                f"max(atol, 1e-3 x mean |b| = {NEAR_ZERO_REL * mean_abs_b:.3g})"
                if near_zero is None
                else "as given"
            )
            near_zero_note = (
                f"max relative error {max_rel:.3g} is inflated by a near-zero reference: it occurs where "
                f"|b| = {float(b_f[at]):.3g} (|a - b| = {float(abs_f[at]):.3g}); {nz_count} of {compared} elements "
                f"({nz_count / compared:.2%}) have |b| < {threshold:.3g} ({how}); {excl}. Dividing by a "
                "near-zero reference makes any small absolute difference huge in relative terms: judge by the "
                "absolute error and allclose (|a - b| <= atol + rtol |b|) instead."
            )
        # largest absolute differences (finite elements only)
        k = min(top_k, compared)
        if k > 0:
            ranked = torch.where(finite, abs_err, torch.full_like(abs_err, -1.0)).reshape(-1)
            vals, idx = torch.topk(ranked, k)
            for v, flat in zip(vals.tolist(), idx.tolist(), strict=True):
                if v < 0:
                    break
                index = tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape))) if a.dim() else ()
                top.append(
                    TopDiff(
                        index=index,
                        a=float(a64.reshape(-1)[flat]),
                        b=float(b64.reshape(-1)[flat]),
                        abs_err=float(v),
                        rel_err=float(rel_err.reshape(-1)[flat]),
                    )
                )
        # per-channel statistics along dim 1
        if a.dim() >= 2 and a.shape[1] > 0:
            ch_abs = abs_err.transpose(0, 1).reshape(a.shape[1], -1)
            ch_fin = finite.transpose(0, 1).reshape(a.shape[1], -1)
            ch_bad = (~close).transpose(0, 1).reshape(a.shape[1], -1)
            for ch in range(a.shape[1]):
                vals_c = ch_abs[ch][ch_fin[ch]]
                per_channel.append(
                    ChannelStat(
                        channel=ch,
                        max_abs_err=float(vals_c.max()) if vals_c.numel() else float("nan"),
                        mean_abs_err=float(vals_c.mean()) if vals_c.numel() else float("nan"),
                        violations=int(ch_bad[ch].sum()),
                    )
                )
    elif numel > 0:
        notes.append("no element is finite on both sides")

    allclose = violations == 0
    return DiffReport(
        name=name,
        ok=allclose,
        comparable=True,
        reason=None if allclose else f"{violations} of {numel} elements exceed atol + rtol * |b|",
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=_dtype_name(a),
        dtype_b=_dtype_name(b),
        rtol=rtol,
        atol=atol,
        eps=eps,
        numel=numel,
        compared=compared,
        near_zero_count=nz_count,
        near_zero_fraction=nz_count / compared if compared else 0.0,
        near_zero_note=near_zero_note,
        allclose=allclose,
        violations=violations,
        violation_fraction=violations / numel if numel else 0.0,
        top=tuple(top),
        per_channel=tuple(per_channel),
        nan_a=nan_a,
        nan_b=nan_b,
        inf_a=inf_a,
        inf_b=inf_b,
        notes=tuple(notes),
        **stats,
    )


@dataclass(frozen=True)
class DiffSetReport:
    """The comparison of two dicts of tensors: one report per common key, and the unmatched keys."""

    reports: tuple[DiffReport, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    label_a: str = "a"
    label_b: str = "b"

    @property
    def ok(self) -> bool:
        return not self.only_in_a and not self.only_in_b and all(r.ok for r in self.reports)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "a": self.label_a,
            "b": self.label_b,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "reports": [r.to_dict() for r in self.reports],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def compare_dicts(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    rtol: float = 1e-5,
    atol: float = 1e-6,
    eps: float = 1e-8,
    *,
    label_a: str = "a",
    label_b: str = "b",
    top_k: int = 5,
) -> DiffSetReport:
    """:func:`compare` on every key present in both (in ``a``'s order), plus the keys only one side has."""
    common = [k for k in a if k in b]
    reports = tuple(compare(a[k], b[k], rtol, atol, eps, name=k, top_k=top_k) for k in common)
    return DiffSetReport(
        reports=reports,
        only_in_a=tuple(k for k in a if k not in b),
        only_in_b=tuple(k for k in b if k not in a),
        label_a=label_a,
        label_b=label_b,
    )


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _f(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.3e}"


_MAX_CHANNEL_ROWS = 16


def _render_one(report: DiffReport, console: Any) -> None:
    from rich.table import Table

    verdict = "[green]within tolerance[/green]" if report.ok else "[red]DIFFERENT[/red]"
    title = f"{report.name}: {verdict}" if report.name else verdict
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    shape_ok = report.shape_a == report.shape_b
    t.add_row(
        "shape", f"{report.shape_a}" + ("" if shape_ok else f" vs {report.shape_b}  [red]mismatch[/red]")
    )
    dtype_ok = report.dtype_a == report.dtype_b
    t.add_row("dtype", report.dtype_a + ("" if dtype_ok else f" vs {report.dtype_b}"))
    if report.comparable:
        t.add_row("max abs error", _f(report.max_abs_err))
        t.add_row("mean abs error", _f(report.mean_abs_err))
        t.add_row("max rel error", _f(report.max_rel_err))
        t.add_row("mean rel error", _f(report.mean_rel_err))
        if report.near_zero_count:
            t.add_row(
                "near-zero reference",
                f"{report.near_zero_count} ({report.near_zero_fraction:.2%}) with |b| < {_f(report.near_zero_threshold)}; "
                f"max rel error without them {_f(report.max_rel_err_excl_near_zero)}",
            )
        t.add_row(
            f"allclose (rtol={report.rtol:g}, atol={report.atol:g})",
            ("[green]yes[/green]" if report.allclose else "[red]no[/red]")
            + f"  ({report.violations} of {report.numel} elements violate, {report.violation_fraction:.2%})",
        )
        if report.nan_a or report.nan_b or report.inf_a or report.inf_b:
            t.add_row("NaN a / b", f"{report.nan_a} / {report.nan_b}")
            t.add_row("Inf a / b", f"{report.inf_a} / {report.inf_b}")
    if report.reason and not report.ok:
        t.add_row("reason", report.reason)
    if report.near_zero_note:
        t.add_row("note", f"[yellow]{report.near_zero_note}[/yellow]")
    for note in report.notes:
        t.add_row("note", note)
    console.print(t)

    if report.top and report.max_abs_err:
        top = Table(title="largest absolute differences", title_justify="left")
        for col in ("index", "a", "b", "|a-b|", "rel"):
            top.add_column(col, justify="right")
        for d in report.top:
            top.add_row(str(d.index), f"{d.a:.6g}", f"{d.b:.6g}", _f(d.abs_err), _f(d.rel_err))
        console.print(top)
    if report.per_channel and report.max_abs_err:
        rows = list(report.per_channel)
        title = "per channel (dim 1)"
        if len(rows) > _MAX_CHANNEL_ROWS:
            rows = sorted(rows, key=lambda c: -(c.max_abs_err if not math.isnan(c.max_abs_err) else -1))
            rows = sorted(rows[:_MAX_CHANNEL_ROWS], key=lambda c: c.channel)
            title += f": the {_MAX_CHANNEL_ROWS} worst of {len(report.per_channel)}"
        ch = Table(title=title, title_justify="left")
        for col in ("channel", "max |a-b|", "mean |a-b|", "violations"):
            ch.add_column(col, justify="right")
        for c in rows:
            ch.add_row(str(c.channel), _f(c.max_abs_err), _f(c.mean_abs_err), str(c.violations))
        console.print(ch)


def render_report(report: DiffReport | DiffSetReport, console: Any = None) -> None:
    """Print a report as rich tables (to ``console``, default a new stdout console)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if isinstance(report, DiffReport):
        _render_one(report, console)
        return
    summary = Table(title=f"{report.label_a} vs {report.label_b} (reference)", title_justify="left")
    for col, justify in (
        ("key", "left"),
        ("shape", "left"),
        ("max |a-b|", "right"),
        ("max rel", "right"),
        ("violations", "right"),
        ("ok", "center"),
    ):
        summary.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in report.reports:
        shape = str(r.shape_a) if r.shape_a == r.shape_b else f"{r.shape_a} vs {r.shape_b}"
        summary.add_row(
            r.name or "",
            shape,
            _f(r.max_abs_err),
            _f(r.max_rel_err),
            str(r.violations) if r.comparable else "-",
            "[green]yes[/green]" if r.ok else "[red]no[/red]",
        )
    console.print(summary)
    if report.only_in_a:
        console.print(f"[red]only in {report.label_a}[/red]: {', '.join(report.only_in_a)}")
    if report.only_in_b:
        console.print(f"[red]only in {report.label_b}[/red]: {', '.join(report.only_in_b)}")
    for r in report.reports:
        if not r.ok:
            _render_one(r, console)
    n_bad = sum(not r.ok for r in report.reports)
    verdict = "[green]all within tolerance[/green]" if report.ok else "[red]DIFFERENT[/red]"
    console.print(
        f"{verdict}: {len(report.reports)} common key(s), {n_bad} beyond tolerance, "
        f"{len(report.only_in_a)} only in {report.label_a}, {len(report.only_in_b)} only in {report.label_b}"
    )


# --------------------------------------------------------------------------------------------------
# CLI entry point
# --------------------------------------------------------------------------------------------------


def run_diff_cli(
    a: Path,
    b: Path,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    as_json: bool = False,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``diffguide diff A B``: compare file A with the reference B and print the report.

    Returns the exit code: 0 when everything is within tolerance, 1 when something differs (values
    beyond tolerance, a shape mismatch, keys on one side only), 2 for bad input (unreadable file,
    negative tolerance). When both files hold exactly one tensor they are compared whatever their
    names (a .npy file's "tensor" against a .safetensors file's "latents").
    """
    from rich.console import Console

    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        if not all(math.isfinite(t) and t >= 0 for t in (rtol, atol)):
            raise DiffguideError(f"tolerances must be finite numbers >= 0 (rtol={rtol}, atol={atol})")
        ta = load_tensors(a)
        tb = load_tensors(b)
    except DiffguideError as exc:
        print(f"error: {exc}", file=err)
        return 2
    report: DiffReport | DiffSetReport
    if len(ta) == 1 and len(tb) == 1:
        (ka, va), (kb, vb) = next(iter(ta.items())), next(iter(tb.items()))
        report = compare(va, vb, rtol=rtol, atol=atol, name=ka if ka == kb else f"{ka} vs {kb}")
    else:
        report = compare_dicts(ta, tb, rtol=rtol, atol=atol, label_a=str(a), label_b=str(b))
    if as_json:
        doc = report.to_dict()
        if isinstance(report, DiffReport):
            doc = {"a": str(a), "b": str(b), **doc}
        print(json.dumps(doc, indent=2, allow_nan=False), file=out)
    else:
        console = Console(file=out, highlight=False, soft_wrap=False, width=120 if not out.isatty() else None)
        console.print(f"comparing [bold]{a}[/bold] with reference [bold]{b}[/bold]")
        render_report(report, console)
    return 0 if report.ok else 1
