"""Shared fixtures: tiny random-weight SD1.5 / SDXL pipelines (never downloaded) and probes.

The tiny models run a 16x16-latent step in a few milliseconds on one thread. On a shared
2-core machine, torch's default of one thread per core makes them many times slower (the
threads wait on each other), so the suite runs single-threaded; set DIFFGUIDE_TEST_THREADS
to change that. No test depends on the thread count: every comparison runs both sides in
the same process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from diffguide import GuidedPipeline, testing

torch.set_num_threads(int(os.environ.get("DIFFGUIDE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def sd15_pipe():
    pipe = testing.tiny_sd15(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sdxl_pipe():
    pipe = testing.tiny_sdxl(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd15(sd15_pipe) -> GuidedPipeline:
    return GuidedPipeline(sd15_pipe)


@pytest.fixture(scope="session")
def sd15_f64() -> GuidedPipeline:
    """The tiny SD1.5 in float64: row layout, chunking and batching are exact up to ~1e-15
    there, while float32 rounding that depends on the batch size (amplified by the guidance
    scales) reaches ~3e-5 on the final latents."""
    pipe = testing.tiny_sd15(seed=0).to(dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return GuidedPipeline(pipe)


@pytest.fixture(scope="session")
def sdxl(sdxl_pipe) -> GuidedPipeline:
    return GuidedPipeline(sdxl_pipe)


@dataclass
class CallLog:
    """Rows (batch size) of every UNet forward call, in order."""

    rows: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.rows)


@contextmanager
def count_unet_calls(unet: nn.Module) -> Iterator[CallLog]:
    """Record the batch size of each ``unet`` forward call while the context is open."""
    log = CallLog()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["sample"]
        log.rows.append(int(x.shape[0]))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


@pytest.fixture
def unet_calls():
    """``with unet_calls(unet) as log: ...`` then ``log.rows``."""
    return count_unet_calls


def model_state(unet: nn.Module) -> dict[str, object]:
    """What a run must leave as it found it: processors (type and identity) and module hooks."""
    hooks = {
        name: (
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            len(getattr(m, "_forward_pre_hooks_with_kwargs", {})),
        )
        for name, m in unet.named_modules()
    }
    procs = unet.attn_processors
    return {
        "processor_types": {k: type(v).__name__ for k, v in procs.items()},
        "processor_ids": {k: id(v) for k, v in procs.items()},
        "hooks": {k: v for k, v in hooks.items() if any(v)},
    }


@pytest.fixture
def snapshot():
    return model_state
