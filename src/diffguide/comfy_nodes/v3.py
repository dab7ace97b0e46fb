"""The pack through ComfyUI's newer extension API: ``comfy_entrypoint()`` -> a ``ComfyExtension``
whose nodes are ``comfy_api.latest.io.ComfyNode`` classes.

The V3 nodes are built from the same legacy classes (``NODE_CLASS_MAPPINGS``): each widget of a
legacy ``INPUT_TYPES`` becomes the matching ``io`` input (FLOAT -> ``io.Float``, a list ->
``io.Combo``, ...), and ``execute`` calls the legacy ``apply``, so both APIs run the same code with
the same node ids and display names. ComfyUI loads ``NODE_CLASS_MAPPINGS`` when a module has both;
a module exposing only ``comfy_entrypoint`` gets these. ``comfy_api`` is imported inside
:func:`comfy_entrypoint` only (ComfyUI calls it), never when diffguide is imported.
"""

from __future__ import annotations

from typing import Any


def _input(io: Any, name: str, spec: tuple[Any, ...]) -> Any:
    kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if isinstance(kind, list):
        return io.Combo.Input(name, options=kind, **opts)
    widget = {"MODEL": io.Model, "FLOAT": io.Float, "BOOLEAN": io.Boolean, "INT": io.Int, "STRING": io.String}
    if kind not in widget:
        raise TypeError(f"diffguide V3 node input {name}: no io type for {kind!r}")
    return widget[kind].Input(name, **opts)


def v3_node(io: Any, node_id: str, legacy: type, display_name: str) -> type:
    """An ``io.ComfyNode`` class with ``legacy``'s inputs, outputs, description and behaviour."""
    inputs = [_input(io, k, v) for k, v in legacy.INPUT_TYPES()["required"].items()]  # type: ignore[attr-defined]

    def define_schema(cls: type) -> Any:
        return io.Schema(
            node_id=node_id,
            display_name=display_name,
            category=legacy.CATEGORY,  # type: ignore[attr-defined]
            description=getattr(legacy, "DESCRIPTION", ""),
            inputs=inputs,
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="layers")],
        )

    def execute(cls: type, **values: Any) -> Any:
        model, listing = getattr(legacy(), legacy.FUNCTION)(**values)  # type: ignore[attr-defined]
        return io.NodeOutput(model, listing)

    return type(
        f"{legacy.__name__}V3",
        (io.ComfyNode,),
        {"define_schema": classmethod(define_schema), "execute": classmethod(execute)},
    )


def extension() -> Any:
    """The pack as a ``ComfyExtension`` (imports ``comfy_api``: call from ComfyUI only)."""
    from comfy_api.latest import ComfyExtension, io

    from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # the legacy API's very nodes

    nodes = [
        v3_node(io, key, cls, NODE_DISPLAY_NAME_MAPPINGS[key]) for key, cls in NODE_CLASS_MAPPINGS.items()
    ]

    class DiffguideExtension(ComfyExtension):  # type: ignore[misc]
        async def get_node_list(self) -> list[type]:
            return nodes

    return DiffguideExtension()


async def comfy_entrypoint() -> Any:
    """ComfyUI's extension entry point (``load_custom_node`` awaits it)."""
    return extension()
