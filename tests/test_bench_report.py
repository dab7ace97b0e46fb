"""``diffguide bench report``: merging quality runs and paired bootstrap FID differences,
on synthetic feature sets (no model, no Inception network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffguide import DiffguideError
from diffguide.bench.metrics import FIDReference
from diffguide.bench.quality import Setting
from diffguide.bench.report import bootstrap_fids, comparisons, merge, paired_difference
from diffguide.cli.main import app

N, D = 40, 6


def _features(rng, shift: float) -> np.ndarray:
    return rng.normal(size=(N, D)) + shift


def _run(tmp_path, name: str, settings: dict[str, np.ndarray], ref_path, evals: float | None = 2.0, **header):
    out = tmp_path / name
    (out / "settings").mkdir(parents=True)
    (out / "grids").mkdir()
    fid = FIDReference.from_features(np.load(ref_path)["features"])
    rows = []
    for setting, feats in settings.items():
        s = Setting.parse(setting)
        np.savez(out / "settings" / f"{s.file_stem}.npz", features=feats)
        (out / "grids" / f"{s.file_stem}.png").write_bytes(b"png")
        rows.append(
            {"setting": setting, "conditional": s.conditional, "method": s.method, "cfg_scale": s.cfg,
             "pag_scale": s.pag, "tpg_scale": s.tpg, "n": len(feats), "fid": fid(feats),
             "digit_accuracy": None, "garment_accuracy": None, "precision": 0.5, "recall": 0.5,
             "seconds": 1.0, **({} if evals is None else {"evaluations_per_step": evals})}
        )  # fmt: skip
    results = {
        "model_hashes": {"unet": "abc"}, "steps": 20, "scheduler": "euler", "seed": 0,
        "pag_layers": "preset", "tpg_layers": "preset", "feature_extractor": "x",
        "reference": {"cache": str(ref_path), "key": "k"}, "settings": rows, **header,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results))
    return out


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, features=rng.normal(size=(200, D)))
    a = _run(tmp_path, "a", {"cond/none": _features(rng, 1.0), "cond/cfg3": _features(rng, 0.3)}, ref)
    b = _run(tmp_path, "b", {"cond/tpg3": _features(rng, 0.5), "cond/cfg3+tpg3": _features(rng, 0.2)}, ref)
    return a, b, ref


def test_merge_answers_the_questions(runs, tmp_path):
    a, b, _ = runs
    merged = merge([a, b], tmp_path / "out", resamples=20)
    fids = {r["setting"]: r["fid"] for r in merged["settings"]}
    got = {(c["a"], c["b"]): c for c in merged["comparisons"]}
    assert set(got) == {
        ("cond/tpg3", "cond/none"),
        ("cond/tpg3", "cond/cfg3"),  # every conditional setting vs the best CFG alone
        ("cond/cfg3+tpg3", "cond/cfg3"),
        ("cond/cfg3", "cond/none"),  # best CFG alone vs no guidance
    }
    for (x, y), c in got.items():
        assert c["difference"] == pytest.approx(fids[x] - fids[y])
        assert c["sd"] > 0 and c["ci95"] == pytest.approx(
            [c["difference"] - 1.96 * c["sd"], c["difference"] + 1.96 * c["sd"]]
        )
    # a shift of the mean by 1.0 vs 0.3 (unit covariance): no guidance is clearly worse
    assert got[("cond/cfg3", "cond/none")]["difference"] < -3 * got[("cond/cfg3", "cond/none")]["sd"]
    out = tmp_path / "out"
    assert (out / "results.md").read_text().count("\n|") >= 4 + 3
    assert sorted(p.name for p in (out / "grids").iterdir()) == [
        "cond_cfg3.png", "cond_cfg3_tpg3.png", "cond_none.png", "cond_tpg3.png"
    ]  # fmt: skip
    assert json.loads((out / "results.json").read_text())["bootstrap"]["resamples"] == 20


def test_paired_bootstrap_cancels_shared_noise():
    """Features shifted by a constant d: the covariance terms of FID cancel in each paired
    resample, leaving exactly FID(x + d) - FID(x) = 2 d . (mean(x[idx]) - mu_ref) + |d|^2."""
    rng = np.random.default_rng(1)
    ref = FIDReference.from_features(rng.normal(size=(300, D)))
    x = rng.normal(size=(N, D))
    d = np.full(D, 0.5)
    draws = rng.integers(0, N, (30, N))
    diffs = bootstrap_fids(ref, x + d, draws) - bootstrap_fids(ref, x, draws)
    expected = [2 * d @ (x[idx].mean(0) - ref.mu) + d @ d for idx in draws]
    np.testing.assert_allclose(diffs, expected, rtol=0, atol=1e-8)
    assert paired_difference((3.0, 1.0), np.array([1.0, 2.0, 3.0]), np.zeros(3)) == {
        "difference": 2.0, "sd": 1.0, "ci95": [2.0 - 1.96, 2.0 + 1.96]
    }  # fmt: skip


def test_merge_pairs_the_bootstrap_draws(tmp_path):
    """merge() itself resamples both settings of a comparison with the same image indices: with
    b = a + d (a constant shift), its sd is exactly the sd of 2 d . (mean(x[idx]) - mu_ref) over
    the draws default_rng(seed).integers(0, n, (R, n)), far below the sd of unpaired draws."""
    rng = np.random.default_rng(2)
    ref = tmp_path / "ref.npz"
    ref_feats = rng.normal(size=(300, D))
    np.savez(ref, features=ref_feats)
    x = rng.normal(size=(N, D))
    d = np.full(D, 0.05)  # a small shift: the paired sd is small, the unpaired one is not
    run = _run(tmp_path, "p", {"cond/none": x, "cond/tpg3": x + d}, ref)
    resamples, seed = 30, 7
    merged = merge([run], tmp_path / "out", resamples=resamples, seed=seed)
    (c,) = merged["comparisons"]
    assert (c["a"], c["b"]) == ("cond/tpg3", "cond/none")

    mu_ref = FIDReference.from_features(ref_feats).mu
    draws = np.random.default_rng(seed).integers(0, N, (resamples, N))
    paired = np.array([2 * d @ (x[idx].mean(0) - mu_ref) for idx in draws])
    assert c["sd"] == pytest.approx(paired.std(ddof=1), rel=1e-6)
    # the same comparison with independent draws for b: the covariance noise does not cancel
    fid = FIDReference.from_features(ref_feats)
    other = np.random.default_rng(seed + 1).integers(0, N, (resamples, N))
    unpaired = (bootstrap_fids(fid, x + d, draws) - bootstrap_fids(fid, x, other)).std(ddof=1)
    assert c["sd"] < unpaired / 5


def test_merge_refuses_mismatched_runs(runs, tmp_path):
    a, _, ref = runs
    other = _run(tmp_path, "c", {"uncond/none": np.zeros((N, D))}, ref, model_hashes={"unet": "zzz"})
    with pytest.raises(DiffguideError, match=r"differs .* in 'model_hashes'"):
        merge([a, other], tmp_path / "o1")
    short = _run(tmp_path, "d", {"uncond/none": np.ones((N // 2, D))}, ref)
    with pytest.raises(DiffguideError, match="different N"):
        merge([a, short], tmp_path / "o2")
    with pytest.raises(DiffguideError, match="more than one run"):
        merge([a, a], tmp_path / "o3")


def test_comparisons_only_for_present_settings():
    rows = [
        {"setting": "uncond/none", "conditional": False, "method": "none", "fid": 5.0},
        {"setting": "uncond/pag3", "conditional": False, "method": "pag", "fid": 4.0},
        {"setting": "cond/pag3", "conditional": True, "method": "pag", "fid": 4.0},
    ]
    assert [(c.a, c.b) for c in comparisons(rows)] == [("uncond/pag3", "uncond/none")]


def test_comparisons_against_best_cfg_and_matched_accuracy():
    """Every guided conditional setting is compared with the best CFG (lowest FID) and with the
    CFG row of the nearest mean prompt accuracy; extra-syntax terms are labelled as written."""

    def row(name, fid, acc=None):
        s = Setting.parse(name)
        return {"setting": name, "conditional": s.conditional, "method": s.method, "fid": fid,
                "digit_accuracy": acc, "garment_accuracy": acc}  # fmt: skip

    rows = [
        row("cond/none", 50, 0.7),
        row("cond/cfg2", 40, 0.9),  # best FID
        row("cond/cfg5", 45, 0.99),
        row("cond/apg:scale=5,eta=0", 41, 0.98),
        row("cond/cfg3+slg2", 39, 0.95),
    ]
    got = [(c.question, c.a, c.b) for c in comparisons(rows)]
    assert got == [
        ("conditional: apg:scale=5,eta=0 alone vs no guidance", "cond/apg:scale=5,eta=0", "cond/none"),
        ("conditional: apg:scale=5,eta=0 vs best CFG alone (cond/cfg2)", "cond/apg:scale=5,eta=0", "cond/cfg2"),
        ("conditional: apg:scale=5,eta=0 vs CFG at the nearest prompt accuracy (cond/cfg5)",
         "cond/apg:scale=5,eta=0", "cond/cfg5"),
        # CFG 3 alone is not in the run: only the best CFG and the matched-accuracy one remain
        ("conditional: CFG 3 + SLG 2 vs best CFG alone (cond/cfg2)", "cond/cfg3+slg2", "cond/cfg2"),
        ("conditional: CFG 3 + SLG 2 vs CFG at the nearest prompt accuracy (cond/cfg5)",
         "cond/cfg3+slg2", "cond/cfg5"),
        ("conditional: best CFG alone (cond/cfg2) vs no guidance", "cond/cfg2", "cond/none"),
    ]  # fmt: skip


def test_cli_report(runs, tmp_path):
    a, b, _ = runs
    res = CliRunner().invoke(
        app, ["bench", "report", str(a), str(b), "--out", str(tmp_path / "r"), "--resamples", "5"]
    )
    assert res.exit_code == 0, res.output
    assert "TPG 3 alone vs no guidance" in res.stdout and "bootstrap sd" in res.stdout
    bad = CliRunner().invoke(app, ["bench", "report", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_merge_counts_the_model_evaluations_of_older_runs(tmp_path):
    """Runs written before the bench counted evaluations: the report counts them on the run's model."""
    from diffguide.pipeline import GuidedPipeline
    from diffguide.testing import tiny_sd15

    model = tmp_path / "tiny"
    tiny_sd15().save_pretrained(model)
    hashes = GuidedPipeline.from_pretrained(str(model)).component_hashes()
    rng = np.random.default_rng(3)
    ref = tmp_path / "ref.npz"
    np.savez(ref, features=rng.normal(size=(200, D)))
    expected = {  # per image and step: cond, + uncond, + PAG's branch; CFG on the first half only
        "cond/none": 1.0,
        "cond/cfg3": 2.0,
        "cond/cfg3+pag2": 3.0,
        "cond/cfg:scale=3,window=0:0.5": 1.5,
    }
    settings = {name: _features(rng, 0.5) for name in expected}
    run = _run(tmp_path, "a", settings, ref, evals=None, model=str(model), model_hashes=hashes, steps=4)
    merged = merge([run], tmp_path / "out", resamples=4)
    assert {r["setting"]: r["evaluations_per_step"] for r in merged["settings"]} == expected
    assert "| 1.50 |" in (tmp_path / "out" / "results.md").read_text()
    other = _run(tmp_path, "b", settings, ref, evals=None, model=str(model), model_hashes={"unet": "x"})
    with pytest.raises(DiffguideError, match="not the model these runs sampled"):
        merge([other], tmp_path / "out2", resamples=4)
