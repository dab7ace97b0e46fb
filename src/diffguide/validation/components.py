"""The model being trained, used in place: unwrap it and assemble a pipeline around it.

:func:`unwrap` strips the wrappers trainers put around the denoiser without copying anything:
DistributedDataParallel / DataParallel (``.module``), ``torch.compile`` (``._orig_mod``) and a
peft ``PeftModel`` (``get_base_model()``: the model with its LoRA layers injected, so the
adapters take part). accelerate's mixed-precision ``forward`` wrapper (an instance attribute
next to ``_original_forward``) is bypassed for the call only (:func:`plain_forward`), so
sampling runs in the model's dtype as ``diffguide generate`` does.

:func:`assemble` builds the diffusers pipeline of the denoiser's family around the same module
objects (diffusers' constructors only register them), with a fresh scheduler from the given
one's config (the trainer's scheduler object is never touched).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError

#: Denoiser class name -> (diffusers pipeline class name, pipeline attribute).
PIPELINES = {
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", "transformer"),
    "FluxTransformer2DModel": ("FluxPipeline", "transformer"),
    "QwenImageTransformer2DModel": ("QwenImagePipeline", "transformer"),
    "AuraFlowTransformer2DModel": ("AuraFlowPipeline", "transformer"),
}
#: Pipeline arguments that may be left out (None).
OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder", "text_encoder_3", "tokenizer_3")


def unwrap(model: Any) -> Any:
    """The module under DDP / DataParallel, torch.compile and peft wrappers (never a copy)."""
    for _ in range(16):
        name = type(model).__name__
        if name in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif name.startswith("Peft") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model
    raise ConfigError(f"cannot unwrap {type(model).__name__}: more than 16 nested wrappers")


@contextlib.contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """Bypass accelerate's autocast ``forward`` wrapper for the duration (restored after)."""
    wrapped = model.__dict__.get("forward")
    if wrapped is None or "_original_forward" not in model.__dict__:
        yield
        return
    del model.__dict__["forward"]
    try:
        yield
    finally:
        model.__dict__["forward"] = wrapped


def _pipeline_class(denoiser: nn.Module, components: Mapping[str, Any]) -> tuple[Any, str]:
    import diffusers

    kind = type(denoiser).__name__
    if kind == "UNet2DConditionModel":
        xl = components.get("text_encoder_2") is not None
        return getattr(diffusers, "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"), "unet"
    if kind not in PIPELINES:
        known = ", ".join(["UNet2DConditionModel", *PIPELINES])
        raise ConfigError(f"cannot sample a {kind}: validation supports {known}")
    cls_name, attr = PIPELINES[kind]
    return getattr(diffusers, cls_name), attr


def assemble(denoiser: nn.Module, components: Mapping[str, Any]) -> Any:
    """The family's diffusers pipeline holding ``denoiser`` and ``components`` (the same objects)."""
    cls, attr = _pipeline_class(denoiser, components)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    for name, param in params.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name == attr:
            kwargs[name] = denoiser
        elif name == "requires_safety_checker":
            kwargs[name] = False
        elif components.get(name) is not None:
            kwargs[name] = components[name]
        elif name in OPTIONAL or param.default is not inspect.Parameter.empty:
            kwargs[name] = None if param.default is inspect.Parameter.empty else param.default
        else:
            raise ConfigError(f"{cls.__name__} needs the component '{name}': pass it in components=")
    unknown = sorted(set(components) - set(kwargs))
    if unknown:
        raise ConfigError(
            f"unknown component(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(kwargs)}"
        )
    sched = kwargs["scheduler"]
    kwargs["scheduler"] = type(sched).from_config(sched.config)  # the trainer's scheduler stays untouched
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
