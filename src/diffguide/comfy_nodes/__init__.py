"""diffguide's ComfyUI custom nodes (see docs/comfyui-nodes.md).

``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` hold one node per registered guidance
method plus the "Guidance stack" node, generated from the registry when this package is
imported. Importing it imports no ComfyUI code; ComfyUI is imported when a node runs.
"""

from .nodes import GuidanceStack, mappings

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "GuidanceStack", "mappings"]
