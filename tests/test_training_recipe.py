"""The training recipes (training/train.py, training/train_sd3.py) resume bit for bit: a stage
stopped after a checkpoint and started again ends where an uninterrupted run ends. Tiny stand-in
data (random latents and prompt embeddings), a few steps each."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

TRAINING = Path(__file__).resolve().parents[1] / "training"
TOKENIZER = Path(__file__).resolve().parents[1] / "src/diffguide/assets/tiny-sd/tokenizer"


@pytest.fixture(scope="module")
def recipes():
    """The recipe modules, imported from training/ and dropped from sys.modules afterwards (their
    names, e.g. ``data``, must not shadow anything for later tests)."""
    threads, before = torch.get_num_threads(), set(sys.modules)
    sys.path.insert(0, str(TRAINING))
    try:
        yield {m: importlib.import_module(m) for m in ("common", "train", "train_sd3")}
    finally:
        sys.path.remove(str(TRAINING))
        torch.set_num_threads(threads)  # the recipes pin one thread at import
        for name in set(sys.modules) - before:
            if str(TRAINING) in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]


class Stop(Exception):
    pass


def _args(steps: int, **kw) -> argparse.Namespace:
    return argparse.Namespace(seed=0, steps=steps, batch=4, ema=0.999, cfg_drop=0.3, ckpt_minutes=60.0, **kw)


def _latents(run: Path, common) -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(20).repeat(3)
    mean, std = torch.randn(60, 4, 8, 8, generator=g), 0.1 * torch.rand(60, 4, 8, 8, generator=g)
    common.atomic_save(
        {"mean": mean, "std": std, "labels": labels, "scaling_factor": 0.9}, run / "latents.pt"
    )
    shutil.copytree(TOKENIZER, run / "tokenizer")


def _prepared(run: Path, common) -> None:
    g = torch.Generator().manual_seed(2)
    embeds = torch.cat([torch.randn(21, 77, 128, generator=g), torch.zeros(21, 256, 128)], dim=1)
    prep = {"mean": torch.randn(60, 4, 8, 8, generator=g), "std": 0.1 * torch.rand(60, 4, 8, 8, generator=g),
            "labels": torch.arange(20).repeat(3), "shift_factor": 0.1, "scaling_factor": 0.9,
            "embeds": embeds, "pooled": torch.randn(21, 128, generator=g)}  # fmt: skip
    common.atomic_save(prep, run / "prepared.pt")


def _run(stage, run: Path, log, common, monkeypatch, *, stop_at: int | None, **kw) -> None:
    if stop_at is None:
        stage(_args(4, **kw), run, log)
        return
    real = common.Checkpoint.maybe_save

    def save_then_stop(self, step: int, final: bool) -> None:
        real(self, step, final or step == stop_at)
        if step == stop_at:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(common.Checkpoint, "maybe_save", save_then_stop)
        with pytest.raises(Stop):
            stage(_args(4, **kw), run, log)
    stage(_args(4, **kw), run, log)  # resumes from the step-2 checkpoint


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("family", ["tiny-sd", "tiny-sd3"])
def test_stage_resumes_bit_for_bit(recipes, family, tmp_path, monkeypatch):
    common = recipes["common"]
    if family == "tiny-sd":
        stage, prepare, ck, kw = recipes["train"].stage_unet, _latents, "unet.pt", {"lr": 8e-4}
    else:
        stage, prepare, ck, kw = recipes["train_sd3"].stage_train, _prepared, "transformer.pt", {"lr": 5e-4}
    results = []
    for stop_at in (None, 2):
        run = tmp_path / f"run-{stop_at}"
        run.mkdir()
        prepare(run, common)
        _run(stage, run, common.Logger(run / "train.log"), common, monkeypatch, stop_at=stop_at, **kw)
        results.append(torch.load(run / ck, map_location="cpu"))
        if stop_at is not None:
            assert "resumed at step 2" in (run / "train.log").read_text()
    assert results[0]["step"] == 4
    _assert_same(results[0], results[1])


def test_ema_update_formula_and_frozen_parameters(recipes):
    common = recipes["common"]
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(3.0)
        ema.weight.fill_(0.0)
        ema.bias.fill_(5.0)
    model.bias.requires_grad_(False)
    # step 5: d = min(0.999, 6 / 15) = 0.4, so ema <- ema + 0.6 (model - ema)
    common.ema_update(((model, ema),), 5, 0.999)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.6))
    assert torch.equal(ema.bias, torch.tensor([5.0]))  # frozen: left alone
    common.ema_update(((model, ema),), 10**6, 0.9)  # late: d = decay
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.6 + 0.1 * 0.4))


def test_lr_schedule_warmup_and_floor(recipes):
    lr_at = recipes["common"].lr_at
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way down the cosine
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.05)
    assert lr_at(500, 1.0, 10, 110) == pytest.approx(0.05)
