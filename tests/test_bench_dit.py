"""``benchmarks/step_cost_dit.py``: the transformer per-step cost benchmark, as a smoke test on tiny
models (``--quick``): every contender runs, diffguide and diffusers compute the same latents, the
model-unchanged guard catches what it must."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost_dit.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_cost_dit", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_run_times_every_contender_and_matches_diffusers(bench, tmp_path, capsys):
    out = tmp_path / "dit.json"
    threads = torch.get_num_threads()  # unchanged for the tests that follow
    assert bench.main(["--quick", "--threads", str(threads), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    keys = {
        "sd3": ["ideal2", "dg_cfg", "hf_cfg", "ideal3", "dg_slg", "dg_slg_ns", "hf_slg"],
        "flux": ["ideal1", "dg_emb", "hf_emb", "ideal2", "dg_tcfg", "hf_tcfg"],
    }
    assert list(doc["contenders"]) == [f"{m}_{k}_b1" for m, ks in keys.items() for k in ks]
    rows = {k: c["rows"] for k, c in doc["contenders"].items()}
    assert (
        rows["sd3_dg_slg_b1"] == rows["sd3_dg_slg_ns_b1"] == rows["sd3_hf_slg_b1"] == 3
        and rows["flux_dg_tcfg_b1"] == 2
    )
    for key, c in doc["contenders"].items():
        assert len(c["step_s"]["wall"]) == len(c["step_s"]["cpu"]) == 2  # 3 steps, step 0 untimed
        assert all(t > 0 for t in c["step_s"]["cpu"])
        if "_dg_" in key:  # every diffguide contender: an ideal, a diffusers rival, two verdicts
            assert c["ideal"] and c["rival"] == key.replace("_dg_", "_hf_").replace("_ns_", "_")
            assert set(doc["summary"]["targets"][key]["cpu"]) == {"vs_ideal", "vs_diffusers"}
    text = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"latents\(diffusers\)\| = (\S+)", text)]
    assert len(diffs) == 5 and max(diffs) <= 1e-4  # CFG, CFG+SLG shared and not, embedded, true CFG
    slg = float(re.search(r"max \|CFG\+SLG - CFG\| = (\S+)", text).group(1))
    assert slg > 1e-2  # the SLG branch ran and changed the result


def test_guard_catches_hooks_in_place_changes_and_processors(bench):
    model = bench.sd3_model(bench.QUICK)
    guard = bench.Guard("SD3", model)
    guard.check(full=True)
    handle = model.transformer_blocks[1].register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match=r"^SD3: module 'transformer_blocks\.1' left with hooks"):
        guard.check()
    handle.remove()
    guard.check()
    with torch.no_grad():
        model.proj_out.weight.mul_(1.0)  # same values, but written in place
    with pytest.raises(RuntimeError, match=r"^SD3: a parameter was replaced or modified in place$"):
        guard.check()
    guard = bench.Guard("SD3", model)
    from diffusers.models.attention_processor import AttnProcessor

    model.transformer_blocks[0].attn.set_processor(AttnProcessor())
    with pytest.raises(RuntimeError, match=r"^SD3: attention processors changed"):
        guard.check()


def test_slg_blocks_are_the_sd3_preset_scaled(bench):
    assert bench.FULL.slg_blocks() == [7, 8, 9]  # 12 blocks: the SD3 preset b7-9
    assert bench.QUICK.slg_blocks() == [2, 3]
