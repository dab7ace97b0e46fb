"""The node pack's example workflows in docs/examples (docs/comfyui-nodes.md) match the nodes:
every diffguide node of a workflow exists and is given exactly its inputs, each widget value of
its type and range (or one of its choices). No ComfyUI needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "docs" / "examples").glob("comfyui-pag-tpg*.json"))


def test_both_examples_are_found():
    assert [p.name for p in EXAMPLES] == ["comfyui-pag-tpg-tiny-sd.json", "comfyui-pag-tpg-workflow.json"]


def widget_problem(value, spec) -> str | None:
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        return None if value in kind else f"{value!r} not in {kind}"
    if not isinstance(value, {"FLOAT": (int, float), "STRING": str}[kind]):
        return f"{value!r} is not a {kind}"
    if kind == "FLOAT" and not options.get("min", value) <= value <= options.get("max", value):
        return f"{value} outside [{options.get('min')}, {options.get('max')}]"
    return None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_matches_the_nodes(path):
    wf = json.loads(path.read_text())
    ours = {nid: n for nid, n in wf.items() if n["class_type"].startswith("Diffguide")}
    assert {n["class_type"] for n in ours.values()} == {"DiffguidePAG", "DiffguideTPG"}
    for nid, n in ours.items():
        spec = NODE_CLASS_MAPPINGS[n["class_type"]].INPUT_TYPES()["required"]
        assert set(n["inputs"]) == set(spec), nid
        problems = {k: widget_problem(v, spec[k]) for k, v in n["inputs"].items() if k != "model"}
        assert not any(problems.values()), (nid, problems)
        assert n["inputs"]["model"][0] in wf
