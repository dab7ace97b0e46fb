"""``GET /v1/models/{name}/layers``: the layer dry run of ``diffguide layers``, as JSON."""

from __future__ import annotations

from typing import Any

from ..errors import DiffguideError, LayerSpecError
from ..pipeline import GuidedPipeline

METHODS = ("pag", "tpg", "slg")


def _perturbation(method: str, spec: str | None) -> Any:
    from ..perturb import BlockSkip, IdentityAttention, TokenShuffle

    if method == "slg":
        return BlockSkip(spec)
    return IdentityAttention(spec) if method == "pag" else TokenShuffle(spec)


def layer_report(pipe: GuidedPipeline, specs: dict[str, str | None]) -> dict[str, Any]:
    """Units, each method's preset and its modules, and the modules each given spec selects
    (a bad spec raises LayerSpecError: 422)."""
    from ..models.layers import unit_table
    from ..models.presets import default_layers

    net = pipe.model
    presets: dict[str, Any] = {}
    for method in METHODS:
        try:
            preset = default_layers(net, method)  # type: ignore[arg-type]
            presets[method] = {"spec": preset, "modules": _perturbation(method, None).targets(net)}
        except DiffguideError as err:
            presets[method] = {"spec": None, "error": str(err)}
    selected = {}
    for method, spec in specs.items():
        if spec is not None:
            if not spec.replace(",", "").strip():
                raise LayerSpecError(f"{method}: empty layer spec; name at least one layer (e.g. 'mid')")
            selected[method] = {"spec": spec, "modules": _perturbation(method, spec).targets(net)}
    return {
        "family": pipe.family.name,
        "units": [{"alias": u.alias, "name": u.name, "blocks": u.blocks} for u in unit_table(net)],
        "presets": presets,
        "selected": selected,
    }
