"""NAG and PLADIS together (both change the conditional rows in place): NAG on the PLADIS model.

Every row's cross-attention uses PLADIS's map; on the prompt rows NAG's z+ and z- are computed with
that map too, then mixed. Checked against an independent reference loop (per-head attention with
the bisection entmax, NAG's official steps on the conditional calls), in one forward per step,
in any term order, chunked, with PAG and per image."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
from guide_support import NEGATIVES, PROMPTS, STEPS, check_restored, maxdiff, reference, run
from test_pladis import entmax_bisect
from test_tpg_reference import encode

from diffguide import CFG, PAG, ConfigError, Window
from diffguide.guidance import NAG, PLADIS

TOL = 1e-4
PHI, TAU, ALPHA, LAM = 4.0, 2.0, 0.5, 2.0


class RefBoth:
    """attn2 head by head with the PLADIS map (entmax 1.5 by bisection); NAG on the conditional calls."""

    def __init__(self, negative: torch.Tensor, state: dict) -> None:
        self.negative, self.state = negative, state

    @staticmethod
    def attend(attn, q, context):
        k, v = attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // attn.heads
        heads = []
        for j in range(attn.heads):
            sl = slice(j * d, (j + 1) * d)
            scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / d**0.5
            dense = scores.softmax(-1)
            heads.append((dense + LAM * (entmax_bisect(scores, 1.5) - dense)) @ v[..., sl])
        return torch.cat(heads, dim=-1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        q = attn.to_q(hidden_states)
        pos = self.attend(attn, q, encoder_hidden_states)
        if self.state["cond"]:
            neg = self.attend(attn, q, self.negative)
            g = pos * PHI - neg * (PHI - 1)
            s = torch.norm(g, p=1, dim=-1, keepdim=True) / (torch.norm(pos, p=1, dim=-1, keepdim=True) + 1e-7)
            g = g * torch.minimum(s, torch.full_like(s, TAU)) / (s + 1e-7)
            pos = g * ALPHA + pos * (1 - ALPHA)
        return attn.to_out[1](attn.to_out[0](pos))


def ref_both(pipe, w: float):
    """The reference loop's UNet calls per step: c first, then u when w != 1 (guide_support.reference)."""
    unet = pipe.unet
    size = unet.config.sample_size * pipe.vae_scale_factor
    negative = encode(pipe, PROMPTS, NEGATIVES, size)[1]["encoder_hidden_states"]
    state = {"cond": True, "calls": 0}
    per_step = 2 if w != 1.0 else 1

    @contextmanager
    def install():
        def pre(m, a, kw):
            state["cond"] = state["calls"] % per_step == 0
            state["calls"] += 1

        handle = unet.register_forward_pre_hook(pre, with_kwargs=True)
        mods = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
        saved = {n: m.processor for n, m in mods.items()}
        for m in mods.values():
            m.processor = RefBoth(negative, state)
        try:
            yield
        finally:
            handle.remove()
            for n, m in mods.items():
                m.processor = saved[n]

    return install


TERMS = [NAG(PHI, tau=TAU, alpha=ALPHA), PLADIS(LAM)]


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_nag_and_pladis_match_reference(sd15_pipe, sd15, unet_calls, w):
    with ref_both(sd15_pipe, w)():
        expected = reference(sd15_pipe, w, 0.0, nullcontext)
    cfg = [CFG(w)] if w != 1.0 else []
    with unet_calls(sd15.unet) as log:
        got = run(sd15, cfg + TERMS)
    assert log.rows == [len(PROMPTS) * (2 if w != 1.0 else 1)] * STEPS  # no extra rows
    d = maxdiff(expected, got.latents)
    print(f"NAG + PLADIS, CFG {w}, vs reference: {d:.2e}")
    assert d <= TOL
    assert torch.equal(run(sd15, cfg + TERMS[::-1]).latents, got.latents)  # term order does not matter
    for one in TERMS:
        assert maxdiff(got.latents, run(sd15, [*cfg, one]).latents) > 1e-3  # both act


def test_nag_and_pladis_chunks_pag_and_per_image(sd15, unet_calls):
    terms = [CFG(4.0), PAG(2.0), *TERMS]
    with unet_calls(sd15.unet) as log:
        out = run(sd15, terms)
    assert log.rows == [3 * len(PROMPTS)] * STEPS and out.forward_calls == STEPS
    assert maxdiff(out.latents, run(sd15, terms, max_rows=1).latents) <= TOL
    assert maxdiff(out.latents, run(sd15, terms, max_rows=3).latents) <= TOL
    assert maxdiff(out.latents, run(sd15, terms, prefix_sharing=False).latents) <= TOL
    for i, prompt in enumerate(PROMPTS):
        one = run(sd15, terms, prompts=[prompt], negatives=[NEGATIVES[i]], seed=11 + i).latents
        assert maxdiff(one[0], out.latents[i]) <= TOL


def test_nag_and_pladis_windows(sd15):
    """Each part only inside its own term's window: PLADIS late only equals NAG alone early on."""
    late = PLADIS(LAM, window=Window(start=0.5))
    both = run(sd15, [CFG(4.0), TERMS[0], late]).latents
    assert maxdiff(both, run(sd15, [CFG(4.0), *TERMS]).latents) > 1e-4
    assert maxdiff(both, run(sd15, [CFG(4.0), TERMS[0]]).latents) > 1e-4
    off = PLADIS(LAM, window=Window(start=0.99))  # never active in 3 steps
    assert torch.equal(run(sd15, [CFG(4.0), TERMS[0], off]).latents, run(sd15, [CFG(4.0), TERMS[0]]).latents)


def test_nag_and_pladis_restored_and_errors(sd15):
    check_restored(sd15, [CFG(4.0), *TERMS])
    with pytest.raises(
        ConfigError, match="two guidance terms perturb the conditional rows; keep one of them"
    ):
        run(sd15, [NAG(), NAG(name="nag2")])
