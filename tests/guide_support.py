"""Shared helpers for the model-side guidance tests (SEG, SLG / layer skip on UNets, the TPG
variants): an independent reference sampling loop, reference attention processors swapped in for
it, and the checks every method must pass (one forward per step with CFG + PAG, windows, the
model left as it was)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from test_tpg_reference import encode

from diffguide import CFG, PAG, Window

STEPS = 3
SEED = 11
PROMPTS = ["a lighthouse at dusk", "a bowl of fruit"]
NEGATIVES = ["blurry", "dark"]


def reference(
    pipe,
    w: float,
    s: float,
    perturbed: Callable[[], AbstractContextManager[None]],
    seed: int = SEED,
    prompts: list[str] = PROMPTS,
    uncond_perturbed: Callable[[], AbstractContextManager[None]] = nullcontext,
    steps: Callable[[int], bool] = lambda i: True,
) -> torch.Tensor:
    """A plain Euler loop with separate UNet calls u, c and p (p under ``perturbed()``, u under
    ``uncond_perturbed()``), per image noise ``randn(seed + i)``, and
    ``g = c + (w - 1)(c - u) + s (c - p)`` (the s term on the step indices where ``steps(i)``). Final latents."""
    unet, b = pipe.unet, len(prompts)
    size = unet.config.sample_size * pipe.vae_scale_factor
    cond, uncond = encode(pipe, prompts, NEGATIVES[:b], size)
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.cat(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)]
    )
    latents = latents * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(latents, t)
            c = unet(x, t, **cond).sample
            with uncond_perturbed():
                u = unet(x, t, **uncond).sample if w != 1.0 else c
            p = c
            if s != 0.0 and steps(i):
                with perturbed():
                    p = unet(x, t, **cond).sample
            g = c + (w - 1.0) * (c - u) + s * (c - p)
            latents = sched.step(g, t, latents).prev_sample
    return latents


@contextmanager
def swapped_processors(
    unet, pre_hook: Callable[..., None], *, where: Callable[[str], bool], processor: Callable[[str], Any]
) -> Iterator[None]:
    """Inside: ``pre_hook`` on the UNet's forward (with kwargs) and ``processor(name)`` as the
    attention processor of every module whose name ``where`` takes; both removed afterwards."""
    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    mods = {n: m for n, m in unet.named_modules() if where(n)}
    saved = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.processor = processor(n)
    try:
        yield
    finally:
        handle.remove()
        for n, m in mods.items():
            m.processor = saved[n]


def run(gp, terms, prompts=PROMPTS, negatives=NEGATIVES, **kwargs):
    kwargs.setdefault("steps", STEPS)
    kwargs.setdefault("seed", SEED)
    return gp.generate(prompts, negatives[: len(prompts)], guidance=terms, decode=False, **kwargs)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_one_forward_with_cfg_pag(gp, term, unet_calls) -> None:
    """CFG + PAG + ``term`` (one perturbed branch): 4 B rows in ONE forward per step, and the term acts."""
    b = len(PROMPTS)
    with unet_calls(gp.unet) as log:
        out = run(gp, [CFG(4.0), PAG(2.0), term])
    assert log.rows == [4 * b] * STEPS
    assert out.forward_calls == STEPS
    assert maxdiff(out.latents, run(gp, [CFG(4.0), PAG(2.0)]).latents) > 1e-5


def check_window(gp, term_in_window, unet_calls, extra_rows: int = 1) -> None:
    """``term_in_window`` has ``Window(start=0.5)``: its rows only from step 2 of 3 on."""
    b = len(PROMPTS)
    with unet_calls(gp.unet) as log:
        run(gp, [CFG(4.0), term_in_window])
    assert term_in_window.window == Window(start=0.5)
    assert log.rows == [2 * b, 2 * b, (2 + extra_rows) * b]


def check_chunks_and_per_image(gp, terms, out, tol: float, chunks: tuple[int, ...] = (1, 3)) -> None:
    """``out`` (the run of ``terms``) again in chunks of ``chunks`` rows, without prefix sharing,
    and image by image (seed + i): the same latents within ``tol``."""
    for max_rows in chunks:
        assert maxdiff(out.latents, run(gp, terms, max_rows=max_rows).latents) <= tol
    assert maxdiff(out.latents, run(gp, terms, prefix_sharing=False).latents) <= tol
    for i, prompt in enumerate(PROMPTS):
        one = run(gp, terms, prompts=[prompt], negatives=[NEGATIVES[i]], seed=SEED + i).latents
        assert maxdiff(one[0], out.latents[i]) <= tol


def probe(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, model.config.cross_attention_dim, generator=g)
    kwargs = {}
    if model.config.addition_embed_type == "text_time":
        proj = model.add_embedding.linear_1.in_features - 6 * model.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, proj, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        }
    with torch.no_grad():
        return model(x, torch.tensor(500.0), encoder_hidden_states=ehs, **kwargs).sample


def check_restored(gp, terms) -> None:
    """After a run, and after a run that raised mid-way, the UNet computes what it did before and
    carries no instance forward, hook or processor left behind."""
    unet = gp.unet
    before = probe(unet)
    procs = {k: id(v) for k, v in unet.attn_processors.items()}
    forwards = {n: m.__dict__["forward"] for n, m in unet.named_modules() if "forward" in m.__dict__}

    def clean() -> None:
        assert torch.equal(probe(unet), before)
        assert {k: id(v) for k, v in unet.attn_processors.items()} == procs
        # (diffusers' own hook registry, used by reference tests, may leave instance forwards)
        assert {
            n: m.__dict__["forward"] for n, m in unet.named_modules() if "forward" in m.__dict__
        } == forwards
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())

    run(gp, terms)
    clean()

    def boom(state):
        if state.step.index == 1:
            raise RuntimeError("stop at step 1")

    with pytest.raises(RuntimeError, match="stop at step 1"):
        run(gp, terms, callback=boom)
    clean()
