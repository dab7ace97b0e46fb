"""``diffguide bench report``: merge quality-benchmark runs and answer "does X improve FID?".

A long benchmark is often run as several processes, each with part of the settings and its
own out dir. This merges them (same model, steps, scheduler, seeds and reference, and the
same N for every setting, are required) and adds **paired bootstrap**
FID differences: image i of every setting has seed i, so a resample of image indices is
applied to both settings of a comparison; the spread of FID(a) - FID(b) over R resamples
(reference fixed) is the noise of that difference. FID on a resample with repeated images is
biased upwards, so the reported difference is the one on the full sets; the bootstrap gives
its standard deviation, and the 95% interval is difference +- 1.96 sd.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiffguideError
from ..io import replace_atomic
from .metrics import FIDReference
from .quality import Setting, _json_default, markdown_table, plot

MUST_MATCH = (
    "model_hashes",
    "steps",
    "scheduler",
    "seed",
    "pag_layers",
    "tpg_layers",
    "layers",
    "feature_extractor",
)


@dataclass(frozen=True)
class Comparison:
    question: str
    a: str  # setting names: FID(a) - FID(b)
    b: str


def load_runs(dirs: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first run's header and every run's rows; runs that disagree on MUST_MATCH are refused."""
    runs = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            raise DiffguideError(f"{path} does not exist: give out dirs of 'diffguide bench quality'")
        runs.append(json.loads(path.read_text()))
    head = runs[0]
    for d, r in zip(dirs[1:], runs[1:], strict=True):
        for key in MUST_MATCH:
            if r.get(key) != head.get(key):
                raise DiffguideError(f"{d} differs from {dirs[0]} in '{key}': runs cannot be merged")
        if r["reference"].get("key") != head["reference"].get("key"):
            raise DiffguideError(f"{d} used another reference set than {dirs[0]}")
    rows = [row | {"dir": str(d)} for d, r in zip(dirs, runs, strict=True) for row in r["settings"]]
    names = [row["setting"] for row in rows]
    if len(set(names)) != len(names):
        raise DiffguideError(f"a setting appears in more than one run: {sorted(names)}")
    return head, rows


def load_features(row: dict[str, Any], n: int) -> np.ndarray:
    path = Path(row["dir"]) / "settings" / f"{Setting.parse(row['setting']).file_stem}.npz"
    feats = np.load(path)["features"]
    if len(feats) < n:
        raise DiffguideError(f"{path} holds {len(feats)} images, {n} needed")
    return feats[:n]


def _label(s: Setting) -> str:
    """``CFG 3 + TPG 3``, ``apg:scale=5,eta=0``: a setting's terms for a question's text."""
    return " + ".join([f"{m.upper()} {v:g}" for m, v in s.scales] + list(s.extras))


def _is_plain_cfg(s: Setting) -> bool:
    return s.conditional and not s.extras and s.method == "cfg"


def _accuracy(row: dict[str, Any]) -> float | None:
    digits, garments = row.get("digit_accuracy"), row.get("garment_accuracy")
    return None if digits is None or garments is None else (float(digits) + float(garments)) / 2


def comparisons(rows: list[dict[str, Any]]) -> list[Comparison]:
    """The questions these settings can answer: each guided setting against no guidance (when
    it has no CFG) or against CFG at its own scale (when it adds to CFG); each conditional
    setting against the best CFG alone (lowest FID) and against the CFG row of the nearest mean
    prompt accuracy ("at equal prompt accuracy"); and the best CFG against no guidance."""
    by = {r["setting"]: r for r in rows}
    out: list[Comparison] = []

    def add(question: str, a: str, b: str) -> None:
        if a in by and b in by and a != b and all((c.a, c.b) != (a, b) for c in out):
            out.append(Comparison(question, a, b))

    cfgs = [r for r in rows if _is_plain_cfg(Setting.parse(r["setting"]))]
    best = min(cfgs, key=lambda r: r["fid"])["setting"] if cfgs else None
    for r in rows:
        s = Setting.parse(r["setting"])
        kind = "conditional" if s.conditional else "unconditional"
        if s.method == "none" or _is_plain_cfg(s):
            continue
        label = _label(s)
        if s.cfg == 1.0:
            add(f"{kind}: {label} alone vs no guidance", r["setting"], Setting(s.conditional).name)
        else:
            add(f"{kind}: {label} vs CFG {s.cfg:g}", r["setting"], Setting(True, s.cfg).name)
        if best is not None and s.conditional:
            add(f"{kind}: {label} vs best CFG alone ({best})", r["setting"], best)
            acc = _accuracy(r)
            with_acc = [c for c in cfgs if _accuracy(c) is not None]
            if acc is not None and with_acc:
                near = min(with_acc, key=lambda c: abs(_accuracy(c) - acc))["setting"]  # type: ignore[operator]
                add(f"{kind}: {label} vs CFG at the nearest prompt accuracy ({near})", r["setting"], near)
    if best is not None:
        add(f"conditional: best CFG alone ({best}) vs no guidance", best, "cond/none")
    return out


def bootstrap_fids(fid: FIDReference, feats: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """FID of each resample ``feats[draws[k]]`` (draws: (R, n) image indices)."""
    return np.array([fid(feats[idx]) for idx in draws])


def paired_difference(full: tuple[float, float], boot_a: np.ndarray, boot_b: np.ndarray) -> dict[str, Any]:
    """FID(a) - FID(b) on the full sets, the sd of the paired resampled differences, and the
    normal 95% interval around the full-set difference (resampled FIDs are biased upwards, so
    percentiles of the resampled differences would be off-centre)."""
    d = full[0] - full[1]
    sd = float((boot_a - boot_b).std(ddof=1))
    return {"difference": d, "sd": sd, "ci95": [d - 1.96 * sd, d + 1.96 * sd]}


def merge(dirs: list[Path], out: Path, resamples: int = 100, seed: int = 0) -> dict[str, Any]:
    """Merge runs into ``out`` (results.json, results.md, plot.png, grids/) with comparisons."""
    head, rows = load_runs(dirs)
    fill_evaluations(head, rows)
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) > 1:
        raise DiffguideError(
            f"the runs' settings have different N ({sizes}); resume them to the same N first"
        )
    n = sizes[0]
    if resamples < 2:
        raise DiffguideError(f"resamples must be >= 2, got {resamples}")
    fid = FIDReference.from_features(np.load(head["reference"]["cache"])["features"])
    fids = {r["setting"]: r["fid"] for r in rows}
    questions = comparisons(rows)
    needed = sorted({name for c in questions for name in (c.a, c.b)})
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))  # the same draws for every setting
    boot = {name: bootstrap_fids(fid, load_features(by_name(rows, name), n), draws) for name in needed}
    table = [
        {
            "question": c.question,
            "a": c.a,
            "b": c.b,
            **paired_difference((fids[c.a], fids[c.b]), boot[c.a], boot[c.b]),
        }
        for c in questions
    ]
    merged = head | {"n": n, "runs": [str(d) for d in dirs], "settings": rows, "comparisons": table}
    merged["bootstrap"] = {"resamples": resamples, "seed": seed, "paired": "same image indices in a and b"}
    write(merged, out, dirs)
    return merged


def fill_evaluations(head: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Rows of runs made before the bench counted model evaluations get them now: one probe image
    per setting on the run's model (checked by its hashes), steps, scheduler and layer specs."""
    missing = [r for r in rows if r.get("evaluations_per_step") is None]
    if not missing:
        return
    from ..pipeline import GuidedPipeline
    from .quality import BenchOptions, evaluations_per_step
    from .reference import captions

    def spec(value: str | None) -> str | None:  # results.json writes "preset (...)" for None
        return None if value is None or value.startswith("preset") else value

    pipe = GuidedPipeline.from_pretrained(head["model"])
    if pipe.component_hashes() != head["model_hashes"]:
        raise DiffguideError(f"{head['model']} is not the model these runs sampled (its hashes differ)")
    opts = BenchOptions(
        model=head["model"], out=Path("."), steps=head["steps"], scheduler=head["scheduler"], seed=head["seed"],
        pag_layers=spec(head.get("pag_layers")), tpg_layers=spec(head.get("tpg_layers")),
        layers=dict(head.get("layers") or {}),
    )  # fmt: skip
    texts = captions()
    for r in missing:
        r["evaluations_per_step"] = evaluations_per_step(pipe, opts, Setting.parse(r["setting"]), texts)


def by_name(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in rows if r["setting"] == name)


def comparison_table(table: list[dict[str, Any]], fids: dict[str, float]) -> str:
    lines = [
        "| question | FID | difference | bootstrap sd | 95% interval |",
        "|---|---|---:|---:|---|",
    ]
    for c in table:
        a, b = fids[c["a"]], fids[c["b"]]
        lo, hi = c["ci95"]
        lines.append(
            f"| {c['question']} | {a:.1f} vs {b:.1f} | {c['difference']:+.1f} ({100 * c['difference'] / b:+.0f}%) "
            f"| {c['sd']:.1f} | [{lo:+.1f}, {hi:+.1f}] |"
        )
    return "\n".join(lines)


def write(merged: dict[str, Any], out: Path, dirs: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = merged["settings"]
    fids = {r["setting"]: r["fid"] for r in rows}
    replace_atomic(out / "results.json", json.dumps(merged, indent=2, default=_json_default) + "\n")
    md = markdown_table(rows) + "\n\n" + comparison_table(merged["comparisons"], fids) + "\n"
    replace_atomic(out / "results.md", md)
    with contextlib.suppress(ImportError):
        plot(rows, out / "plot.png")
    (out / "grids").mkdir(exist_ok=True)
    for d in dirs:
        for grid in sorted((d / "grids").glob("*.png")):
            shutil.copyfile(grid, out / "grids" / grid.name)
