"""Memory options for validation sampling, applied for the call and undone after (via diffusers /
accelerate), and the out-of-memory escalation.

* ``attention_slicing``: the UNet's ``set_attention_slice`` (sliced attention processors; UNets
  only). Undone by putting the previous processors back.
* ``vae_slicing`` / ``vae_tiling``: the VAE's ``use_slicing`` / ``use_tiling`` flags, restored.
* ``model_cpu_offload`` / ``sequential_cpu_offload``: diffusers' ``enable_model_cpu_offload`` /
  ``enable_sequential_cpu_offload`` (accelerate hooks), removed after with ``remove_all_hooks``
  and every component moved back to the device it was on.

On a CPU-only machine every option runs: model offload with the CPU as "accelerator" is a no-op
move that exercises the hooks; sequential offload puts every weight on the meta device and loads
it from a CPU weights map for each forward (accelerate's ``cpu_offload`` with the CPU as execution
device, see :func:`_sequential_on_cpu`: diffusers' own method fails there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class MemoryOptions:
    attention_slicing: int | str | None = None  # a slice size, "auto" or "max"; None: off
    vae_slicing: bool = False
    vae_tiling: bool = False
    model_cpu_offload: bool = False
    sequential_cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.model_cpu_offload and self.sequential_cpu_offload:
            raise ConfigError("choose model_cpu_offload or sequential_cpu_offload, not both")
        s = self.attention_slicing
        if s is not None and s not in ("auto", "max") and not (isinstance(s, int) and s >= 1):
            raise ConfigError(f"attention_slicing must be a slice size >= 1, 'auto' or 'max', got {s!r}")

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def offloaded(self) -> MemoryOptions:
        return replace(self, model_cpu_offload=True, sequential_cpu_offload=False)

    @property
    def offload(self) -> bool:
        return self.model_cpu_offload or self.sequential_cpu_offload


def _devices(pipe: Any) -> dict[str, torch.device]:
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module):
            p = next(module.parameters(), None)
            if p is not None:
                out[name] = p.device
    return out


@contextlib.contextmanager
def _attention_slicing(model: nn.Module, size: int | str) -> Iterator[None]:
    if not hasattr(model, "set_attention_slice"):
        raise ConfigError(
            f"attention slicing is for UNets; {type(model).__name__} has no set_attention_slice"
        )
    saved = dict(model.attn_processors)  # type: ignore[arg-type]
    model.set_attention_slice(size)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_processor(saved)  # type: ignore[operator]


@contextlib.contextmanager
def _flag(module: Any, attr: str, value: bool) -> Iterator[None]:
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


def _tensors(pipe: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every submodule's own parameter and buffer tables, copied: the original objects."""
    mods = {id(m): m for c in pipe.components.values() if isinstance(c, nn.Module) for m in c.modules()}
    return [(m._parameters, dict(m._parameters)) for m in mods.values()] + [
        (m._buffers, dict(m._buffers)) for m in mods.values()
    ]


def _drop_hooks(pipe: Any) -> None:
    """accelerate's hooks off every submodule (diffusers' ``remove_all_hooks`` stops at the first
    hook whose detach fails, e.g. after a failed sequential offload on the CPU): a hook that cannot
    detach is dropped and the module's own forward restored."""
    from accelerate.hooks import remove_hook_from_module

    for component in pipe.components.values():
        if not isinstance(component, nn.Module):
            continue
        for m in component.modules():
            if "_hf_hook" not in m.__dict__:
                continue
            try:
                remove_hook_from_module(m)
            except Exception:
                m.__dict__.pop("_hf_hook", None)
                m.__dict__.pop("forward", None)
                m.__dict__.pop("_old_forward", None)
    pipe._all_hooks = []


def _sequential_on_cpu(pipe: Any) -> None:
    """diffusers' ``enable_sequential_cpu_offload`` with the CPU as the execution device.

    diffusers itself cannot: it turns ``device="cpu"`` into ``"cpu:0"`` (it always appends an
    index), and accelerate's hooks then treat ``cpu:0`` as another device than the CPU weights map
    and fail moving a weight back to the meta device (``TypeError: new() received an invalid
    combination of arguments`` in ``set_module_tensor_to_device``). accelerate's own ``cpu_offload``
    with ``execution_device=torch.device("cpu")`` works; this is diffusers' loop calling it so
    (every component hooked, its weights on the meta device and loaded for each forward)."""
    from accelerate import cpu_offload

    excluded = getattr(pipe, "_exclude_from_cpu_offload", [])
    for name, model in pipe.components.items():
        if not isinstance(model, nn.Module) or name in excluded:
            continue
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


@contextlib.contextmanager
def _offload(pipe: Any, sequential: bool, device: torch.device) -> Iterator[None]:
    """accelerate's offload hooks for the duration. Sequential offload replaces parameters by meta
    tensors; on exit every module gets its original parameter and buffer objects back (the ones
    the trainer's optimizer holds), on the device they were on."""
    devices = _devices(pipe)
    tables = _tensors(pipe)
    try:
        if sequential and device.type == "cpu":
            _sequential_on_cpu(pipe)
        elif sequential:
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.enable_model_cpu_offload(device=device)
        yield
    finally:
        try:
            _drop_hooks(pipe)
        finally:  # the original tensors go back whatever happens
            for table, original in tables:
                table.update(original)
            for name, dev in devices.items():
                pipe.components[name].to(dev)


class ExecutionView:
    """The pipeline as an offloaded run sees it: ``device`` is where the models execute
    (diffusers' ``_execution_device``), not the CPU they are parked on; all else is the pipeline's."""

    def __init__(self, pipe: Any) -> None:
        self.__dict__["_pipe"] = pipe

    @property
    def device(self) -> torch.device:
        return self._pipe._execution_device  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_pipe"], name)


@contextlib.contextmanager
def applied(pipe: Any, model: nn.Module, opts: MemoryOptions, device: torch.device) -> Iterator[None]:
    """``opts`` on ``pipe`` (denoiser ``model``) for the duration; everything undone on exit."""
    with contextlib.ExitStack() as stack:
        if opts.attention_slicing is not None:
            stack.enter_context(_attention_slicing(model, opts.attention_slicing))
        vae = getattr(pipe, "vae", None)
        if (opts.vae_slicing or opts.vae_tiling) and (vae is None or not hasattr(vae, "use_slicing")):
            raise ConfigError("VAE slicing / tiling needs a VAE with use_slicing / use_tiling")
        if opts.vae_slicing:
            stack.enter_context(_flag(vae, "use_slicing", True))
        if opts.vae_tiling:
            stack.enter_context(_flag(vae, "use_tiling", True))
        if opts.offload:
            stack.enter_context(_offload(pipe, opts.sequential_cpu_offload, device))
        yield
