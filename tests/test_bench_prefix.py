"""``benchmarks/step_cost.py --prefix-only``: the prefix-sharing rows as a smoke test on the tiny
UNet (``--quick``): every contender runs, shared and unshared compute the same latents, and each
ratio comes with its bound from the unit time shares."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


def test_quick_prefix_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve annotations through sys.modules
    threads = torch.get_num_threads()  # unchanged for the tests that follow
    out = tmp_path / "prefix.json"
    try:
        spec.loader.exec_module(bench)
        assert bench.main(["--quick", "--prefix-only", "--threads", str(threads), "--json", str(out)]) == 0
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)
    doc = json.loads(out.read_text())
    assert sorted(doc["contenders"]) == sorted(f"{k}_b1" for k in bench.PREFIX_KEYS)
    for clock in ("wall", "cpu"):
        rows = doc["summary"][f"prefix_{clock}"]["b1"]
        assert set(rows) == {
            "pag_shared_vs_pipeline",
            "pag_shared_vs_unshared",
            "pag_unshared_vs_pipeline",
            "tpg_shared_vs_unshared",
        }
        assert 0.5 < rows["pag_shared_vs_unshared"]["bound"] < 1.0  # the down blocks are shared
    text = capsys.readouterr().out
    same = re.findall(r"latents\(dg_(?:pag|tpg1)\) - latents\(dg_(?:pag|tpg1)_ns\)\| = (\S+)", text)
    assert len(same) == 2 and max(float(d) for d in same) <= 1e-5
