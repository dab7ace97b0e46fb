"""ComfyUI workflow graphs: the API format ("Save (API)") and, where unambiguous, the UI format.

API format: ``{node_id: {"class_type": str, "inputs": {name: value or [node_id, slot]}}}``
(optionally wrapped as ``{"prompt": {...}}``, as ``POST /prompt`` takes it). UI format:
``{"nodes": [...], "links": [[id, from_node, from_slot, to_node, to_slot, type], ...]}``; a node's
``widgets_values`` are mapped to input names with the widget order of :mod:`.nodes`
(KSampler's extra ``control_after_generate`` value after the seed is dropped), ``Reroute``
nodes are followed, notes and muted/bypassed nodes are left out.

Every structural problem is a one-line :class:`WorkflowError` naming the node id and class:
an unsupported node, a link to a node that does not exist or to an output it does not have, an
input of the wrong type, a missing required input, a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DiffguideError
from .nodes import NODES, NodeType

#: UI-only nodes that carry no computation.
_UI_ONLY = ("Note", "MarkdownNote", "PrimitiveNode")


class WorkflowError(DiffguideError):
    """A workflow that diffguide cannot read or run, named by node id and class."""


@dataclass(frozen=True)
class Link:
    """An input fed by output ``slot`` of node ``node``."""

    node: str
    slot: int


@dataclass(frozen=True)
class Node:
    id: str
    class_type: str
    inputs: Mapping[str, Any]  # name -> literal value or Link

    @property
    def label(self) -> str:
        return f"node {self.id} ({self.class_type})"

    @property
    def spec(self) -> NodeType:
        return NODES[self.class_type]


Graph = dict[str, Node]


def read_workflow(path: str | Path) -> Graph:
    """Read a workflow JSON file (API or UI format) and check its structure."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"workflow file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WorkflowError(f"'{path}' is not a JSON workflow: {err}") from err
    return parse_workflow(data)


def parse_workflow(data: Any) -> Graph:
    """A checked graph from a workflow's JSON value (API or UI format)."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        graph = _from_ui(data)
    elif (
        isinstance(data, dict)
        and data
        and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    ):
        graph = _from_api(data)
    else:
        raise WorkflowError(
            "not a ComfyUI workflow: expected the API format {id: {class_type, inputs}} or the UI format {nodes, links}"
        )
    check_graph(graph)
    return graph


def _from_api(data: dict[str, Any]) -> Graph:
    graph: Graph = {}
    for node_id, raw in data.items():
        cls = raw.get("class_type")
        inputs = raw.get("inputs", {})
        if not isinstance(cls, str) or not isinstance(inputs, dict):
            raise WorkflowError(f"node {node_id}: needs a class_type string and an inputs object")
        parsed = {}
        for name, value in inputs.items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                parsed[name] = Link(str(value[0]), value[1])
            else:
                parsed[name] = value
        graph[str(node_id)] = Node(str(node_id), cls, parsed)
    return graph


def _from_ui(data: dict[str, Any]) -> Graph:
    links: dict[int, Link] = {}
    for entry in data.get("links", []):
        if not (isinstance(entry, list) and len(entry) >= 5):
            raise WorkflowError(f"UI workflow: malformed link {entry!r}")
        links[int(entry[0])] = Link(str(entry[1]), int(entry[2]))
    raw_nodes = {str(n.get("id")): n for n in data["nodes"] if isinstance(n, dict)}
    reroutes = {nid: n for nid, n in raw_nodes.items() if n.get("type") == "Reroute"}

    def follow(link: Link) -> Link:
        seen = set()
        while link.node in reroutes:
            if link.node in seen:
                raise WorkflowError(f"node {link.node} (Reroute): the reroutes form a cycle")
            seen.add(link.node)
            ins = reroutes[link.node].get("inputs") or [{}]
            upstream = ins[0].get("link")
            if upstream is None or upstream not in links:
                raise WorkflowError(f"node {link.node} (Reroute): its input is not connected")
            link = links[upstream]
        return link

    graph: Graph = {}
    for nid, raw in raw_nodes.items():
        cls = raw.get("type")
        if cls in _UI_ONLY or cls == "Reroute" or raw.get("mode", 0) in (2, 4):
            continue
        if not isinstance(cls, str):
            raise WorkflowError(f"node {nid}: has no type")
        inputs: dict[str, Any] = {}
        for slot in raw.get("inputs") or []:
            if slot.get("link") is not None:
                if slot["link"] not in links:
                    raise WorkflowError(
                        f"node {nid} ({cls}): input '{slot.get('name')}' uses link {slot['link']}, which does not exist"
                    )
                inputs[str(slot.get("name"))] = follow(links[slot["link"]])
        if cls in NODES:
            inputs.update(_widgets(nid, cls, raw.get("widgets_values") or [], inputs))
        graph[nid] = Node(nid, cls, inputs)
    return graph


def _widgets(nid: str, cls: str, values: Any, linked: dict[str, Any]) -> dict[str, Any]:
    names = [n for n in NODES[cls].widgets if n not in linked]
    if isinstance(values, dict):  # some frontends store widgets by name
        return {k: v for k, v in values.items() if k in names}
    values = list(values)
    if "seed" in names or "noise_seed" in names:
        key = "seed" if "seed" in names else "noise_seed"
        at = names.index(key)
        if len(values) == len(names) + 1 and isinstance(values[at + 1], str):  # control_after_generate
            del values[at + 1]
    if len(values) < len(NODES[cls].required_widgets(linked)) or len(values) > len(names):
        raise WorkflowError(
            f"node {nid} ({cls}): {len(values)} widget values for the widgets {', '.join(names)}; "
            "save the workflow in the API format (Save (API)) to avoid the ambiguity"
        )
    return dict(zip(names, values, strict=False))


def check_graph(graph: Graph) -> None:
    """Supported classes, links, input types and presence, and no cycle (one-line errors)."""
    for node in graph.values():
        if node.class_type not in NODES:
            raise WorkflowError(
                f"{node.label}: unsupported node class; diffguide runs {', '.join(sorted(NODES))}"
            )
    for node in graph.values():
        spec = node.spec
        for name in node.inputs:
            if name not in spec.inputs:
                raise WorkflowError(
                    f"{node.label}: unknown input '{name}' (inputs: {', '.join(spec.inputs)})"
                )
        for name, kind in spec.inputs.items():
            value = node.inputs.get(name)
            if value is None:
                if name in spec.optional:
                    continue
                raise WorkflowError(f"{node.label}: required input '{name}' ({kind}) is missing")
            if isinstance(value, Link):
                _check_link(graph, node, name, kind, value)
            else:
                _check_literal(node, name, kind, value)
    _check_acyclic(graph)


def _check_link(graph: Graph, node: Node, name: str, kind: str, link: Link) -> None:
    src = graph.get(link.node)
    if src is None:
        raise WorkflowError(f"{node.label}: input '{name}' links to node {link.node}, which does not exist")
    outs = src.spec.outputs
    if not 0 <= link.slot < len(outs):
        raise WorkflowError(
            f"{node.label}: input '{name}' links to output {link.slot} of {src.label}, which has {len(outs)} output(s)"
        )
    if kind not in _LINK_TYPES:
        raise WorkflowError(f"{node.label}: input '{name}' must be a {kind} value, not a link to {src.label}")
    if outs[link.slot] != kind:
        raise WorkflowError(
            f"{node.label}: input '{name}' expects {kind}, but output {link.slot} of {src.label} is {outs[link.slot]}"
        )


_LINK_TYPES = ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE")


def _check_literal(node: Node, name: str, kind: str, value: Any) -> None:
    ok = {
        "INT": isinstance(value, int) and not isinstance(value, bool),
        "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
        "STRING": isinstance(value, str),
        "BOOLEAN": isinstance(value, bool),
    }.get(kind, False)
    if not ok:
        names = {"INT": "an integer", "FLOAT": "a number", "STRING": "a string", "BOOLEAN": "true or false"}
        expect = f"a link to a {kind} output" if kind in _LINK_TYPES else names[kind]
        raise WorkflowError(f"{node.label}: input '{name}' must be {expect}, got {value!r}")


def _check_acyclic(graph: Graph) -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(nid: str, path: list[str]) -> None:
        state[nid] = 1
        for value in graph[nid].inputs.values():
            if isinstance(value, Link):
                if state.get(value.node) == 1:
                    cycle = [*path[path.index(value.node) :], value.node]
                    raise WorkflowError(
                        f"{graph[value.node].label}: the workflow has a cycle: {' -> '.join(cycle)}"
                    )
                if state.get(value.node) is None:
                    visit(value.node, [*path, value.node])
        state[nid] = 2

    for nid in graph:
        if nid not in state:
            visit(nid, [nid])
