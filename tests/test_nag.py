"""NAG (normalized attention guidance in cross-attention, on the conditional rows): known values,
an independent reference loop on the tiny models, windows, batches, chunks, composition, a clean model."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from guide_support import (
    NEGATIVES,
    PROMPTS,
    STEPS,
    check_chunks_and_per_image,
    check_restored,
    maxdiff,
    reference,
    run,
    swapped_processors,
)
from test_tpg_reference import encode

from diffguide import CFG, PAG, ConfigError, Window
from diffguide.guidance import NAG
from diffguide.perturb.nag_attention import nag_mix

TOL = 1e-4


def test_nag_mix_known_values():
    pos, neg = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0]])
    # phi 2: z~ = 2 pos - neg = [2, -3], |z~| 5 vs |pos| 2: r = 2.5 <= tau 3 -> kept; alpha 1 -> z~
    assert torch.allclose(nag_mix(pos, neg, 2.0, 3.0, 1.0), torch.tensor([[2.0, -3.0]]), atol=1e-6)
    # tau 1: clipped to |pos|: [2, -3] * 1 / 2.5 = [0.8, -1.2]; alpha 0.5 blends with pos
    assert torch.allclose(nag_mix(pos, neg, 2.0, 1.0, 1.0), torch.tensor([[0.8, -1.2]]), atol=1e-6)
    assert torch.allclose(nag_mix(pos, neg, 2.0, 1.0, 0.5), torch.tensor([[0.9, -1.1]]), atol=1e-6)
    assert torch.equal(nag_mix(pos, neg, 1.0, 2.5, 0.25), pos)  # phi 1: off


def softmax(scores: torch.Tensor) -> torch.Tensor:
    return scores.softmax(-1)


class RefNagProcessor:
    """attn2 head by head with the map ``amap``; on the conditional calls, NAG with the negative
    prompt (the official steps)."""

    def __init__(
        self, negative: torch.Tensor, phi: float, tau: float, alpha: float, state: dict, amap=softmax
    ) -> None:
        self.negative, self.phi, self.tau, self.alpha, self.state = negative, phi, tau, alpha, state
        self.amap = amap

    def attend(self, attn, q, context):
        k, v = attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // attn.heads
        heads = []
        for j in range(attn.heads):
            sl = slice(j * d, (j + 1) * d)
            heads.append(self.amap(q[..., sl] @ k[..., sl].transpose(-1, -2) / d**0.5) @ v[..., sl])
        return torch.cat(heads, dim=-1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        q = attn.to_q(hidden_states)
        pos = self.attend(attn, q, encoder_hidden_states)
        if self.state["on"]:
            neg = self.attend(attn, q, self.negative)
            guided = pos * self.phi - neg * (self.phi - 1)
            s = torch.norm(guided, p=1, dim=-1, keepdim=True) / (
                torch.norm(pos, p=1, dim=-1, keepdim=True) + 1e-7
            )
            guided = guided * torch.minimum(s, torch.full_like(s, self.tau)) / (s + 1e-7)
            pos = guided * self.alpha + pos * (1 - self.alpha)
        return attn.to_out[1](attn.to_out[0](pos))


def ref_nag(
    pipe, w: float, phi: float, tau: float, alpha: float, on_steps: set[int] | None = None, amap=softmax
):
    """NAG on every attn2 for the conditional calls of :func:`reference` (c first, then u when w != 1)."""
    unet = pipe.unet
    size = unet.config.sample_size * pipe.vae_scale_factor
    negative = encode(pipe, PROMPTS, NEGATIVES, size)[1]["encoder_hidden_states"]
    state = {"on": True, "calls": 0}
    per_step = 2 if w != 1.0 else 1

    def pre(m, a, kw):
        step, k = divmod(state["calls"], per_step)
        state["on"] = k == 0 and (on_steps is None or step in on_steps)
        state["calls"] += 1

    return lambda: swapped_processors(
        unet,
        pre,
        where=lambda n: n.endswith("attn2"),
        processor=lambda n: RefNagProcessor(negative, phi, tau, alpha, state, amap),
    )


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_nag_matches_reference(arch, w, request):
    pipe, gp = request.getfixturevalue(f"{arch}_pipe"), request.getfixturevalue(arch)
    with ref_nag(pipe, w, 5.0, 2.5, 0.25)():
        expected = reference(pipe, w, 0.0, nullcontext)
    got = run(gp, ([CFG(w)] if w != 1.0 else []) + [NAG()]).latents
    assert maxdiff(expected, got) <= TOL
    assert maxdiff(got, run(gp, [CFG(w)] if w != 1.0 else []).latents) > 1e-3  # it does act


def test_nag_window(sd15_pipe, sd15, unet_calls):
    term = NAG(4.0, tau=1.5, alpha=0.5, window=Window(start=0.5))
    with unet_calls(sd15.unet) as log:
        got = run(sd15, [term]).latents
    assert log.rows == [len(PROMPTS)] * STEPS  # the negative prompt costs no rows
    with ref_nag(sd15_pipe, 1.0, 4.0, 1.5, 0.5, on_steps={2})():
        expected = reference(sd15_pipe, 1.0, 0.0, nullcontext)
    assert maxdiff(expected, got) <= TOL


def test_nag_batch_chunks_and_composition(sd15, unet_calls):
    b = len(PROMPTS)
    terms = [CFG(4.0), PAG(2.0), NAG()]
    with unet_calls(sd15.unet) as log:
        out = run(sd15, terms)
    assert log.rows == [3 * b] * STEPS and out.forward_calls == STEPS
    assert maxdiff(out.latents, run(sd15, [CFG(4.0), PAG(2.0)]).latents) > 1e-3
    # on PAG's rows too (prompt rows), in every chunk and with or without prefix sharing
    check_chunks_and_per_image(sd15, terms, out, TOL)


def test_nag_restored_and_errors(sd15):
    check_restored(sd15, [NAG()])
    check_restored(sd15, [CFG(4.0), NAG()])
    with pytest.raises(ConfigError, match=r"NAG scale must be in \[1, 100\], got 0.5"):
        NAG(0.5)
    with pytest.raises(ConfigError, match=r"NAG alpha must be in \[0, 1\], got 2"):
        NAG(alpha=2.0)
    with pytest.raises(
        ConfigError, match="two guidance terms perturb the conditional rows; keep one of them"
    ):
        run(sd15, [NAG(), NAG(name="nag2")])  # NAG + PLADIS stack: tests/test_nag_pladis.py
