"""Leave training alone: everything a validation call could change is captured and restored.

:func:`training_untouched` records the global torch / numpy / Python RNG states (and CUDA's when
CUDA is initialised), the intra-op thread count, grad mode, the autocast state, and for every
module involved the ``training`` flag of each submodule and ``requires_grad`` of each parameter.
Inside, sampling runs under ``torch.no_grad()`` with autocast off and every module in eval mode
(dropout off, as at inference); on exit, also when sampling raises, all of it is put back and
what sampling allocated is released (``gc`` and the accelerator's cache).
"""

from __future__ import annotations

import contextlib
import gc
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass
class TrainingState:
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: Any
    python_rng: Any
    threads: int
    grad: bool
    autocast: dict[str, tuple[bool, torch.dtype]]
    modes: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES}


def capture(modules: Iterable[nn.Module]) -> TrainingState:
    subs = list({id(m): m for root in modules for m in root.modules()}.values())
    params = list({id(p): p for m in subs for p in m.parameters(recurse=False)}.values())
    return TrainingState(
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if _cuda_ready() else None,
        numpy_rng=np.random.get_state(),
        python_rng=random.getstate(),
        threads=torch.get_num_threads(),
        grad=torch.is_grad_enabled(),
        autocast=autocast_state(),
        modes=[(m, m.training) for m in subs],
        requires_grad=[(p, p.requires_grad) for p in params],
    )


def restore(state: TrainingState) -> None:
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None:
        torch.cuda.set_rng_state_all(state.cuda_rng)
    np.random.set_state(state.numpy_rng)
    random.setstate(state.python_rng)
    if torch.get_num_threads() != state.threads:
        torch.set_num_threads(state.threads)
    torch.set_grad_enabled(state.grad)
    for module, training in state.modes:
        module.training = training  # the flag alone: .train() would recurse into other modules
    for param, flag in state.requires_grad:
        if param.requires_grad != flag:
            param.requires_grad_(flag)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def training_untouched(modules: Iterable[nn.Module]) -> Iterator[TrainingState]:
    """Sample inside; on exit the training state is exactly as before (see the module docstring)."""
    modules = list(modules)
    state = capture(modules)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            for module in modules:
                module.eval()
            yield state
    finally:
        restore(state)
        free_memory()
