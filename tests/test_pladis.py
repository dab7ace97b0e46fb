"""PLADIS (sparse cross-attention, model-wide): known values of the sparse maps, an independent
reference loop on the tiny models, windows, batches, chunks, composition and a clean model."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from guide_support import (
    PROMPTS,
    STEPS,
    check_chunks_and_per_image,
    check_restored,
    maxdiff,
    reference,
    run,
    swapped_processors,
)

from diffguide import CFG, PAG, ConfigError, Window
from diffguide.guidance import PLADIS, UncondQueryShuffle
from diffguide.perturb.sparse_attention import entmax15, pladis_map, sparsemax

TOL = 1e-4


def entmax_bisect(z: torch.Tensor, alpha: float, iters: int = 200) -> torch.Tensor:
    """alpha-entmax by bisection on tau: p = [(alpha - 1) z - tau]_+^(1/(alpha-1)), sum p = 1."""
    z = z.double() * (alpha - 1.0)
    lo, hi = z.amax(-1, keepdim=True) - 1.0, z.amax(-1, keepdim=True)
    for _ in range(iters):
        tau = (lo + hi) / 2
        mass = ((z - tau).clamp(min=0) ** (1.0 / (alpha - 1.0))).sum(-1, keepdim=True)
        lo, hi = torch.where(mass > 1, tau, lo), torch.where(mass > 1, hi, tau)
    return ((z - (lo + hi) / 2).clamp(min=0) ** (1.0 / (alpha - 1.0))).float()


def test_sparse_maps_known_values():
    x = torch.tensor([[1.0, 0.5, -2.0]])
    # sparsemax: tau = (1 + 0.5 - 1) / 2 = 0.25 -> [0.75, 0.25, 0]
    assert torch.allclose(sparsemax(x), torch.tensor([[0.75, 0.25, 0.0]]))
    # entmax15 of [2, 0, ...]: z/2 = [1, 0]: (1 - tau)^2 + (0 - tau)^2 = 1 -> tau = 0 -> [1, 0]
    assert torch.allclose(entmax15(torch.tensor([[2.0, 0.0, -5.0]])), torch.tensor([[1.0, 0.0, 0.0]]))
    # equal scores: uniform for both
    assert torch.allclose(entmax15(torch.zeros(1, 4)), torch.full((1, 4), 0.25))
    scores = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(0)) * 3
    assert maxdiff(entmax15(scores), entmax_bisect(scores, 1.5)) < 1e-6
    assert maxdiff(sparsemax(scores), entmax_bisect(scores, 2.0)) < 1e-6
    # A_d + lam (A_s - A_d): lam 0 is softmax, lam 1 is the sparse map, rows sum to 1
    assert torch.allclose(pladis_map(scores, 0.0, "entmax15"), scores.softmax(-1))
    assert torch.allclose(pladis_map(scores, 1.0, "sparsemax"), sparsemax(scores))
    lam2 = pladis_map(x, 2.0, "sparsemax")
    assert torch.allclose(lam2, 2 * torch.tensor([[0.75, 0.25, 0.0]]) - x.softmax(-1))
    assert torch.allclose(lam2.sum(-1), torch.ones(1))


class RefPladisProcessor:
    """attn2 computed plainly, head by head, with the bisection entmax; off while state['on'] is False."""

    def __init__(self, lam: float, alpha: float, state: dict) -> None:
        self.lam, self.alpha, self.state = lam, alpha, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        h = attn.heads
        d = q.shape[-1] // h
        heads = []
        for j in range(h):
            qj, kj, vj = (t[..., j * d : (j + 1) * d] for t in (q, k, v))
            scores = qj @ kj.transpose(-1, -2) / d**0.5
            dense = scores.softmax(-1)
            a = dense + self.lam * (entmax_bisect(scores, self.alpha) - dense) if self.state["on"] else dense
            heads.append(a @ vj)
        return attn.to_out[1](attn.to_out[0](torch.cat(heads, dim=-1)))


def ref_pladis(pipe, lam: float, alpha: float, on_steps: set[int] | None = None):
    """PLADIS on every attn2 of the UNet (every call, or the calls at the step indices ``on_steps``)."""
    unet, sched = pipe.unet, EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    state = {"on": True}
    sched.set_timesteps(STEPS)
    times = [float(t) for t in sched.timesteps]

    def pre(m, a, kw):
        if on_steps is not None:
            state["on"] = times.index(float(a[1])) in on_steps

    return lambda: swapped_processors(
        unet,
        pre,
        where=lambda n: n.endswith("attn2"),
        processor=lambda n: RefPladisProcessor(lam, alpha, state),
    )


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize(("w", "sparse", "alpha"), [(4.0, "entmax15", 1.5), (1.0, "sparsemax", 2.0)])
def test_pladis_matches_reference(arch, w, sparse, alpha, request):
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    with ref_pladis(pipe, 2.0, alpha)():
        expected = reference(pipe, w, 0.0, nullcontext)
    got = run(gp, ([CFG(w)] if w != 1.0 else []) + [PLADIS(2.0, sparse)]).latents
    assert maxdiff(expected, got) <= TOL
    plain = run(gp, [CFG(w)] if w != 1.0 else []).latents
    assert maxdiff(got, plain) > 1e-3  # it does act


def test_pladis_window(sd15_pipe, sd15, unet_calls):
    term = PLADIS(2.0, window=Window(start=0.5))
    with unet_calls(sd15.unet) as log:
        got = run(sd15, [CFG(4.0), term]).latents
    b = len(PROMPTS)
    assert log.rows == [2 * b] * STEPS  # no extra rows, ever
    with ref_pladis(sd15_pipe, 2.0, 1.5, on_steps={2})():
        expected = reference(sd15_pipe, 4.0, 0.0, nullcontext)
    assert maxdiff(expected, got) <= TOL
    assert maxdiff(got, run(sd15, [CFG(4.0), PLADIS(2.0)]).latents) > 1e-3


def test_pladis_batch_chunks_and_composition(sd15, unet_calls):
    b = len(PROMPTS)
    terms = [CFG(4.0), PAG(2.0), PLADIS(2.0)]
    with unet_calls(sd15.unet) as log:
        out = run(sd15, terms)
    assert log.rows == [3 * b] * STEPS and out.forward_calls == STEPS  # one forward: u, c, PAG's p
    assert maxdiff(out.latents, run(sd15, [CFG(4.0), PAG(2.0)]).latents) > 1e-3
    # model-wide on every chunk (a chunk of uncond or PAG rows only, too) and per image
    check_chunks_and_per_image(sd15, terms, out, TOL, chunks=(1,))
    # with the in-place unconditional perturbation: still 2 B rows
    with unet_calls(sd15.unet) as log:
        run(sd15, [CFG(4.0), UncondQueryShuffle(), PLADIS(2.0)])
    assert log.rows == [2 * b] * STEPS


def test_pladis_restored_and_errors(sd15):
    check_restored(sd15, [CFG(4.0), PLADIS(2.0)])
    with pytest.raises(ConfigError, match=r"PLADIS scale must be in \[0, 100\], got -1"):
        PLADIS(-1.0)
    with pytest.raises(ConfigError, match="PLADIS sparse must be one of entmax15, sparsemax, got 'softmax'"):
        PLADIS(sparse="softmax")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match="two guidance terms perturb the conditional rows; keep one of them"
    ):
        run(sd15, [PLADIS(2.0), PLADIS(1.0, name="other")])
