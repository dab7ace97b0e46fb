"""ComfyUI loads the node pack both ways: ``NODE_CLASS_MAPPINGS`` (legacy API) and
``comfy_entrypoint()`` (the ``ComfyExtension`` API), through its own ``nodes.load_custom_node``;
the V3 nodes have the legacy nodes' ids, names and inputs and sample the same result.

Skipped only when ComfyUI cannot be imported (failed instead when DIFFGUIDE_REQUIRE_COMFY=1).
"""

from __future__ import annotations

import asyncio
import sys

import comfy_support
import comfy_workflow_support as cws
import pytest
import torch
from comfy_nodes_support import ksample, run_io_node, run_node, tiny_sd3_comfy

from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


@pytest.fixture()
def nodes():
    try:
        cn = cws.load_comfy_nodes()
    except comfy_support.ComfyUnavailable as exc:
        pytest.skip(f"ComfyUI core not available: {exc}")
    before = dict(cn.nodes.NODE_CLASS_MAPPINGS), dict(cn.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    modules = set(sys.modules)
    yield cn.nodes
    for mapping, saved in zip(
        (cn.nodes.NODE_CLASS_MAPPINGS, cn.nodes.NODE_DISPLAY_NAME_MAPPINGS), before, strict=True
    ):
        mapping.clear()
        mapping.update(saved)
    for name in set(sys.modules) - modules:
        if "diffguide" in name:  # the pack modules ComfyUI registered under their paths
            del sys.modules[name]


def load(nodes, path) -> bool:
    return asyncio.run(nodes.load_custom_node(str(path)))


def test_comfyui_loads_the_pack_by_node_class_mappings(nodes):
    assert "DiffguidePAG" not in nodes.NODE_CLASS_MAPPINGS
    assert load(nodes, comfy_support.REPO_ROOT / "comfyui")
    for key, cls in NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[key] is cls
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == NODE_DISPLAY_NAME_MAPPINGS[key]


def test_comfyui_loads_the_pack_by_comfy_entrypoint(nodes, tmp_path):
    from comfy_api.latest import io

    pack = tmp_path / "diffguide_v3"
    pack.mkdir()
    (pack / "__init__.py").write_text("from diffguide.comfy_nodes.v3 import comfy_entrypoint\n")
    assert load(nodes, pack)
    loaded = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("Diffguide")}
    assert set(loaded) == set(NODE_CLASS_MAPPINGS)
    for key, cls in loaded.items():
        assert issubclass(cls, io.ComfyNode) and cls is not NODE_CLASS_MAPPINGS[key]
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == NODE_DISPLAY_NAME_MAPPINGS[key]
        info = cls.GET_NODE_INFO_V1()  # what ComfyUI's /object_info serves
        legacy = NODE_CLASS_MAPPINGS[key].INPUT_TYPES()["required"]
        assert list(info["input"]["required"]) == list(legacy), key
        assert info["output"] == ["MODEL", "STRING"] and info["category"] == "diffguide"
    pag = info_of(loaded["DiffguidePAG"], "scale")
    assert pag[0] == "FLOAT" and pag[1]["default"] == 3.0 and pag[1]["max"] == 100.0

    # the V3 node runs in ComfyUI's io machinery and samples exactly what the legacy node samples
    patcher = tiny_sd3_comfy()
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    neg = [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    spec = NODE_CLASS_MAPPINGS["DiffguidePAG"].INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in spec.items() if k != "model"} | {"layers": "b1", "scale": 2.0}
    v3_model = run_io_node(loaded["DiffguidePAG"], model=patcher, **values)
    v1_model, _ = run_node(NODE_CLASS_MAPPINGS["DiffguidePAG"], patcher, layers="b1", scale=2.0)
    kw = dict(seed=1, steps=3, cfg=3.0)
    latent = torch.zeros(1, 16, 8, 8)
    v3 = ksample(v3_model, pos, neg, latent, **kw)
    assert torch.equal(v3, ksample(v1_model, pos, neg, latent, **kw))
    assert (v3 - ksample(patcher, pos, neg, latent, **kw)).abs().max() > 1e-3


def info_of(cls, name):
    return cls.GET_NODE_INFO_V1()["input"]["required"][name]
