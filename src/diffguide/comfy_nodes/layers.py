"""diffguide layer specs on ComfyUI's models (no ComfyUI import: names and sizes only).

diffguide's layer specs (``mid``, ``d2.2-9,d3``, ``b7-9``, ``s3``) address diffusers' module
names. ComfyUI names the same modules differently (``middle_block.1.transformer_blocks.0.attn1``
for diffusers' ``mid_block.attentions.0.transformer_blocks.0.attn1``; MMDiT's ``joint_blocks``,
Flux's ``double_blocks`` / ``single_blocks``). This module builds an empty *skeleton*
``nn.Module`` tree carrying the diffusers names of a ComfyUI model, resolves a spec on it with
diffguide's own :func:`diffguide.models.layers.select` (the same errors and presets as the CLI),
and maps the chosen names back to ComfyUI's.

UNets: the name map is ComfyUI's own ``comfy.utils.unet_to_diffusers(unet_config)`` (passed in
by the caller, who imports ComfyUI). DiTs: block ``b<i>`` is ComfyUI's ``("double_block", i)``
replacement key (MMDiT's joint block i, Flux's double block i, Qwen-Image's block i), ``s<i>`` its
``("single_block", i)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from ..errors import LayerSpecError
from ..models.layers import select
from ..models.presets import Method, default_layers

#: ComfyUI diffusion-model class -> (diffusers class name for presets, joint stack, single stack)
DIT_STACKS: dict[str, tuple[str, str, str | None]] = {
    "MMDiT": ("SD3Transformer2DModel", "joint_blocks", None),
    "Flux": ("FluxTransformer2DModel", "double_blocks", "single_blocks"),
    "QwenImageTransformer2DModel": ("QwenImageTransformer2DModel", "transformer_blocks", None),
}


@dataclass(frozen=True)
class Resolved:
    """A layer spec resolved on a ComfyUI model: ComfyUI module names (UNet) or block keys (DiT)."""

    spec: str
    diffusers: tuple[str, ...]
    comfy: tuple[str, ...]

    def listing(self) -> str:
        """The dry-run text: the spec, then one ``diffusers name -> ComfyUI name`` line per module."""
        lines = [f"{self.spec}: {len(self.comfy)} module(s)"]
        lines += [f"{d} -> {c}" for d, c in zip(self.diffusers, self.comfy, strict=True)]
        return "\n".join(lines)


def _skeleton(names: list[str], cls_name: str = "UNet2DConditionModel") -> nn.Module:
    """An empty module tree holding ``names`` (dotted), numeric children in ModuleLists."""
    root = type(cls_name, (nn.Module,), {})()
    lists = {n.rsplit(".", 1)[0] for n in names if "." in n and n.rsplit(".", 1)[1].isdigit()}
    for name in names:
        node = root
        parts = name.split(".")
        for i, part in enumerate(parts):
            child = node._modules.get(part)
            if child is None:
                child = nn.ModuleList() if ".".join(parts[: i + 1]) in lists else nn.Module()
                node.add_module(part, child)
            node = child
    return root


def module_map(key_map: Mapping[str, str]) -> dict[str, str]:
    """diffusers module name -> ComfyUI module name, from a diffusers -> ComfyUI state-dict key map."""
    out: dict[str, str] = {}
    for dkey, ckey in key_map.items():
        d, c = dkey.split(".")[:-1], ckey.split(".")[:-1]  # drop the parameter name
        while d and c:
            out.setdefault(".".join(d), ".".join(c))
            if d[-1] != c[-1]:
                break
            d, c = d[:-1], c[:-1]
    return out


def resolve_unet(
    layers: str | None, method: Method, key_map: Mapping[str, str], is_target: Callable[[str], bool]
) -> Resolved:
    """``layers`` (or the method's preset) on a ComfyUI UNet; ``is_target`` takes a diffusers name."""
    names = module_map(key_map)
    model = _skeleton(sorted(names))
    spec = default_layers(model, method) if layers is None else layers
    chosen = select(model, spec, lambda name, _module: name in names and is_target(name))
    return Resolved(spec, tuple(chosen), tuple(names[n] for n in chosen))


def resolve_dit(layers: str | None, method: Method, comfy_class: str, joint: int, single: int) -> Resolved:
    """``layers`` (or the method's preset) on a ComfyUI DiT with ``joint`` / ``single`` blocks:
    ComfyUI names ``double_block.<i>`` / ``single_block.<i>`` (its ``"dit"`` replacement keys)."""
    if comfy_class not in DIT_STACKS:
        raise LayerSpecError(f"diffguide nodes do not know ComfyUI's {comfy_class} transformer")
    cls_name = DIT_STACKS[comfy_class][0]
    names = [f"transformer_blocks.{i}" for i in range(joint)]
    names += [f"single_transformer_blocks.{i}" for i in range(single)]
    model = _skeleton(names, cls_name)
    spec = default_layers(model, method) if layers is None else layers
    chosen = select(model, spec, lambda name, _m: name.count(".") == 1)
    comfy = tuple(
        f"double_block.{n.split('.')[1]}"
        if n.startswith("transformer_blocks")
        else f"single_block.{n.split('.')[1]}"
        for n in chosen
    )
    return Resolved(spec, tuple(chosen), comfy)
