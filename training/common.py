"""Scaffolding shared by the training recipes (train.py: tiny-sd, train_sd3.py: tiny-sd3).

A stage's loop keeps its own maths (losses, noise, timesteps); this file holds what every loop
repeats: the learning-rate schedule, batch drawing from (seed, step), resumable checkpoints written
atomically, EMA updates and the periodic progress line.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Logger:
    """Timestamped lines to stdout and to ``path`` (appended, line-buffered)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)

    def __call__(self, msg: str):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def batch_indices(weights_cdf: np.ndarray, seed: int, step: int, bs: int) -> np.ndarray:
    """``bs`` sample indices drawn with the weights behind ``weights_cdf``, from (seed, step) only."""
    rng = np.random.RandomState((seed * 1_000_003 + step) % (2**32))
    return np.searchsorted(weights_cdf, rng.random_sample(bs) * weights_cdf[-1], side="right").clip(
        0, len(weights_cdf) - 1
    )


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's noise (and timesteps, dropout): from (seed, step) only."""
    return torch.Generator().manual_seed(seed * 7919 + step)


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[torch.nn.Module, torch.nn.Module]], step: int, decay: float) -> None:
    """``ema <- ema + (1 - d) (model - ema)`` for every trainable parameter, ``d = min(decay,
    (1 + step) / (10 + step))`` (the warm-up of the decay); frozen parameters are left alone."""
    d = min(decay, (1 + step) / (10 + step))
    for model, ema in pairs:
        for ps, pd in zip(model.parameters(), ema.parameters(), strict=True):
            if ps.requires_grad:
                pd.lerp_(ps, 1 - d)


class Checkpoint:
    """A stage's resumable state: ``parts`` (name -> object with ``state_dict``) and the step, in
    one file, rewritten atomically every ``minutes`` and at the last step."""

    def __init__(self, path: Path, parts: Mapping[str, Any], minutes: float, log: Logger, name: str):
        self.path, self.parts, self.seconds, self.log, self.name = path, parts, minutes * 60, log, name
        self.last = time.time()

    def resume(self) -> int:
        """Load the saved parts (when the file exists); the step to continue from."""
        if not self.path.exists():
            return 0
        st = torch.load(self.path, map_location="cpu")
        for key, part in self.parts.items():
            part.load_state_dict(st[key])
        self.log(f"{self.name}: resumed at step {st['step']}")
        return int(st["step"])

    def maybe_save(self, step: int, final: bool) -> None:
        if not final and time.time() - self.last <= self.seconds:
            return
        atomic_save({**{k: p.state_dict() for k, p in self.parts.items()}, "step": step}, self.path)
        self.last = time.time()
        self.log(f"{self.name}: checkpoint at step {step}")


class Progress:
    """The mean of each named value over the last ``every`` steps, logged with the time per step."""

    def __init__(self, log: Logger, name: str, names: tuple[str, ...], formats: tuple[str, ...], every: int):
        self.log, self.name, self.names, self.formats, self.every = log, name, names, formats, every
        self.rows: list[list[float]] = []
        self.t0 = time.time()

    def __call__(self, step: int, final: bool, lr: float, *values: float) -> None:
        self.rows.append(list(values))
        if step % self.every and not final:
            return
        mean = np.mean(self.rows, 0)
        parts = " ".join(f"{n} {v:{f}}" for n, v, f in zip(self.names, mean, self.formats, strict=True))
        per_step = (time.time() - self.t0) / len(self.rows)
        self.log(f"{self.name} step {step} {parts} lr {lr:.2e} {per_step:.3f}s/step")
        self.rows, self.t0 = [], time.time()
