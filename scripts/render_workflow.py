"""Draw a ComfyUI workflow (API format) as a node graph PNG, for the docs.

    python scripts/render_workflow.py docs/examples/comfyui-pag-tpg-workflow.json \
        docs/images/comfyui-pag-tpg-workflow.png

Nodes are placed in columns by their depth in the graph (longest path from a node without
inputs), drawn as boxes titled with their class (diffguide nodes by their display name, in the
pack's colour) listing their widget values; links are drawn from output to input, labelled with
the input's name. Needs matplotlib (the ``bench`` extra). Imports no ComfyUI code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WIDTH, LINE, GAP_X, GAP_Y = 3.3, 0.26, 1.3, 0.45
SKIP = {"window_sigma_min", "window_sigma_max", "window_start", "window_end", "denoise", "adaptive_scale"}


def depths(wf: dict[str, Any]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def depth(nid: str) -> int:
        if nid not in memo:
            links = [v[0] for v in wf[nid]["inputs"].values() if isinstance(v, list)]
            memo[nid] = 1 + max((depth(s) for s in links), default=-1)
        return memo[nid]

    for nid in wf:
        depth(nid)
    return memo


def title(cls: str) -> str:
    if cls.startswith("Diffguide"):
        from diffguide.comfy_nodes import NODE_DISPLAY_NAME_MAPPINGS

        return NODE_DISPLAY_NAME_MAPPINGS.get(cls, cls)
    return cls


def lines(node: dict[str, Any]) -> list[str]:
    out = []
    for k, v in node["inputs"].items():
        if isinstance(v, list) or k in SKIP:
            continue
        text = repr(v) if isinstance(v, str) else str(v)
        out.append(f"{k}: {text if len(text) < 26 else text[:23] + '...'}")
    return out


def render(wf: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    depth = depths(wf)
    columns: dict[int, list[str]] = {}
    for nid in sorted(wf, key=int):
        columns.setdefault(depth[nid], []).append(nid)
    box: dict[str, tuple[float, float, float]] = {}  # id -> (x, top y, height)
    tallest = 0.0
    for col, ids in columns.items():
        y = 0.0
        for nid in ids:
            h = LINE * (2 + len(lines(wf[nid])))
            box[nid] = (col * (WIDTH + GAP_X), -y, h)
            y += h + GAP_Y
        tallest = max(tallest, y)
    fig, ax = plt.subplots(figsize=(len(columns) * (WIDTH + GAP_X) * 0.9, tallest * 0.9 + 0.6))
    for nid, node in wf.items():
        x, top, h = box[nid]
        ours = node["class_type"].startswith("Diffguide")
        face, edge = ("#e8f1ff", "#2f6fdb") if ours else ("#f2f2f2", "#777777")
        ax.add_patch(FancyBboxPatch((x, top - h), WIDTH, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=face, edgecolor=edge, linewidth=1.4))  # fmt: skip
        ax.text(
            x + 0.1, top - 0.2, f"#{nid} {title(node['class_type'])}", weight="bold", va="top", fontsize=9
        )
        for i, text in enumerate(lines(node)):
            ax.text(x + 0.15, top - 0.2 - LINE * (i + 1.2), text, va="top", fontsize=7.5, family="monospace")
        links = [(name, link) for name, link in node["inputs"].items() if isinstance(link, list)]
        for i, (name, link) in enumerate(links):
            sx, stop, _ = box[link[0]]
            y0 = stop - 0.3 - 0.18 * link[1]  # the source's output slot
            y1 = top - 0.3 - i * (h - 0.45) / max(len(links) - 1, 1)  # one input slot each
            ax.annotate("", xy=(x, y1), xytext=(sx + WIDTH, y0),
                        arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 1.0,
                                    "connectionstyle": "arc3,rad=0.05"})  # fmt: skip
            ax.text(x - 0.05, y1 + 0.04, name, ha="right", fontsize=6.5, color="#555555")
    ax.set_xlim(-0.6, len(columns) * (WIDTH + GAP_X))
    ax.set_ylim(-tallest - 0.2, 0.3)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: render_workflow.py WORKFLOW.json OUT.png", file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    render(json.loads(src.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
