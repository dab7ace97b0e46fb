"""diffguide as a ComfyUI custom-node pack (Apache-2.0, as diffguide; calls ComfyUI's API only).

Both of ComfyUI's entry points: ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` (the
legacy API, which ComfyUI loads when a module has both) and ``comfy_entrypoint()`` (the newer
``ComfyExtension`` API, the same nodes as ``io.ComfyNode`` classes).

Install: link this folder into ComfyUI's custom_nodes (``ln -s /path/to/diffguide/comfyui
ComfyUI/custom_nodes/diffguide``) with diffguide installed in ComfyUI's Python (``pip install -e
/path/to/diffguide``); without that, the checkout's ``src`` is put on ``sys.path``.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("diffguide") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))

from diffguide.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from diffguide.comfy_nodes.v3 import comfy_entrypoint

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
